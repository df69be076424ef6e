"""The CRDs on the real API server: accepted, Established, and shown as docs/resources.md says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from elmforest.api import BRANCH, FOREST
from tests.cluster.validation_cases import branch, forest
from tests.harness.kubectl import Kube

pytestmark = pytest.mark.cluster
DOCS = Path(__file__).resolve().parents[2] / "docs" / "resources.md"


def test_crds_are_established_with_structural_schemas(installed_crds: Kube) -> None:
    for kind in (FOREST, BRANCH):
        crd = installed_crds.json("get", f"crd/{kind.crd_name}")
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True", conditions
        assert conditions["NamesAccepted"] == "True", conditions
        # A non-structural schema or a CEL rule over its cost budget shows up here.
        assert "NonStructuralSchema" not in conditions, conditions
        assert crd["status"]["acceptedNames"]["shortNames"] == [kind.short_name]


def _documented_columns(kind: str) -> list[str]:
    """'Columns: A, B, C (and D with `-o wide`)' from the kind's section of the docs."""
    section = DOCS.read_text().split(f"## {kind} (")[1].split("\n## ")[0]
    match = re.search(r"Columns: ([^.(]+?)\s*\(and (\w+) with `-o wide`\)", section, re.S)
    assert match, f"docs/resources.md: no column list for {kind}"
    columns = [c.strip() for c in match.group(1).replace("\n", " ").split(",")]
    wide = match.group(2)
    return ["Name", *columns[:-1], wide, columns[-1]]  # -o wide puts its extra before Age


def _header(output: str) -> list[str]:
    return [word.capitalize() for word in output.splitlines()[0].split()]


def test_kubectl_shows_what_the_docs_say(installed_crds: Kube) -> None:
    kube = installed_crds
    namespace = kube.namespace("printing")
    kube.apply([forest(), branch()], "-n", namespace)
    status = {
        "status": {
            "phase": "Training",
            "version": 1,
            "progress": {"step": 40, "totalSteps": 100, "summary": "40/100 (40%)"},
            "metrics": {"valPerplexityAfter": 123.4},
        }
    }
    kube.kubectl(
        "patch",
        "eb",
        "b1",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )

    both = kube.kubectl("get", "btm", "-n", namespace).stdout
    assert "elmforest.btm.elmforest.io/f1" in both and "elmbranch.btm.elmforest.io/b1" in both

    wide = kube.kubectl("get", "eb", "-o", "wide", "-n", namespace).stdout
    assert _header(wide) == [c.capitalize() for c in _documented_columns("ElmBranch")], wide
    row = wide.splitlines()[1].split()
    assert row[:7] == ["b1", "f1", "code", "Training", "40/100", "(40%)", "123.4"], wide
    forests = kube.kubectl("get", "ef", "-o", "wide", "-n", namespace).stdout
    assert _header(forests) == [c.capitalize() for c in _documented_columns("ElmForest")], forests

    explained = kube.kubectl("explain", "elmbranch.spec.init").stdout
    for field, description in (
        ("strategy", "seed, copy (one ELM), uniform (average of all), posterior (BTM default)"),
        ("copyFrom", "copy: the domain to copy"),
        ("topK", "posterior: keep the k most likely"),
        ("sampleSize", "sequences to estimate posterior"),
    ):
        assert re.search(rf"^\s+{field}\s+<", explained, re.M), explained
        assert description in " ".join(explained.split()), (field, explained)
    assert "posterior-weighted average" in explained  # the model's docstring, as description


def test_unset_trainer_fields_stay_unset_for_the_charts_defaults(installed_crds: Kube) -> None:
    """The API server fills schema defaults into objects a user sends; under a forest's
    ``trainer`` and ``storage`` that would override the chart's install-time defaults."""
    kube = installed_crds
    namespace = kube.namespace("defaults")
    body = forest()
    body["spec"]["trainer"] = {"queueName": "gpus"}
    stored = json.loads(
        kube.kubectl(
            "create",
            "--dry-run=server",
            "-o",
            "json",
            "-n",
            namespace,
            "-f",
            "-",
            stdin=json.dumps(body),
        ).stdout
    )
    assert stored["spec"]["trainer"] == {"queueName": "gpus"}
    assert stored["spec"]["storage"] == body["spec"]["storage"]
