"""Choosing tokens and releasing text (elmtrain/serving/sampling.py)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from elmtrain.serving.sampling import TextStream, sample
from tests.harness.serve import Served
from tests.serving.conftest import NAME
from tests.textgen import domain_text


def draw(logp: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One row through the batched sampler, with this generator's uniform."""
    (token,) = sample(
        logp.float()[None],
        torch.tensor([temperature]),
        torch.tensor([top_p]),
        torch.rand(1, generator=generator),
    )
    return token


def test_greedy_temperature_and_nucleus() -> None:
    logp = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05], dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    assert draw(logp, 0.0, 1.0, generator) == 1
    # top_p 0.5: only the most probable token is left (its mass alone reaches 0.5).
    assert {draw(logp, 1.0, 0.5, generator) for _ in range(50)} == {1}
    # top_p 0.85: tokens 1 and 2 (0.6 + 0.3 >= 0.85), never the tails.
    assert {draw(logp, 1.0, 0.85, generator) for _ in range(200)} == {1, 2}
    # A high temperature flattens the law: the tails appear.
    assert len({draw(logp, 2.0, 1.0, generator) for _ in range(400)}) == 4


def test_rows_are_drawn_with_their_own_settings_and_numbers() -> None:
    """A row's token depends on its own law, settings and uniform, not on its neighbours."""
    logp = torch.log_softmax(torch.randn(6, 50), -1)
    temperatures = torch.tensor([0.0, 1.0, 0.7, 1.0, 1.3, 0.0])
    top_ps = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.3])
    uniforms = torch.rand(6)
    together = sample(logp, temperatures, top_ps, uniforms)
    alone = [
        sample(logp[i : i + 1], temperatures[i : i + 1], top_ps[i : i + 1], uniforms[i : i + 1])[0]
        for i in range(6)
    ]
    assert together == alone
    assert together[0] == int(logp[0].argmax()) and together[5] == int(logp[5].argmax())


def test_a_seed_gives_the_same_text_alone_and_in_a_batch(server: Served) -> None:
    """What the API promises of ``seed`` (docs/serving.md): the same seed and request give the
    same text, whether the request decodes alone or in a batch with others; other seeds draw
    other text. Through `elmtrain serve` and the official client, as a user relies on it."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompt = domain_text("sailing", 1, seed=3)[:60]

    def text(seed: int) -> str:
        answer = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=16, temperature=1.5, top_p=1.0, seed=seed
        )
        return answer.choices[0].text

    alone = text(7)
    assert text(7) == alone  # a second request, alone again
    seeds = [7, 8, 9, 10, 11, 7]
    with ThreadPoolExecutor(len(seeds)) as pool:  # concurrent: they decode in shared batches
        batched = list(pool.map(text, seeds))
    assert batched[0] == alone and batched[-1] == alone, (alone, batched)
    assert len(set(batched)) > 1, batched  # at temperature 1.5, other seeds draw other text


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
    draws = [draw(logp, temperature, 0.7, generator) for _ in range(3000)]
    # Kept: tokens 0 and 1, in proportion p**(1/T).
    ratio = (0.5 / 0.3) ** (1 / temperature)
    share = ratio / (1 + ratio)
    assert 2 not in draws
    assert abs(draws.count(0) / len(draws) - share) < 0.04
    assert math.isfinite(share)
