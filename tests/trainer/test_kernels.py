"""The fused activation swapped in before training: same loss and gradients, same saved model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import GELUTanh, NewGELUActivation

from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model
from elmtrain.model.kernels import fuse_activations


def _loss_and_grads(
    model: torch.nn.Module, batch: torch.Tensor
) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(("family", "swapped"), [("gpt2", 3), ("llama", 0)])
def test_same_math_in_one_kernel(family: str, swapped: int, tmp_path: Path) -> None:
    config = ModelConfig(family=family, d_model=32, n_layers=3, n_heads=4, context_length=24)
    model = build_model(config, vocab_size=97, eos_id=0, seed=3)
    batch = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(2))
    loss, grads = _loss_and_grads(model, batch)

    assert fuse_activations(model) == swapped
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == swapped
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    for ours, theirs in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)

    # Only module instances changed: the saved model is the one built, and loads as it was.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.to_dict().get("activation_function") == model.config.to_dict().get(
        "activation_function"
    )
    assert float(loaded(input_ids=batch, labels=batch).loss) == pytest.approx(loss, rel=1e-5)
