"""The committed CRD YAML is exactly what the models generate, and is a structural schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from elmforest.api import BRANCH, CLUSTER_SET, FOREST, crds
from elmforest.api.clusterset import ElmClusterSetSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(crds.files()))
def test_committed_crds_match_the_models(name: str) -> None:
    committed = (ROOT / "crds" / name).read_text()
    assert committed == crds.files()[name], "run: elmforest crds --write crds/"


def _walk(node: dict[str, Any], path: str) -> list[str]:
    problems = []
    typed = (
        "type" in node
        or node.get("x-kubernetes-int-or-string")
        or node.get("x-kubernetes-preserve-unknown-fields")
    )
    if not typed:
        problems.append(f"{path}: no type")
    if "$ref" in node or ("anyOf" in node and not node.get("x-kubernetes-int-or-string")):
        problems.append(f"{path}: not structural")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties false")
    for key, sub in node.get("properties", {}).items():
        problems += _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        problems += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _walk(node["additionalProperties"], f"{path}{{}}")
    return problems


@pytest.mark.parametrize("kind", [FOREST, BRANCH, CLUSTER_SET], ids=lambda k: k.kind)
def test_schema_is_structural_with_rules_and_columns(kind: crds.Kind) -> None:
    crd = yaml.safe_load(crds.render(kind))
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema, kind.kind) == []
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["btm"]
    assert crd["spec"]["names"]["shortNames"] == [kind.short_name]
    rule = schema["x-kubernetes-validations"][0]["rule"]
    assert rule.startswith("size(self.metadata.name) <= 63 && self.metadata.name.matches")
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert "Phase" in columns and "Age" in columns


def test_branch_schema_bounds_and_immutability() -> None:
    spec = yaml.safe_load(crds.render(BRANCH))["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]
    for field in ("forest", "domain"):
        rules = spec["properties"][field]["x-kubernetes-validations"]
        assert {"rule": "self == oldSelf", "message": "is immutable once set"} in rules
        assert spec["properties"][field]["maxLength"] <= 253
    assert spec["properties"]["domain"]["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    assert spec["properties"]["data"]["properties"]["train"]["maxItems"] == 64
    training = spec["properties"]["training"]["properties"]
    assert training["steps"]["minimum"] == 0 and "default" not in training["steps"]
    assert spec["properties"]["init"]["x-kubernetes-validations"][0]["rule"].startswith(
        "self.strategy != 'copy'"
    )


def test_cluster_set_schema_rules_match_the_model() -> None:
    """ElmClusterSet (issue 30, point 1): the spec's fields, bounds and CEL rules, each rule
    enforced by the model too (local mode has no API server)."""
    crd = yaml.safe_load(crds.render(CLUSTER_SET))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert set(spec["required"]) == {"forest", "data", "clusters"}
    fields = spec["properties"]
    assert {"sample", "features", "balance", "validationFraction", "branchTemplate"} <= set(fields)
    assert {"rule": "self == oldSelf", "message": "is immutable once set"} in fields["forest"][
        "x-kubernetes-validations"
    ]
    assert fields["data"]["maxItems"] == 64 and fields["data"]["minItems"] == 1
    assert fields["validationFraction"]["default"] == 0.02
    assert fields["validationFraction"]["exclusiveMaximum"] is True
    template = fields["branchTemplate"]["properties"]
    assert {"init", "training", "trainer", "retention"} <= set(template)
    assert spec["x-kubernetes-validations"][0]["rule"] == "self.sample >= self.clusters"
    features = fields["features"]
    assert features["x-kubernetes-validations"][0]["rule"] == "self.ngramMin <= self.ngramMax"
    phases = schema["properties"]["status"]["properties"]["phase"]["enum"]
    assert {"Fitting", "Assigning", "Branching", "Ready"} <= set(phases)
    assert crd["spec"]["names"]["shortNames"] == ["ecs"]

    good = {"forest": "web", "data": ["s3://b/crawl/"], "clusters": 8}
    parsed = ElmClusterSetSpec.model_validate(good)
    assert parsed.sample == 100_000 and parsed.balance and parsed.features.ngram_max == 1
    bad = {
        "sample": {**good, "sample": 4},
        "ngramMin": {**good, "features": {"ngramMin": 2, "ngramMax": 1}},
        "data": {**good, "data": []},
        "validationFraction": {**good, "validationFraction": 0.5},
    }
    for what, body in bad.items():
        with pytest.raises(ValueError, match=what):
            ElmClusterSetSpec.model_validate(body)
