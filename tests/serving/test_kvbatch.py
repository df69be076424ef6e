"""Batched decoding (elmtrain/serving/kvbatch.py) gives what each sequence alone would get,
by the written-out step (serving/fastpath.py) and by transformers' own forward.

Members join a running batch at different steps with prompts of different lengths and leave
early; every step's log-probabilities must equal a plain forward pass over that member's own
tokens, for both families the trainer builds.
"""

from __future__ import annotations

import pytest
import torch

from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model
from elmtrain.runtime import Runtime
from elmtrain.scoring.logprobs import token_logprobs
from elmtrain.serving.kvbatch import DecodeBatch, prefill

CPU = torch.device("cpu")


def alone(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("path", ["written-out", "transformers"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-gqa"])
def test_joins_and_leaves_match_each_sequence_alone(family: str, path: str) -> None:
    config = ModelConfig(
        family=family.removesuffix("-gqa"),
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if family.endswith("-gqa") else None,  # grouped-query attention
        context_length=64,
    )
    model = build_model(config, 97, 0, seed=3).eval()
    prompts = {"long": [0, 5, 6, 7, 8, 9, 10], "short": [0, 3], "late": [0, 11, 12, 13], "one": [0]}
    read = prefill(model, list(prompts.values()), CPU)
    order = list(prompts)
    # The prompt's log-likelihood is what a scorer computes, the next-token law its last row.
    for row, (name, ids) in enumerate(prompts.items()):
        reference = alone(model, ids)
        expected = float(reference[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).double().sum())
        assert float(read.prompt_loglik[row]) == pytest.approx(expected, abs=1e-5), name
        assert torch.allclose(read.next_logp[row], reference[-1], atol=1e-5), name
    scored = token_logprobs(model, torch.tensor([prompts["long"]]), Runtime(device=CPU))
    assert float(scored.sum()) == pytest.approx(float(read.prompt_loglik[0]), abs=1e-4)

    batch: DecodeBatch[str] = DecodeBatch(model, CPU)
    assert batch.decoder is not None  # both families have the written-out step
    if path == "transformers":
        batch.decoder = None
    batch.join(["long", "short"], read.rows.select([order.index("long"), order.index("short")]))
    tokens = {name: list(ids) for name, ids in prompts.items()}
    for step in range(30):  # past the buffers' first capacity: they double
        if step == 2:  # two more join a running batch, one shorter and one longer than it
            batch.join(["late", "one"], read.rows.select([order.index("late"), order.index("one")]))
        if step == 5:
            batch.leave({"long"})  # the longest leaves: the cache shrinks to the others' length
            longest = max(len(tokens[m]) for m in batch.members)
            assert batch.rows is not None and batch.rows.length == longest
        for name in batch.members:
            tokens[name].append((7 * step + len(tokens[name])) % 97)
        logp = batch.step([tokens[m][-1] for m in batch.members])
        for row, name in enumerate(batch.members):
            assert torch.allclose(logp[row], alone(model, tokens[name])[-1], atol=1e-5), (
                step,
                name,
            )
    batch.leave(set(batch.members))
    assert len(batch) == 0 and batch.rows is None
