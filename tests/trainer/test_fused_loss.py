"""The fused output layer + cross-entropy against the model's own loss: same value, same grads."""

from __future__ import annotations

import pytest
import torch

from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model
from elmtrain.model.fused_loss import CausalLMLoss, chunk_rows, linear_cross_entropy


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("family", "tied", "rows"),
    [("gpt2", True, None), ("gpt2", True, 7), ("llama", False, 16), ("llama", True, None)],
)
def test_matches_the_models_own_loss_and_gradients(
    family: str, tied: bool, rows: int | None
) -> None:
    config = ModelConfig(
        family=family, d_model=32, n_layers=2, n_heads=4, context_length=24, tie_embeddings=tied
    )
    model = build_model(config, vocab_size=97, eos_id=0, seed=3)
    batch = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))

    expected = model(input_ids=batch, labels=batch).loss
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    loss = CausalLMLoss(model, rows=rows)(batch)
    loss.backward()
    grads = _grads(model)

    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (loss, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bias_chunks_and_scaled_upstream_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    weight = torch.randn(13, 8, generator=generator, requires_grad=True)
    bias = torch.randn(13, generator=generator, requires_grad=True)
    targets = torch.randint(0, 13, (10,), generator=generator)

    reference = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets)
    (3.0 * reference).backward()
    expected = [t.grad.clone() for t in (hidden, weight, bias) if t.grad is not None]
    for t in (hidden, weight, bias):
        t.grad = None

    loss = linear_cross_entropy(hidden, weight, bias, targets, rows=3)  # 3 + 3 + 3 + 1 rows
    (3.0 * loss).backward()
    torch.testing.assert_close(loss, reference)
    for got, want in zip((hidden.grad, weight.grad, bias.grad), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_stays_close() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=generator, requires_grad=True)
    weight = torch.randn(50, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (64,), generator=generator)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, None, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad is not None
    assert weight.grad.dtype == torch.float32
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()


def test_chunk_rows_bounds_the_logits_buffer() -> None:
    assert chunk_rows(8192) == 8192  # 8192 x 8192 fp32 = 256 MiB
    assert chunk_rows(50_257) == 1335
    assert chunk_rows(10**12) == 1
