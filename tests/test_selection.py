"""Selecting tests never pays for what is deselected: ``-m "not cluster"`` (and ``make
test-fast``, ``-m "not heavy"``) never start a Go build, and the cluster tier's tests carry
both marks without their modules asking (tests/conftest.py adds them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KUEUE_TESTS = "tests/cluster/test_kueue.py"  # needs the control plane and Kueue, both Go builds


def _collect(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Collect with a `go` on PATH that records each call and fails, and an empty build cache:
    any build (or even a `go env` for a cache key) leaves a line in the record."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    record = tmp_path / "go-calls"
    (fake / "go").write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit 1\n')
    (fake / "go").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "ELMFOREST_KUBE_CACHE": str(tmp_path / "empty-cache"),
    }
    env.pop("ELMFOREST_REQUIRE_CLUSTER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        check=False,  # the exit status is what the tests judge
        capture_output=True,
        text=True,
        timeout=300,
    )
    calls = record.read_text().splitlines() if record.exists() else []
    return result, calls


def test_deselecting_the_cluster_tier_never_starts_a_go_build(tmp_path: Path) -> None:
    result, calls = _collect(tmp_path, "-m", "not cluster", KUEUE_TESTS)
    assert result.returncode == 5, result.stdout + result.stderr  # 5: every test deselected
    assert calls == []
    result, calls = _collect(tmp_path, "-m", "not heavy", KUEUE_TESTS)
    assert result.returncode == 5, result.stdout  # the root conftest marked them all heavy
    assert calls == [], "make test-fast started a Go build"


def test_the_go_build_check_would_see_a_build(tmp_path: Path) -> None:
    """The control: selecting the same tests does call `go`."""
    _, calls = _collect(tmp_path, KUEUE_TESTS)
    assert calls, "the fake go was never called: the test above would prove nothing"
