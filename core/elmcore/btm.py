"""Branch-Train-Merge math (DESIGN §1), in plain Python so it is tested without torch.

Domain posterior by Bayes' rule over ELMs, in log space:
    P(D=j | x) = P(x | D=j) P(D=j) / sum_k P(x | D=k) P(D=k)
Cached prior for a target domain: the mean, over N held-out sequences of that domain, of their
posteriors under a uniform prior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum

from elmcore.errors import BadInputError


class InitStrategy(StrEnum):
    SEED = "seed"  # start from the seed LM
    COPY = "copy"  # start from one existing expert
    UNIFORM = "uniform"  # uniform average of all existing experts
    POSTERIOR = "posterior"  # average weighted by the domain posterior on the new data (BTM)


def logsumexp(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("logsumexp of an empty sequence")
    peak = max(values)
    if peak == -math.inf:
        return -math.inf
    return peak + math.log(sum(math.exp(v - peak) for v in values))


def posterior(
    log_likelihoods: Sequence[float], prior: Sequence[float] | None = None
) -> list[float]:
    """P(D=j | x) from log P(x | D=j) and the prior P(D=j) (uniform when None)."""
    n = len(log_likelihoods)
    if n == 0:
        raise BadInputError("the posterior needs at least one expert")
    prior = normalize(prior) if prior is not None else [1.0 / n] * n
    if len(prior) != n:
        raise ValueError(f"{n} likelihoods but {len(prior)} prior weights")
    joint = [
        ll + (math.log(p) if p > 0 else -math.inf)
        for ll, p in zip(log_likelihoods, prior, strict=True)
    ]
    norm = logsumexp(joint)
    if norm == -math.inf:
        raise BadInputError("every expert gives the text zero probability")
    return [math.exp(j - norm) for j in joint]


def cached_prior(log_likelihoods: Sequence[Sequence[float]]) -> list[float]:
    """Mean posterior (uniform prior) over sequences; rows are sequences, columns experts."""
    if not log_likelihoods:
        raise BadInputError("the cached prior needs at least one sequence")
    rows = [posterior(row) for row in log_likelihoods]
    n = len(rows[0])
    return [sum(row[j] for row in rows) / len(rows) for j in range(n)]


def normalize(weights: Sequence[float]) -> list[float]:
    if any(w < 0 or math.isnan(w) for w in weights):
        raise BadInputError(f"weights must be non-negative numbers, got {list(weights)}")
    total = sum(weights)
    if total <= 0:
        raise BadInputError("weights must not all be zero")
    return [w / total for w in weights]


def top_k(weights: Sequence[float], k: int | None) -> list[float]:
    """Keep the k largest weights (ties: the earlier index wins), zero the rest, renormalize."""
    if k is None or k >= len(weights):
        return normalize(weights)
    if k < 1:
        raise BadInputError(f"top-k must be at least 1, got {k}")
    order = sorted(range(len(weights)), key=lambda j: (-weights[j], j))
    kept = set(order[:k])
    return normalize([w if j in kept else 0.0 for j, w in enumerate(weights)])


def init_weights(
    strategy: InitStrategy,
    experts: Sequence[str],
    *,
    prior: Mapping[str, float] | None = None,
    k: int | None = None,
    copy_from: str | None = None,
) -> dict[str, float]:
    """Averaging weights over existing experts for a new branch; ``{}`` means "the seed".

    The first branches of a forest (no experts yet) always start from the seed.
    """
    if strategy is InitStrategy.SEED or not experts:
        return {}
    if strategy is InitStrategy.COPY:
        if copy_from is None:
            raise BadInputError("init strategy 'copy' needs the expert to copy from")
        if copy_from not in experts:
            raise BadInputError(f"cannot copy expert {copy_from!r}: not in the forest")
        return {copy_from: 1.0}
    if strategy is InitStrategy.UNIFORM:
        return dict(zip(experts, top_k([1.0] * len(experts), None), strict=True))
    if prior is None:
        raise BadInputError("init strategy 'posterior' needs the domain prior of the new data")
    missing = [d for d in experts if d not in prior]
    if missing:
        raise BadInputError(f"the prior has no weight for experts {missing}")
    weights = top_k([prior[d] for d in experts], k)
    return {d: w for d, w in zip(experts, weights, strict=True) if w > 0}
