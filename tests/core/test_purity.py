"""The shared contracts import neither torch, kopf nor boto3 (DESIGN: pure BTM logic)."""

from __future__ import annotations

import subprocess
import sys

PURE = [
    "elmcore.btm",
    "elmcore.manifest",
    "elmcore.layout",
    "elmcore.names",
    "elmcore.uris",
    "elmcore.records",
    "elmcore.errors",
    "elmcore.config",
    "elmcore.lineage",
    "elmcore.priors",
    "elmcore.sharding",
    "elmforest.planner.branch",
    "elmforest.planner.forest",
    "elmforest.planner.clusterset",
    "elmforest.planner.cluster_steps",
    "elmforest.api.crds",
]


def test_pure_modules_import_no_heavy_stack() -> None:
    code = (
        f"import sys; import {', '.join(PURE)}; "
        "bad = [m for m in ('torch', 'kopf', 'boto3', 'transformers', 'kubernetes') "
        "if m in sys.modules]; print(bad); raise SystemExit(1 if bad else 0)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
