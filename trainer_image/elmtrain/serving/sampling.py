"""Choosing the next token (temperature, nucleus) and turning tokens into text as they come.

Text is released only when it is final: never the start of a stop sequence that the next token
may complete, never half a UTF-8 character (a byte-level tokenizer can split one over tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast


def next_token(
    logp: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Sample from log-probabilities [V]: greedy at temperature 0, else scaled and cut to the
    smallest set of tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return int(torch.argmax(logp))
    probs = torch.softmax(logp / temperature, dim=-1)
    if top_p < 1:
        ordered, order = torch.sort(probs, descending=True)
        # Keep a token if the mass before it is below top_p (the first is always kept).
        keep = (torch.cumsum(ordered, dim=-1) - ordered) < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs.float(), 1, generator=generator))


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
