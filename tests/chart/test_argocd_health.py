"""The Argo CD health checks in docs/gitops, run by a real Lua interpreter (lupa).

Argo CD runs these scripts with ``obj`` set to the resource; they must map our statuses to
Progressing / Healthy / Degraded / Suspended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

GITOPS = Path(__file__).resolve().parents[2] / "docs" / "gitops"
PREFIX = "resource.customizations.health.btm.elmforest.io_"


def health(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return str(result["status"]), str(result["message"])


def forest(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "f", "generation": generation}}
    if status is not None:
        body["status"] = status
    return body


def ready(value: str, message: str = "") -> list[dict[str, str]]:
    return [{"type": "Ready", "status": value, "reason": "x", "message": message}]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (forest(None), "Progressing"),
        (
            forest({"phase": "Seeding", "observedGeneration": 1, "conditions": ready("False")}),
            "Progressing",
        ),
        (
            forest({"phase": "Ready", "observedGeneration": 1, "conditions": ready("True", "ok")}),
            "Healthy",
        ),
        (
            forest({"phase": "Ready", "observedGeneration": 1, "conditions": ready("True")}, 2),
            "Progressing",
        ),
        (
            forest(
                {"phase": "Failed", "observedGeneration": 1, "conditions": ready("False", "bad")}
            ),
            "Degraded",
        ),
    ],
)
def test_forest_health(obj: dict[str, Any], expected: str) -> None:
    status, _ = health((GITOPS / "health-elmforest.lua").read_text(), obj)
    assert status == expected


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("Pending", "Progressing"),
        ("Waiting", "Progressing"),
        ("Training", "Progressing"),
        ("Merged", "Healthy"),
        ("Failed", "Degraded"),
        ("Suspended", "Suspended"),
    ],
)
def test_branch_health(phase: str, expected: str) -> None:
    obj = forest(
        {
            "phase": phase,
            "observedGeneration": 1,
            "message": "m",
            "progress": {"summary": "5/10 (50%)"},
        }
    )
    status, message = health((GITOPS / "health-elmbranch.lua").read_text(), obj)
    assert status == expected
    assert message == f"{phase} 5/10 (50%): m"


def test_configmap_patch_embeds_the_scripts() -> None:
    patch = yaml.safe_load((GITOPS / "argocd-cm-patch.yaml").read_text())["data"]
    assert patch[PREFIX + "ElmForest"] == (GITOPS / "health-elmforest.lua").read_text()
    assert patch[PREFIX + "ElmBranch"] == (GITOPS / "health-elmbranch.lua").read_text()
