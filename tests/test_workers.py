"""``make test``'s two workers keep each module on one worker (its module fixtures built once)
and the cluster tier on one worker (one control plane): the split that xdist's own
``--dist loadgroup`` silently lost under pytest 9 (tests/harness/xdist_scopes.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.harness.xdist_scopes import ModuleScheduling

ROOT = Path(__file__).resolve().parent.parent


def test_a_module_is_one_unit_and_the_cluster_tier_is_one() -> None:
    scheduler = ModuleScheduling.__new__(ModuleScheduling)  # _split_scope reads no state
    cluster = {
        scheduler._split_scope("tests/cluster/test_crds.py::test_established"),
        scheduler._split_scope("tests/cluster/test_kueue.py::test_quota[gpu]"),
    }
    assert cluster == {"tests/cluster/"}
    modules = {
        scheduler._split_scope("tests/core/test_btm.py::test_posterior[a::b]"),
        scheduler._split_scope("tests/core/test_btm.py::TestAverage::test_weights"),
    }
    assert modules == {"tests/core/test_btm.py"}


def test_make_tests_workers_take_whole_modules() -> None:
    """The Makefile's own pytest options on two pure folders: every module runs on one worker,
    and both workers get work."""
    makefile = (ROOT / "Makefile").read_text()
    options = re.search(r"\$\(VENV\)/bin/pytest (-n 2 [^\n]*)", makefile)
    assert options, "make test runs pytest on two workers"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    folders = ["tests/core", "tests/planner"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *options.group(1).split(),
            "-v",
            "-p",
            "no:cacheprovider",
            *folders,
        ],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, module in re.findall(r"^\[(gw\d)\] .*? (tests/[^:]+)::", result.stdout, re.M):
        workers[module].add(worker)
    assert len(workers) >= 10, result.stdout[-3000:]
    split = {module: sorted(ws) for module, ws in workers.items() if len(ws) > 1}
    assert not split, f"modules split across workers: {split}"
    assert {w for ws in workers.values() for w in ws} == {"gw0", "gw1"}
