"""Every benchmark's ``--quick`` variant runs end to end, so none of them rots.

The figures themselves are the benchmarks' business (docs/benchmarks.md); here each run must
finish, measure both sides, and produce results that are internally consistent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.textgen import domain_text, write_domains

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def quick(name: str, tmp_path: Path, *extra: str, plots: bool = True) -> dict[str, Any]:
    out, plot = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            f"bench.{name}",
            "--quick",
            "--out",
            str(out),
            "--plot",
            str(plot),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    if plots:
        assert plot.stat().st_size > 10_000  # a real figure, not an empty canvas
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["machine"]["cores"] >= 1
    return results


def test_btm_quality(tmp_path: Path) -> None:
    """On a synthetic corpus (the shared one is for the real run): every experiment, every row
    for every domain and seed, and lineage that says how each new expert was initialised."""
    domains = ["cooking", "sailing", "finance", "weather", "poetry"]
    corpus = write_domains(tmp_path / "corpus", domains)
    for domain in domains:
        (corpus / domain / "test.txt").write_text(domain_text(domain, 12, seed=2))
    results = quick(
        "btm_quality",
        tmp_path,
        "--corpus",
        str(corpus),
        "--first",
        "cooking,sailing",
        "--new",
        "finance",
        "--held-out",
        "weather",
        "--ood",
        "poetry",
    )
    trained = ("cooking", "sailing", "finance")
    main = results["main"]
    assert set(main["per_seed"]) == {"0", "1"}
    for rows in main["per_seed"].values():
        assert set(rows) == {
            "seed",
            "dense",
            "expert",
            "ensemble",
            "ensemble top-2",
            "ensemble routed top-2",
            "posterior average",
            "uniform average",
            "random-split ensemble",
            "random-split posterior average",
            "random-split uniform average",
        }
        for row in rows.values():
            assert set(row) == set(domains)
            assert all(v > 1 and math.isfinite(v) for v in row.values())
        # Trained experts are better than the seed on their own domains.
        assert all(rows["expert"][d] < rows["seed"][d] for d in trained)
    assert set(main["groups"]) == {"in-domain", "held-out", "poetry"}
    assert len(main["orderings"]) == 4 * 3
    assert all(c["seeds"] == 2 and isinstance(c["holds"], bool) for c in main["orderings"])
    assert main["spread"]["ensemble"]["in-domain"]["std"] >= 0

    # Incremental: the new domain's expert under each init, with its learning curve.
    expert_steps = 30 // 3  # (1 - 0.5) * 60 steps over 3 trained domains
    for seed in results["incremental"]["per_seed"].values():
        assert set(seed) == {"posterior", "seed", "nearest", "uniform"}
        for strategy, experts in seed.items():
            entry = experts["finance"]
            steps = [p[0] for p in entry["curve"]]
            assert steps[0] == 0 and steps[-1] == expert_steps and steps == sorted(steps)
            assert len(steps) >= 3
            weights = entry["parents"]
            assert sum(weights.values()) == pytest.approx(1, abs=1e-3)
            expected = {"seed": {"seed"}, "uniform": {"cooking", "sailing"}}.get(strategy)
            if expected is not None:
                assert set(weights) == expected
        assert len(seed["nearest"]["finance"]["parents"]) == 1
    comparisons = results["incremental"]["analysis"]["comparisons"]
    assert [c["claim"].split()[3] for c in comparisons] == ["seed", "nearest", "uniform"]

    assert set(results["sweep"]["means"]) == {"50%", "80%"}
    forests = results["domain_count"]["forests"]
    assert set(forests) == {"2", "4"}
    assert forests["4"]["domains"] == ["cooking", "sailing", "finance", "weather"]
    assert set(results["domain_count"]["advantage"]["in-domain"]["gain"]) == {"2", "4"}


def test_btx(tmp_path: Path) -> None:
    """On a synthetic corpus: every row for every domain and seed (the mixes before and after
    finetuning among them), the dense budget that counts the finetuning, and a cost row for each
    way to run the forest, the dense model's own ratios exactly 1."""
    domains = ["cooking", "sailing", "finance", "weather", "poetry"]
    corpus = write_domains(tmp_path / "corpus", domains)
    for domain in domains:
        (corpus / domain / "test.txt").write_text(domain_text(domain, 12, seed=2))
    results = quick(
        "btx", tmp_path, "--corpus", str(corpus), "--domains", "cooking,sailing,finance",
        "--held-out", "weather", "--ood", "poetry",
    )  # fmt: skip
    mixes = {f"mix ({r} router){f}" for r in ("centroids", "random") for f in ("", " finetuned")}
    assert set(results["per_seed"]) == {"0", "1"}
    for rows in results["per_seed"].values():
        assert set(rows) == {
            "dense", "expert", "ensemble", "ensemble top-2", "ensemble routed top-2",
            "posterior average", "uniform average", *mixes,
        }  # fmt: skip
        for row in rows.values():
            assert set(row) == set(domains)
            assert all(v > 1 and math.isfinite(v) for v in row.values())
        # Finetuning moves the mix: a step that changed nothing would score the same.
        assert rows["mix (random router) finetuned"] != rows["mix (random router)"]
    assert set(results["groups"]) == {"in-domain", "held-out", "weather", "poetry"}
    steps = results["steps"]
    assert steps["dense"] == steps["expert"] * steps["experts"] + steps["finetune"]
    assert all(c["seeds"] == 2 and isinstance(c["holds"], bool) for c in results["orderings"])
    cost = results["cost"]["rows"]
    assert set(cost) == {
        "dense", "parameter average", "mix (top-2 MoE)", "ensemble (all experts)",
        "ensemble top-2 (per position)", "ensemble routed top-2",
    }  # fmt: skip
    assert all(v == 1 for k, v in cost["dense"].items() if k.endswith("_vs_dense"))
    assert cost["ensemble (all experts)"]["active_parameters_vs_dense"] == pytest.approx(3)
    assert cost["ensemble routed top-2"]["active_parameters_vs_dense"] == pytest.approx(2)
    # Top-2 of three experts' FFNs and one attention: more than dense, less than two models.
    assert 1 < cost["mix (top-2 MoE)"]["active_parameters_vs_dense"] < 2
    for row in cost.values():
        assert row["scoring_tokens_per_second"] > 0 and row["generation_tokens_per_second"] > 0


def test_discovery(tmp_path: Path) -> None:
    """On a synthetic corpus of three separated domains pooled: every forest's rows for every
    domain and seed, three clusters that find the three domains, compute-matched steps, and a
    cost row for each way to route (one expert for the top-1 rows, every expert for the rest)."""
    domains = ["cooking", "sailing", "finance", "poetry"]
    corpus = write_domains(tmp_path / "corpus", domains)
    for domain in domains:
        (corpus / domain / "test.txt").write_text(domain_text(domain, 12, seed=2))
    results = quick(
        "discovery", tmp_path, "--corpus", str(corpus), "--domains", "cooking,sailing,finance",
        "--ood", "poetry", "--clusters", "2,3",
    )  # fmt: skip
    forests = ("labelled", "k=2", "k=3")
    routed = {f"k={k} cluster-routed{t}" for k in (2, 3) for t in ("", " top-1")}
    posterior = {f"{f} posterior{t}" for f in forests for t in ("", " top-1")}
    assert set(results["per_seed"]) == {"0", "1"}
    for rows in results["per_seed"].values():
        assert set(rows) == {"seed", "dense", *posterior, *routed}
        for row in rows.values():
            assert set(row) == set(domains)
            assert all(v > 1 and math.isfinite(v) for v in row.values())
    steps = results["steps"]
    assert steps["expert"] == {"2": 15, "3": 10, "labelled": 10}  # 30 steps after the seed
    nmi = results["clusters"]["nmi"]
    assert set(nmi) == {"2", "3"}
    # Three clusters of three separated domains of equal size: the domains themselves.
    assert nmi["3"]["min"] > 0.9
    for seed in results["clusters"]["per_seed"].values():
        assert sum(seed["3"]["sizes"]) == 3 * 120
    assert all(c["seeds"] == 2 and isinstance(c["holds"], bool) for c in results["orderings"])
    cost = results["cost"]["rows"]
    assert set(cost) == {"seed", "dense", *posterior, *routed}
    for row, value in cost.items():
        expected = 1 if row in ("seed", "dense") or row.endswith("top-1") else None
        if expected is None:
            expected = 3 if row.startswith(("labelled", "k=3")) else 2
        assert value["experts_per_token"] == pytest.approx(expected), row
        assert value["ms_per_token"] > 0
    assert all(cost[r]["routing_ms_per_token"] > 0 for r in routed)


def test_merge(tmp_path: Path) -> None:
    results = quick("merge", tmp_path)
    (row,) = results["rows"]
    assert row["checkpoints"] == 4
    assert row["max_abs_difference"] < 1e-5  # both tools computed the same average
    for tool in ("elmtrain", "mergekit"):
        assert row[tool]["seconds"] > 0 and row[tool]["peak_rss_mb"] > 5


def test_average_large(tmp_path: Path) -> None:
    """The quick variant's experts are small; the path (streamed average, posterior scored one
    expert at a time in its stored bf16) is the full run's (docs/benchmarks.md)."""
    results = quick("average_large", tmp_path, plots=False)
    assert results["max_abs_error"] == 0
    assert sum(results["posterior_prior"]) == pytest.approx(1, abs=1e-3)
    assert results["posterior_seconds"] > 0 and results["posterior_peak_rss_gib"] > 0


def test_train(tmp_path: Path) -> None:
    results = quick("train", tmp_path)
    (row,) = results["rows"]
    assert row["elmtrain"]["tokens_per_second"] > 0 and row["hf_trainer"]["tokens_per_second"] > 0
    assert row["ratio"] == pytest.approx(
        row["elmtrain"]["tokens_per_second"] / row["hf_trainer"]["tokens_per_second"]
    )


def test_ensemble(tmp_path: Path) -> None:
    results = quick("ensemble", tmp_path)
    scoring = results["scoring_us_per_token"]
    assert all(v > 0 for v in scoring.values())
    assert results["scoring_ratio"] == pytest.approx(scoring["routed top-2"] / scoring["one model"])
    assert results["generation_ms_per_token"]["routed top-2"] > 0


def test_operator(tmp_path: Path) -> None:
    results = quick("operator", tmp_path, "--branches", "40")
    for name in ("elmforest", "minimal", "floor"):
        measured = results[name]
        assert measured["api_calls"]["jobs create"] >= 40
        assert 20 < measured["peak_rss_mb"] < 1000


def test_serve(tmp_path: Path) -> None:
    """The three endpoints under each load level answer every request with tokens."""
    corpus = write_domains(tmp_path / "corpus", ["cooking", "sailing"])
    for domain in ("cooking", "sailing"):
        (corpus / domain / "test.txt").write_text(domain_text(domain, 12, seed=2))
    results = quick("serve", tmp_path, "--corpus", str(corpus), "--domains", "cooking,sailing")
    (results,) = results["sizes"].values()
    endpoints = ("elmforest routed top-2", "elmforest one expert", "plain generate loop")
    assert set(results["rows"]) >= {
        f"{endpoint} ({dtype})" for endpoint in endpoints for dtype in results["dtypes"]
    }
    assert "float32" in results["dtypes"]
    for levels in results["rows"].values():
        assert [level["clients"] for level in levels] == [1, 4]
        for level in levels:
            assert level["failures"] == 0 and level["requests"] > 0
            assert level["tokens_per_second"] > 0 and level["p99_seconds"] >= level["p50_seconds"]
    assert results["ratio_routed_vs_plain"] > 0


def test_data(tmp_path: Path) -> None:
    """Three tokenizers measured on the same text; training from shards and from memory."""
    corpus = write_domains(tmp_path / "corpus", ["cooking", "sailing"])
    results = quick("data", tmp_path, "--corpus", str(corpus))
    tokenization = results["tokenization"]
    for tool in ("elmtrain", "datasets", "before"):
        row = tokenization[tool]
        assert row["mb_per_second"] == pytest.approx(row["text_mb"] / row["seconds"], rel=0.05)
        assert row["peak_rss_mb"] > 5
    assert tokenization["ratio_vs_before"] == pytest.approx(
        tokenization["elmtrain"]["mb_per_second"] / tokenization["before"]["mb_per_second"],
        rel=0.01,
    )
    rows = results["training"]["rows"]
    assert rows["sharded corpus"]["sequences"] > rows["small in-memory corpus"]["sequences"]
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["first_step_seconds"] > 0
        assert math.isfinite(row["loss"])


def test_cluster_scale(tmp_path: Path) -> None:
    """One assignment worker over two corpus sizes: both assigned, memory measured."""
    corpus = write_domains(tmp_path / "corpus", ["cooking", "sailing"])
    results = quick("cluster_scale", tmp_path, "--corpus", str(corpus), plots=False)
    small, big = results["rows"]
    assert big["bytes"] > 5 * small["bytes"]
    for row in (small, big):
        speed = row["bytes"] / 1e6 / row["seconds"]
        assert row["mb_per_second_per_core"] == pytest.approx(speed, rel=0.01)
        assert row["peak_rss_mb"] > 5


def test_cli(tmp_path: Path) -> None:
    """Every command measured, each exiting as it should (the bench checks the codes)."""
    corpus = write_domains(tmp_path / "corpus", ["cooking", "sailing"])
    results = quick("cli", tmp_path, "--corpus", str(corpus))
    rows = results["trees"]["this"]
    assert len(rows) == 5 and results["repeats"] == 3
    for row in rows.values():
        assert 0 < row["min_seconds"] <= row["median_seconds"]
        assert row["peak_rss_mb"] > 5
