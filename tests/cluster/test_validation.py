"""Every validation the CRDs promise, through the real API server and through local mode.

Each case is applied as a user does (``kubectl apply --server-side --validate=strict``, a dry
run on the server) and loaded by ``elmforest up``'s loader; both must accept it, or both must
refuse it naming the same field, and the server's words must be what docs and users expect.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from elmforest.api.immutable import changed_immutable_fields
from elmforest.local import resources
from elmforest.local.resources import ManifestError
from tests.cluster.validation_cases import CASES, Case, forest
from tests.harness.kubectl import Kube, documents

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def namespace(installed_crds: Kube) -> str:
    return installed_crds.namespace("validation")


def _renamed(body: dict[str, Any], suffix: str) -> dict[str, Any]:
    """Updates need a stored object of their own: give each case's pair a unique name."""
    name = body["metadata"]["name"]
    if name in ("f1", "b1", "s1"):
        return {**body, "metadata": {**body["metadata"], "name": f"{name}-{suffix}"}}
    return body


def server_verdicts(kube: Kube, namespace: str, case: Case) -> dict[str, tuple[bool, str]]:
    """The API server's answer to each way a user sends the object (a dry run: nothing stays).

    ``create --validate=strict`` (field validation Strict: unknown fields are errors) and
    ``apply --server-side`` (GitOps tools' way: the typed patch refuses unknown fields and wrong
    types before validation); an update is applied server-side over the stored object.
    """
    flags = ("--validate=strict", "-n", namespace, "--dry-run=server")
    if case.before is not None:
        suffix = uuid.uuid4().hex[:6]
        kube.apply(_renamed(case.before, suffix), "-n", namespace)
        result = kube.apply(_renamed(case.body, suffix), *flags, check=False)
        return {"apply": (result.returncode == 0, result.stderr + result.stdout)}
    verdicts = {}
    for verb in ("create", "apply"):
        if verb == "create":
            result = kube.kubectl(
                "create", "-f", "-", *flags, stdin=documents(case.body), check=False
            )
        else:
            result = kube.apply(case.body, *flags, check=False)
        verdicts[verb] = (result.returncode == 0, result.stderr + result.stdout)
    return verdicts


def local_verdict(tmp_path: Path, case: Case) -> tuple[bool, str]:
    """What ``elmforest up -f`` says of the same YAML (updates: against the stored object)."""

    def load(body: dict[str, Any], name: str) -> resources.Declaration:
        folder = tmp_path / name
        folder.mkdir()
        objects = [body] if body["kind"] == "ElmForest" else [forest(body["spec"]["forest"]), body]
        (folder / "objects.yaml").write_text(documents(objects))
        return resources.load([folder])

    try:
        after = load(case.body, "after")
        if case.before is None:
            return True, ""
        before = load(case.before, "before")
    except ManifestError as error:
        return False, str(error)
    kinds = {"ElmForest": "forests", "ElmBranch": "branches", "ElmClusterSet": "cluster_sets"}
    kind = kinds[case.body["kind"]]
    name = case.body["metadata"]["name"]
    old, new = getattr(before, kind)[name].spec, getattr(after, kind)[name].spec
    changed = changed_immutable_fields(old, new)
    return not changed, ", ".join(changed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api_server_and_local_mode_agree(
    case: Case, installed_crds: Kube, namespace: str, tmp_path: Path
) -> None:
    verdicts = server_verdicts(installed_crds, namespace, case)
    local_ok, local_says = local_verdict(tmp_path, case)
    expected = not case.field
    for verb, (server_ok, server_says) in verdicts.items():
        assert server_ok == expected, f"API server ({verb}): {server_says}"
    assert local_ok == expected, f"local mode: {local_says}"
    if expected:
        return
    # The words a user sees: `kubectl create`'s validation message (updates: apply's).
    shown = verdicts.get("create", verdicts.get("apply"))
    assert shown is not None and case.server_says in shown[1], shown
    for _, server_says in verdicts.values():
        assert case.field.split("[")[0] in server_says, server_says
    assert case.field in local_says, local_says


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_local_mode_alone(case: Case, tmp_path: Path) -> None:
    """Local mode's half of the table, which needs no Go (runs where the cluster tier cannot)."""
    ok, says = local_verdict(tmp_path, case)
    assert ok == (not case.field), says
    assert case.field in says


def test_every_cel_rule_is_in_the_table() -> None:
    """A new CEL rule needs a case (and so a local-mode counterpart) before it ships."""
    from elmforest.api import crds

    def rules(node: Any) -> list[str]:
        found: list[str] = []
        if isinstance(node, dict):
            found += [r["message"] for r in node.get("x-kubernetes-validations", [])]
            for value in node.values():
                found += rules(value)
        elif isinstance(node, list):
            for value in node:
                found += rules(value)
        return found

    promised = {m for text in crds.files().values() for m in rules(yaml.safe_load(text))}
    untested = {m for m in promised if not any(c.field and c.server_says in m for c in CASES)}
    assert not untested, untested
