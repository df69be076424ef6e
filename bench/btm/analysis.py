"""From scores to the paper's claims: spreads over seeds, orderings, learning-curve savings.

Pure (no torch, no files): ``tests/bench/test_btm_analysis.py`` checks it on made-up numbers.
An ordering *holds* only if it holds for every training seed.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

Rows = Mapping[str, Mapping[str, float]]  # row -> domain -> perplexity
Groups = Mapping[str, Sequence[str]]  # a group's name -> its domains


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def group_means(rows: Rows, groups: Groups) -> dict[str, dict[str, float]]:
    """row -> group -> the mean perplexity over the group's domains."""
    return {
        row: {
            name: statistics.fmean(values[d] for d in domains) for name, domains in groups.items()
        }
        for row, values in rows.items()
    }


def across_seeds(per_seed: Sequence[Rows], groups: Groups) -> dict[str, dict[str, Any]]:
    """row -> domain or group -> spread over the seeds."""
    means = [group_means(rows, groups) for rows in per_seed]
    out: dict[str, dict[str, Any]] = {}
    for row, values in per_seed[0].items():
        out[row] = {d: spread([rows[row][d] for rows in per_seed]) for d in values}
        out[row] |= {g: spread([m[row][g] for m in means]) for g in groups}
    return out


def ordering(
    claim: str, better: str, worse: str, per_seed: Sequence[Rows], groups: Groups
) -> list[dict[str, Any]]:
    """``better`` < ``worse`` on each group's mean, checked seed by seed."""
    means = [group_means(rows, groups) for rows in per_seed]
    checks = []
    for group in groups:
        pairs = [(m[better][group], m[worse][group]) for m in means]
        wins = sum(b < w for b, w in pairs)
        b, w = spread([p[0] for p in pairs]), spread([p[1] for p in pairs])
        checks.append(
            {
                "claim": f"{claim} ({group})",
                "holds": wins == len(pairs),
                "seeds_held": wins,
                "seeds": len(pairs),
                "better": b,
                "worse": w,
                "relative_gain": 1 - b["mean"] / w["mean"],
                "detail": f"{b['mean']:.2f} ± {b['std']:.2f} vs {w['mean']:.2f} ± {w['std']:.2f}; "
                f"held for {wins} of {len(pairs)} seeds",
            }
        )
    return checks


def mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[tuple[int, float]]:
    """Several learning curves ([step, perplexity] points at the same steps) as one: the
    geometric mean perplexity (= exp of the mean loss) at each step."""
    steps = [int(p[0]) for p in curves[0]]
    if any([int(p[0]) for p in c] != steps for c in curves):
        raise ValueError("curves recorded at different steps cannot be averaged")
    return [
        (step, math.exp(statistics.fmean(math.log(c[i][1]) for c in curves)))
        for i, step in enumerate(steps)
    ]


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """The first step at which the curve is at or below ``target`` (linear in log perplexity
    between recorded points); None if it never gets there."""
    previous: tuple[int, float] | None = None
    for step, value in curve:
        if value <= target:
            if previous is None:
                return float(step)
            s0, lo, hi = previous[0], math.log(value), math.log(previous[1])
            return s0 + (step - s0) * (hi - math.log(target)) / (hi - lo)
        previous = (step, value)
    return None


def incremental(
    per_seed: Sequence[Mapping[str, Mapping[str, Mapping[str, Any]]]],
    best: str,
    others: Sequence[str],
) -> dict[str, Any]:
    """``per_seed[s][strategy][domain]`` = {test_perplexity, curve}: the paper's claim that
    ``best`` (the posterior-weighted init) beats each other strategy at equal steps, and how
    many of its steps reach each other's final validation perplexity."""
    strategies = [best, *others]
    domains = list(per_seed[0][best])

    def test_mean(seed: Mapping[str, Mapping[str, Mapping[str, Any]]], strategy: str) -> float:
        return statistics.fmean(seed[strategy][d]["test_perplexity"] for d in domains)

    curves = {
        s: [mean_curve([seed[s][d]["curve"] for d in domains]) for seed in per_seed]
        for s in strategies
    }
    table = {s: spread([test_mean(seed, s) for seed in per_seed]) for s in strategies}
    per_domain = {
        s: {d: spread([seed[s][d]["test_perplexity"] for seed in per_seed]) for d in domains}
        for s in strategies
    }
    comparisons = []
    for other in others:
        pairs = [(test_mean(seed, best), test_mean(seed, other)) for seed in per_seed]
        saved = []
        for ours, theirs in zip(curves[best], curves[other], strict=True):
            reached = steps_to_reach(ours, theirs[-1][1])
            total = ours[-1][0]
            saved.append(None if reached is None else 1 - reached / total)
        comparisons.append(
            {
                "claim": f"{best} init beats {other} init on the new domains",
                "holds": all(b < o for b, o in pairs),
                "seeds_held": sum(b < o for b, o in pairs),
                "seeds": len(pairs),
                "relative_gain": 1 - statistics.fmean(b / o for b, o in pairs),
                "steps_saved": saved,  # share of the steps, per seed; None: never reached
            }
        )
    return {"test": table, "per_domain": per_domain, "curves": curves, "comparisons": comparisons}


def optimum(sweep: Mapping[str, float]) -> dict[str, Any]:
    """The best seed fraction of a sweep (label -> perplexity) and whether it is interior."""
    labels = list(sweep)
    best = min(labels, key=lambda f: sweep[f])
    return {"best": best, "interior": best not in (labels[0], labels[-1])}


def advantage_by_count(counts: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """``counts[n]`` = {"ensemble": ppl, "dense": ppl}: the ensemble's relative gain over dense
    at each number of domains, and whether it grows with the number."""
    gains = {n: 1 - v["ensemble"] / v["dense"] for n, v in counts.items()}
    values = list(gains.values())
    return {"gain": gains, "grows": all(a < b for a, b in itertools.pairwise(values))}
