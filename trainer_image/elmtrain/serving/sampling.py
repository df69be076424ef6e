"""Choosing the next token (temperature, nucleus) and turning tokens into text as they come.

Text is released only when it is final: never the start of a stop sequence that the next token
may complete, never half a UTF-8 character (a byte-level tokenizer can split one over tokens).
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
    """The completion's text so far, with stop sequences applied."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.released = 0  # characters already handed out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the text that became final (maybe empty)."""
        self.tokens.append(token)
        self.text = str(self.tokenizer.decode(self.tokens))
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.finish()
        final = len(self.text.rstrip("\ufffd"))  # an incomplete character decodes to U+FFFD
        for stop in self.stop:  # hold back a tail that could still become a stop sequence
            for size in range(min(len(stop) - 1, final), 0, -1):
                if self.text[:final].endswith(stop[:size]):
                    final = min(final, len(self.text[:final]) - size)
                    break
        return self._release(max(final, self.released))

    def finish(self) -> str:
        """Whatever is left (at the end of generation)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece, self.released = self.text[self.released : upto], upto
        return piece
