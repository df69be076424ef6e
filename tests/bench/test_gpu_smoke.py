"""``bench/gpu``'s steps at their ``--smoke`` sizes on the CPU, so the GPU script does not rot
between the rare sessions that are lent a GPU (docs/benchmarks.md, GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def smoke(module: str, out: Path, *extra: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_mfu_rows_train_the_same_model(tmp_path: Path) -> None:
    results = smoke("bench.gpu.mfu", tmp_path / "mfu.json", "--rows", "ddp,fsdp")
    rows = {row["row"]: row for row in results["rows"]}
    assert set(rows) == {"ddp", "fsdp"}, rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["tokens_per_second"] > 0 and row["timed_steps"] > 0
        assert row["flops_per_token"] > 6 * row["matmul_weights"]
    # One process, one rank: both strategies see the same model and data.
    assert rows["ddp"]["loss_first_mark"] == pytest.approx(rows["fsdp"]["loss_first_mark"], 1e-4)


def test_serve_answers_32_clients(tmp_path: Path) -> None:
    results = smoke("bench.gpu.serve", tmp_path / "serve.json")
    for levels in results["rows"].values():
        top = levels[-1]
        assert top["clients"] == 32 and top["failures"] == 0 and top["tokens"] > 0, top
