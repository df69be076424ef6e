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


def quick(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
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
    assert plot.stat().st_size > 10_000  # a real figure, not an empty canvas
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["machine"]["cores"] >= 1
    return results


def test_btm_quality(tmp_path: Path) -> None:
    """On a synthetic corpus (the shared one is for the real run): every row for every domain."""
    corpus = write_domains(tmp_path / "corpus", ["cooking", "sailing", "finance", "poetry"])
    for domain in ("cooking", "sailing", "finance", "poetry"):
        (corpus / domain / "test.txt").write_text(domain_text(domain, 12, seed=2))
    results = quick(
        "btm_quality",
        tmp_path,
        "--corpus",
        str(corpus),
        "--domains",
        "cooking,sailing,finance",
        "--ood",
        "poetry",
    )
    ppl = results["main"]["perplexity"]
    assert set(ppl) == {
        "seed",
        "dense",
        "expert",
        "ensemble",
        "ensemble top-2",
        "ensemble routed top-2",
        "posterior average",
        "uniform average",
    }
    for row in ppl.values():
        assert set(row) == {"cooking", "sailing", "finance", "poetry"}
        assert all(v > 1 and math.isfinite(v) for v in row.values())
    # Trained experts are better than the seed on their own domains.
    assert all(ppl["expert"][d] < ppl["seed"][d] for d in ("cooking", "sailing", "finance"))
    assert len(results["orderings"]) == 4
    assert all(isinstance(c["holds"], bool) and c["detail"] for c in results["orderings"])
    assert set(results["sweep"]) == {"30%", "50%"}


def test_merge(tmp_path: Path) -> None:
    results = quick("merge", tmp_path)
    (row,) = results["rows"]
    assert row["checkpoints"] == 4
    assert row["max_abs_difference"] < 1e-5  # both tools computed the same average
    for tool in ("elmtrain", "mergekit"):
        assert row[tool]["seconds"] > 0 and row[tool]["peak_rss_mb"] > 5


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
