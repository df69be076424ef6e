"""Ensemble scoring against a brute-force, position-by-position Bayes computation."""

from __future__ import annotations

import math

import pytest
import torch

from elmcore.btm import posterior, top_k
from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model
from elmtrain.runtime import Runtime
from elmtrain.scoring.logprobs import ensemble_logprobs, perplexity, route, token_logprobs

CPU = Runtime(device=torch.device("cpu"))


def brute_force(lp: torch.Tensor, prior: list[float], k: int | None) -> torch.Tensor:
    experts, n, t = lp.shape
    out = torch.empty(n, t, dtype=torch.float64)
    for row in range(n):
        for pos in range(t):
            context = [float(lp[j, row, :pos].sum()) for j in range(experts)]
            weights = top_k(posterior(context, prior), k)
            mix = sum(w * math.exp(float(lp[j, row, pos])) for j, w in enumerate(weights))
            out[row, pos] = math.log(mix)
    return out


@pytest.mark.parametrize("k", [None, 1, 2, 3])
def test_ensemble_matches_brute_force(k: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 4, 12, 7, generator=generator), dim=-1)[..., 0]
    prior = [0.5, 0.3, 0.2]
    fast = ensemble_logprobs(lp, torch.tensor(prior), k)
    assert torch.allclose(fast, brute_force(lp, prior, k), atol=1e-10)


@pytest.fixture(scope="module")
def experts() -> tuple[list[torch.nn.Module], torch.Tensor]:
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=32)
    models = [build_model(config, vocab_size=50, eos_id=0, seed=s) for s in range(3)]
    sequences = torch.randint(0, 50, (5, 32), generator=torch.Generator().manual_seed(1))
    return models, sequences


def test_top_k_with_k_all_equals_full_ensemble(
    experts: tuple[list[torch.nn.Module], torch.Tensor],
) -> None:
    models, sequences = experts
    lp = torch.stack([token_logprobs(m, sequences, CPU) for m in models])  # type: ignore[arg-type]
    prior = torch.tensor([0.2, 0.5, 0.3])
    assert torch.equal(ensemble_logprobs(lp, prior, None), ensemble_logprobs(lp, prior, 3))


def test_ensemble_of_one_expert_is_that_expert(
    experts: tuple[list[torch.nn.Module], torch.Tensor],
) -> None:
    models, sequences = experts
    lp = token_logprobs(models[0], sequences, CPU)  # type: ignore[arg-type]
    single = ensemble_logprobs(lp[None], torch.tensor([1.0]))
    assert torch.allclose(single, lp.double(), atol=1e-12)
    assert perplexity(single)[1] == pytest.approx(perplexity(lp)[1], rel=1e-9)


def test_route_keeps_the_k_largest_priors_in_order() -> None:
    prior = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert route(prior, 2) == [1, 3]
    assert route(prior, 1) == [1]
    assert route(prior, None) == route(prior, 4) == route(prior, 9) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="top-k"):
        route(prior, 0)


def test_routed_ensemble_matches_the_full_one_when_the_rest_have_no_prior() -> None:
    """Experts outside the route contribute nothing when their prior is (almost) zero."""
    generator = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(4, 5, 7, 11, generator=generator), -1)[..., 0]
    prior = torch.tensor([1e-30, 0.7, 1e-30, 0.3], dtype=torch.float64)
    chosen = route(prior, 2)
    routed = ensemble_logprobs(lp[chosen], prior[chosen])
    assert torch.allclose(routed, ensemble_logprobs(lp, prior), atol=1e-12)
