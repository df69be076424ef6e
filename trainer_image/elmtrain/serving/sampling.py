"""Choosing the next token (temperature, nucleus) and turning tokens into text as they come.

Text is released only when it is final: never the start of a stop sequence that the next token
may complete, never half a UTF-8 character (a byte-level tokenizer can split one over tokens).
What a token costs does not grow with the text or the stop sequences' length (a request must not
be able to make the engine thread, which every request shares, slow).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast


def sample(
    logp: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor
) -> list[int]:
    """One token per row of log-probabilities [S, V]: greedy where the temperature is 0, else
    from the law scaled by the temperature and cut to the smallest set of tokens whose
    probability reaches the row's ``top_p``, drawn by inverting its CDF at the row's own
    uniform number (each request's own generator: batching never changes what it draws)."""
    greedy = temperatures == 0
    probs = torch.softmax(logp / torch.where(greedy, 1.0, temperatures)[:, None], dim=-1)
    drawn = _inverse_cdf(probs, uniforms)
    nucleus = (top_ps < 1).nonzero().squeeze(1)
    if len(nucleus):  # only these rows need their tokens by probability (a sort)
        ordered, order = torch.sort(probs[nucleus], dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (the first is always kept).
        before = torch.cumsum(ordered, dim=-1) - ordered
        ordered = torch.where(before < top_ps[nucleus, None], ordered, 0.0)
        at = _inverse_cdf(ordered, uniforms[nucleus])
        drawn[nucleus] = order.gather(1, at[:, None]).squeeze(1)
    return torch.where(greedy, torch.argmax(logp, dim=-1), drawn).tolist()


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The index where each row's cumulative mass passes its uniform number (scaled)."""
    cdf = torch.cumsum(probs, dim=-1)
    at = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None])
    return at.squeeze(1).clamp(max=probs.shape[1] - 1)


class TextStream:
    """The completion's text so far, with stop sequences applied, at a cost per token that does
    not grow with the text: each token is decoded with the few tokens before it as context (as
    vLLM's incremental detokenizer does), stop sequences are matched by a Knuth-Morris-Pratt
    automaton fed only the new characters, and only the held-back tail is kept as one string."""

    # More undecodable tokens in a row than any UTF-8 character spans: they are final text.
    MAX_PENDING_TOKENS = 6

    def __init__(self, tokenizer: PreTrainedTokenizerFast, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [_StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self.tokens: list[int] = []
        self._prefix = self._read = 0  # tokens[prefix:read]: context already turned into text
        self._done: list[str] = []  # the text released so far, in pieces
        self._held = ""  # final text not released yet: it may begin a stop sequence
        self.released = 0  # characters already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """All of it (at the end: a non-streaming answer)."""
        return "".join(self._done) + self._held

    def add(self, token: int) -> str:
        """Append a token; return the text that became final (maybe empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix :])
        pending = len(self.tokens) - self._read
        # An incomplete character decodes to U+FFFD: wait for its next byte.
        if len(after) <= len(before) or (
            after.endswith("\ufffd") and pending < self.MAX_PENDING_TOKENS
        ):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return self._take(str(after[len(before) :]))

    def _take(self, new: str) -> str:
        start = len(self._held)
        self._held += new
        for offset, char in enumerate(new):
            for stop in self.stops:
                if stop.feed(char):  # the stop ends here: the text ends before it (which is
                    # within the held tail, since a stop's prefix is never released)
                    self._held = self._held[: start + offset + 1 - len(stop.text)]
                    self.stopped = True
                    return self.finish()
        keep = max((stop.matched for stop in self.stops), default=0)
        return self._release(len(self._held) - keep)

    def finish(self) -> str:
        """Whatever is left (at the end of generation)."""
        return self._release(len(self._held))

    def _release(self, count: int) -> str:
        piece, self._held = self._held[:count], self._held[count:]
        if piece:
            self._done.append(piece)
            self.released += len(piece)
        return piece


class _StopMatcher:
    """One stop sequence, matched character by character: ``matched`` is the length of the
    longest prefix of it that the text so far ends with (amortized O(1) per character)."""

    def __init__(self, text: str) -> None:
        self.text, self.matched = text, 0
        # fallback[i]: the longest proper prefix of text[:i + 1] that is also its suffix.
        self.fallback = [0] * len(text)
        k = 0
        for i in range(1, len(text)):
            while k and text[i] != text[k]:
                k = self.fallback[k - 1]
            if text[i] == text[k]:
                k += 1
            self.fallback[i] = k

    def feed(self, char: str) -> bool:
        """Take the next character; True when the stop sequence is complete."""
        k = self.matched
        if k == len(self.text):  # matched already: continue from its longest border
            k = self.fallback[k - 1]
        while k and char != self.text[k]:
            k = self.fallback[k - 1]
        if char == self.text[k]:
            k += 1
        self.matched = k
        return k == len(self.text)
