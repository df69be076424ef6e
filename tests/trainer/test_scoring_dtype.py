"""Scoring loads an expert in the dtype it is stored in (issue 27.4): a bf16 7B expert scored
for a posterior prior takes one copy of its bytes, not an fp32 copy of twice that
(``bench.average_large`` measures it at 12.6 GiB); its log-probabilities are still fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model, load_model, save_model
from elmtrain.runtime import Runtime
from elmtrain.scoring.evaluation import domain_prior, model_logprobs
from elmtrain.scoring.logprobs import token_logprobs


def test_a_bf16_expert_is_scored_in_bf16_and_an_fp32_one_in_fp32(tmp_path: Path) -> None:
    config = ModelConfig(family="llama", d_model=32, n_layers=1, n_heads=2, context_length=32)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        save_model(build_model(config, 64, 0, seed=1).to(dtype), tmp_path / name)
        assert load_model(tmp_path / name, dtype="auto").dtype == dtype
    assert load_model(tmp_path / "bf16").dtype == torch.float32  # training's master weights

    runtime = Runtime(torch.device("cpu"))
    sample = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    scored = model_logprobs(tmp_path / "bf16", sample, runtime)
    upcast = token_logprobs(load_model(tmp_path / "bf16"), sample, runtime)
    assert scored.dtype == torch.float32 and scored.shape == (3, 15)
    assert not torch.equal(scored, upcast)  # really computed in bf16 ...
    assert torch.allclose(scored, upcast, atol=0.05)  # ... to bf16's precision
    prior = domain_prior([tmp_path / "bf16", tmp_path / "fp32"], sample, runtime)
    assert abs(sum(prior) - 1) < 1e-9 and all(0 < p < 1 for p in prior)
