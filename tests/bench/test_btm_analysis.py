"""The BTM quality benchmark's verdicts (bench/btm/analysis.py) on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
from bench.btm import analysis

GROUPS = {"in-domain": ["a", "b"], "ood": ["x"]}


def rows(ens: tuple[float, float, float], dense: tuple[float, float, float]) -> dict:
    return {
        "ensemble": dict(zip("abx", ens, strict=True)),
        "dense": dict(zip("abx", dense, strict=True)),
    }


def test_spread_is_mean_sample_sd_and_range() -> None:
    s = analysis.spread([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert analysis.spread([5.0])["std"] == 0.0


def test_an_ordering_holds_only_if_it_holds_for_every_seed() -> None:
    per_seed = [
        rows((10, 20, 50), (12, 22, 49)),  # in-domain 15 < 17; ood 50 > 49
        rows((11, 21, 40), (12, 22, 45)),  # 16 < 17; 40 < 45
    ]
    in_domain, ood = analysis.ordering("ens < dense", "ensemble", "dense", per_seed, GROUPS)
    assert in_domain["holds"] and in_domain["seeds_held"] == 2
    assert in_domain["better"]["mean"] == pytest.approx(15.5)
    assert in_domain["relative_gain"] == pytest.approx(1 - 15.5 / 17)
    assert not ood["holds"] and ood["seeds_held"] == 1
    assert "held for 1 of 2 seeds" in ood["detail"]


def test_across_seeds_spreads_domains_and_groups() -> None:
    out = analysis.across_seeds(
        [rows((10, 20, 50), (1, 1, 1)), rows((12, 24, 40), (1, 1, 1))], GROUPS
    )
    assert out["ensemble"]["a"]["mean"] == 11
    assert out["ensemble"]["in-domain"] == analysis.spread([15, 18])
    assert out["ensemble"]["ood"]["max"] == 50


def test_steps_to_reach_interpolates_in_log_perplexity() -> None:
    curve = [(0, 100.0), (10, 50.0), (20, 25.0)]
    assert analysis.steps_to_reach(curve, 100.0) == 0
    assert analysis.steps_to_reach(curve, 50.0) == pytest.approx(10)
    # Halfway between 50 and 25 in log space: sqrt(50 * 25).
    assert analysis.steps_to_reach(curve, math.sqrt(50 * 25)) == pytest.approx(15)
    assert analysis.steps_to_reach(curve, 20.0) is None


def test_mean_curve_is_the_geometric_mean_and_refuses_other_steps() -> None:
    assert analysis.mean_curve([[[0, 4.0], [5, 1.0]], [[0, 16.0], [5, 4.0]]]) == [
        (0, pytest.approx(8.0)),
        (5, pytest.approx(2.0)),
    ]
    with pytest.raises(ValueError, match="different steps"):
        analysis.mean_curve([[[0, 4.0]], [[1, 4.0]]])


def test_incremental_gain_and_steps_saved() -> None:
    def strategy(test: float, final: float) -> dict:
        return {"d": {"test_perplexity": test, "curve": [[0, 100.0], [10, 50.0], [20, final]]}}

    # Posterior ends at 25; seed ends at 50, which the posterior's curve reaches at step 10.
    per_seed = [{"posterior": strategy(30, 25.0), "seed": strategy(40, 50.0)}] * 2
    result = analysis.incremental(per_seed, "posterior", ["seed"])
    (versus,) = result["comparisons"]
    assert versus["holds"] and versus["seeds_held"] == 2
    assert versus["relative_gain"] == pytest.approx(0.25)
    assert versus["steps_saved"] == [pytest.approx(0.5)] * 2
    assert result["test"]["posterior"]["mean"] == 30
    # The other way round the better curve is never reached.
    flipped = analysis.incremental(per_seed, "seed", ["posterior"])
    assert flipped["comparisons"][0]["steps_saved"] == [None, None]
    assert not flipped["comparisons"][0]["holds"]


def test_optimum_and_growth_with_domains() -> None:
    assert analysis.optimum({"10%": 5.0, "50%": 3.0, "90%": 4.0}) == {
        "best": "50%",
        "interior": True,
    }
    assert not analysis.optimum({"10%": 5.0, "90%": 4.0})["interior"]
    growing = analysis.advantage_by_count(
        {"2": {"ensemble": 99, "dense": 100}, "8": {"ensemble": 90, "dense": 100}}
    )
    assert growing["grows"] and growing["gain"]["8"] == pytest.approx(0.1)
    shrinking = analysis.advantage_by_count(
        {"2": {"ensemble": 90, "dense": 100}, "8": {"ensemble": 99, "dense": 100}}
    )
    assert not shrinking["grows"]
