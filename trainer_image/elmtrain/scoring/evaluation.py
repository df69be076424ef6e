"""Perplexity of models on domains, and the domain posterior of text over a forest's experts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from elmcore.btm import cached_prior
from elmtrain.model.families import load_model
from elmtrain.runtime import Runtime
from elmtrain.scoring.logprobs import token_logprobs


def model_logprobs(model_dir: Path, sequences: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    # In the expert's stored dtype: scoring a 7B bf16 expert in fp32 would need twice its bytes
    # (issue 27 point 4); the log-softmax is fp32 whatever the weights are (token_logprobs).
    model = load_model(model_dir, runtime.device, dtype="auto")
    try:
        return token_logprobs(model, sequences, runtime)
    finally:
        del model


def expert_logprobs(
    model_dirs: Sequence[Path], sequences: torch.Tensor, runtime: Runtime
) -> torch.Tensor:
    """[K, N, T-1]: every expert's token log-probabilities on the same sequences."""
    return torch.stack([model_logprobs(d, sequences, runtime) for d in model_dirs])


def domain_prior(
    model_dirs: Sequence[Path], sequences: torch.Tensor, runtime: Runtime
) -> list[float]:
    """The cached prior P(D=j) of a text sample: mean posterior over its sequences (DESIGN §1)."""
    per_sequence = expert_logprobs(model_dirs, sequences, runtime).sum(dim=-1)  # [K, N]
    return cached_prior(per_sequence.T.double().tolist())
