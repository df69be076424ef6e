"""The BTM math against brute-force Bayes on fixed log-likelihoods."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elmcore.btm import InitStrategy, cached_prior, init_weights, posterior, top_k
from elmcore.errors import BadInputError

LOGLIKS = [-120.5, -118.25, -131.0, -119.0]


def brute_posterior(logliks: list[float], prior: list[float]) -> list[float]:
    # Straight Bayes in probability space (fine for these magnitudes with a shift).
    shift = max(logliks)
    joint = [math.exp(ll - shift) * p for ll, p in zip(logliks, prior, strict=True)]
    return [j / sum(joint) for j in joint]


def test_posterior_matches_bayes_uniform_and_skewed_prior() -> None:
    for prior in ([0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.25, 0.25]):
        expected = brute_posterior(LOGLIKS, prior)
        assert posterior(LOGLIKS, prior) == pytest.approx(expected, abs=1e-12)
    assert posterior(LOGLIKS) == pytest.approx(brute_posterior(LOGLIKS, [0.25] * 4))


def test_posterior_is_stable_for_huge_magnitudes() -> None:
    result = posterior([-1e6, -1e6 - math.log(3)])
    assert result == pytest.approx([0.75, 0.25])


def test_cached_prior_is_the_mean_posterior_over_sequences() -> None:
    rows = [LOGLIKS, [-50.0, -49.0, -60.0, -55.0], [-10.0, -10.0, -10.0, -10.0]]
    expected = [sum(brute_posterior(r, [0.25] * 4)[j] for r in rows) / 3 for j in range(4)]
    prior = cached_prior(rows)
    assert prior == pytest.approx(expected, abs=1e-12)
    assert sum(prior) == pytest.approx(1.0)


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8), st.integers(1, 9))
def test_top_k_keeps_the_k_largest_and_renormalises(weights: list[float], k: int) -> None:
    if sum(weights) == 0:
        with pytest.raises(BadInputError):
            top_k(weights, k)
        return
    kept = top_k(weights, k)
    assert sum(kept) == pytest.approx(1.0)
    assert sum(1 for w in kept if w > 0) <= k
    # Any kept weight is at least as large as any dropped one.
    for (i, a), (j, b) in itertools.product(enumerate(kept), repeat=2):
        if a > 0 and b == 0:
            assert weights[i] >= weights[j]


def test_init_weights_strategies() -> None:
    experts = ["a", "b", "c"]
    assert init_weights(InitStrategy.SEED, experts) == {}
    assert init_weights(InitStrategy.POSTERIOR, [], prior={}) == {}  # first branch: the seed
    assert init_weights(InitStrategy.COPY, experts, copy_from="b") == {"b": 1.0}
    assert init_weights(InitStrategy.UNIFORM, experts) == pytest.approx(
        dict.fromkeys(experts, 1 / 3)
    )
    prior = {"a": 0.6, "b": 0.3, "c": 0.1}
    assert init_weights(InitStrategy.POSTERIOR, experts, prior=prior) == pytest.approx(prior)
    assert init_weights(InitStrategy.POSTERIOR, experts, prior=prior, k=2) == pytest.approx(
        {"a": 2 / 3, "b": 1 / 3}
    )
    with pytest.raises(BadInputError, match="not in the forest"):
        init_weights(InitStrategy.COPY, experts, copy_from="zzz")
    with pytest.raises(BadInputError, match="needs the domain prior"):
        init_weights(InitStrategy.POSTERIOR, experts)
