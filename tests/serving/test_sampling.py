"""Choosing tokens and releasing text (elmtrain/serving/sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from elmtrain.serving.sampling import TextStream, next_token


def test_greedy_temperature_and_nucleus() -> None:
    logp = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05], dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    assert next_token(logp, 0.0, 1.0, generator) == 1
    # top_p 0.5: only the most probable token is left (its mass alone reaches 0.5).
    assert {next_token(logp, 1.0, 0.5, generator) for _ in range(50)} == {1}
    # top_p 0.85: tokens 1 and 2 (0.6 + 0.3 >= 0.85), never the tails.
    assert {next_token(logp, 1.0, 0.85, generator) for _ in range(200)} == {1, 2}
    # A high temperature flattens the law: the tails appear.
    assert len({next_token(logp, 2.0, 1.0, generator) for _ in range(400)}) == 4


def test_same_seed_same_tokens() -> None:
    logp = torch.log_softmax(torch.randn(50, dtype=torch.float64), -1)
    draws = [
        [next_token(logp, 1.0, 1.0, g) for _ in range(20)]
        for g in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    ]
    assert draws[0] == draws[1]


class CharTokenizer:
    """Token i decodes to byte i (latin-1), except 200/201: the two halves of 'é' in UTF-8."""

    def decode(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


def feed(stream: TextStream, text: bytes) -> list[str]:
    return [stream.add(b) for b in text]


def test_text_is_released_once_and_stop_sequences_end_it() -> None:
    stream = TextStream(CharTokenizer(), ["\n\n", "END"])  # type: ignore[arg-type]
    pieces = feed(stream, b"ab EN")
    assert "".join(pieces) == "ab "  # "EN" may begin "END": held back
    pieces = feed(stream, b"Dxyz")
    assert stream.stopped and "".join(pieces) == ""
    assert stream.text == "ab "


def test_a_held_back_prefix_is_released_when_it_does_not_stop() -> None:
    stream = TextStream(CharTokenizer(), ["END"])  # type: ignore[arg-type]
    assert "".join(feed(stream, b"xEN")) == "x"
    assert stream.add(ord("o")) == "ENo"
    assert not stream.stopped and stream.finish() == ""


def test_half_a_character_is_never_released() -> None:
    stream = TextStream(CharTokenizer(), [])  # type: ignore[arg-type]
    assert stream.add(0xC3) == ""  # first byte of 'é'
    assert stream.add(0xA9) == "é"
    assert stream.finish() == ""


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_nucleus_keeps_law_proportions(temperature: float) -> None:
    logp = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)
    draws = [next_token(logp, temperature, 0.7, generator) for _ in range(3000)]
    # Kept: tokens 0 and 1, in proportion p**(1/T).
    ratio = (0.5 / 0.3) ** (1 / temperature)
    share = ratio / (1 + ratio)
    assert 2 not in draws
    assert abs(draws.count(0) / len(draws) - share) < 0.04
    assert math.isfinite(share)
