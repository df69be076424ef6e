"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk, no binary).

Every rendered object validates against Kubernetes' OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail), every pod meets PSS "restricted" with images by digest, the RBAC
rules are exactly the operator's PERMISSIONS, and the values schema refuses bad values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from elmforest import chart as chart_files
from elmforest.adapters.kube import PERMISSIONS
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.defaults import Defaults
from elmforest.planner.policy import Policy
from tests.harness.pss import pod_spec_of, restricted_violations

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "elmforest"
KUBERNETES = "1.31"
DIGEST = "sha256:" + "ab" * 32
TRAINER = "registry.example.com/elmforest/trainer@" + DIGEST
VALUE_SETS: dict[str, dict[str, Any]] = {
    "cluster-wide": {"image": {"digest": DIGEST}},
    "namespaced": {"image": {"digest": DIGEST}, "watchNamespaces": ["team-a", "team-b"]},
    "everything": {
        "image": {"digest": DIGEST, "pullPolicy": "Always"},
        "logLevel": "debug",
        "resyncSeconds": 30,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["x"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "ml"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "trainer": {"image": TRAINER, "gpus": 8, "queueName": "team-a"},
        "storage": {"endpoint": "http://minio.minio:9000", "credentialsSecret": "s3"},
        "networkPolicy": {
            "enabled": True,
            "apiServer": {"cidrs": ["10.0.0.1/32"]},
            "storage": {"cidrs": ["10.96.12.7/32", "52.216.0.0/15"], "ports": [9000, 443]},
        },
        "policy": {"trainerImageRepositories": ["registry.example.com/"], "buckets": ["ml-*"]},
    },
    "no-metrics-own-account": {
        "image": {"digest": DIGEST},
        "metrics": {"enabled": False},
        "serviceAccount": {"create": False, "name": "existing"},
    },
}


def render(values: dict[str, Any], namespace: str = "elmforest") -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as loaded:
        manifests = loaded.render(values, name="elm", namespace=namespace)
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def crds() -> Iterator[dict[str, Any]]:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        yield yaml.safe_load(path.read_text())


def test_generated_files_are_current() -> None:
    """Schema, RBAC rules and CRDs come from the code (`elmforest chart --write`)."""
    for name, text in chart_files.files().items():
        assert (CHART / name).read_text() == text, f"{name} is stale: run elmforest chart --write"
    for path in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_lints_and_validates(name: str) -> None:
    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    objects = render(values)
    kinds = sorted(o["kind"] for o in objects)
    assert "Deployment" in kinds
    for obj in [*objects, *crds()]:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            # Not a Kubernetes type: check the parts that must agree with the Service.
            assert obj["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_meet_restricted_and_pin_images(name: str) -> None:
    pods = [spec for o in render(VALUE_SETS[name]) if (spec := pod_spec_of(o)) is not None]
    assert pods
    for pod in pods:
        assert restricted_violations(pod) == []


def test_deployment_shape() -> None:
    (deployment,) = [o for o in render(VALUE_SETS["everything"]) if o["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    container = spec["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["args"][:2] == ["--log-level=debug", "operator"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert '"queueName":"team-a"' in env["ELMFOREST_TRAINER_DEFAULTS"]
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert "checksum/crds" in spec["template"]["metadata"]["annotations"]


def test_two_replicas_one_leader_by_default() -> None:
    objects = render(VALUE_SETS["cluster-wide"])
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-election" in container["args"]
    assert "--lease-duration=15" in container["args"]
    names = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert names["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (pdb,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # One replica without election: the old shape, no PDB (it would block every drain).
    single = render(
        {**VALUE_SETS["cluster-wide"], "replicas": 1, "leaderElection": {"enabled": False}}
    )
    (deployment,) = [o for o in single if o["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert (
        "--leader-election" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert not [o for o in single if o["kind"] in ("PodDisruptionBudget", "Role")]
    with pytest.raises(helm.HelmError, match=r"needs leaderElection\.enabled"):
        render({**VALUE_SETS["cluster-wide"], "leaderElection": {"enabled": False}})


def test_chart_trainer_defaults_reach_the_operator() -> None:
    """The JSON the chart renders is what the operator parses into a forest's defaults."""
    (deployment,) = [o for o in render(VALUE_SETS["everything"]) if o["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value", "")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    spec = ElmForestSpec.model_validate({"storage": {"uri": "s3://bucket/f"}})
    filled = Defaults.from_env(env).apply(spec)
    assert (filled.trainer.image, filled.trainer.gpus) == (TRAINER, 8)
    assert filled.trainer.tolerations[0].key == "nvidia.com/gpu"  # from values.yaml
    assert filled.storage.credentials_secret == "s3"


def rules_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: rule[k] for k in ("apiGroups", "resources", "verbs")} for rule in obj["rules"]]


def test_rbac_is_exactly_the_operators_calls() -> None:
    expected = [
        {"apiGroups": [p.group], "resources": [p.resource], "verbs": list(p.verbs)}
        for p in PERMISSIONS
    ]
    leases = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"]}]
    leases[0]["verbs"] = ["get", "create", "update"]
    cluster = render(VALUE_SETS["cluster-wide"])
    (role,) = [o for o in cluster if o["kind"] == "ClusterRole"]
    assert rules_of(role) == expected
    # The only namespaced Role of a cluster-wide install: the Lease, in the release's namespace.
    (lease_role,) = [o for o in cluster if o["kind"] == "Role"]
    assert lease_role["metadata"]["namespace"] == "elmforest"
    assert rules_of(lease_role) == leases
    namespaced = render(VALUE_SETS["namespaced"])
    roles = [
        o
        for o in namespaced
        if o["kind"] == "Role" and not o["metadata"]["name"].endswith("-leader")
    ]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(rules_of(r) == expected for r in roles)
    assert not [o for o in namespaced if o["kind"].startswith("Cluster")]
    (deployment,) = [o for o in namespaced if o["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    for obj in [*cluster, *namespaced]:
        for rule in obj.get("rules", []):
            assert "*" not in [*rule["apiGroups"], *rule["resources"], *rule["verbs"]]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"image": {"digest": "latest"}}, "digest"),
        ({"imgae": {"digest": DIGEST}}, "imgae"),
        ({"trainer": {"gpus": -1}}, "gpus"),
        ({"trainer": {"image": "registry.example.com/trainer:latest"}}, "image"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"logLevel": "loud"}, "logLevel"),
        ({"metrics": {"port": "9090"}}, "port"),
        ({"storage": {"uri": "s3://bucket"}}, "uri"),
    ],
)
def test_schema_rejects_bad_values_clearly(values: dict[str, Any], named: str) -> None:
    with helm.Chart.load(str(CHART)) as loaded, pytest.raises(helm.HelmError) as caught:
        loaded.validate_schema(values)
    assert named in str(caught.value)


def test_missing_digest_is_a_clear_error() -> None:
    with pytest.raises(helm.HelmError, match=r"image.digest is required"):
        render({})


def test_the_operators_network_policy_allows_only_what_it_needs() -> None:
    assert not [o for o in render(VALUE_SETS["cluster-wide"]) if o["kind"] == "NetworkPolicy"]
    (policy,) = [o for o in render(VALUE_SETS["everything"]) if o["kind"] == "NetworkPolicy"]
    (deployment,) = [o for o in render(VALUE_SETS["everything"]) if o["kind"] == "Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert "from" not in ingress and {p["port"] for p in ingress["ports"]} == {8080, 9090}
    egress = policy["spec"]["egress"]
    assert [p["port"] for p in egress[0]["ports"]] == [53, 53] and "to" not in egress[0]
    blocks = [
        (sorted(b["ipBlock"]["cidr"] for b in r["to"]), [p["port"] for p in r["ports"]])
        for r in egress[1:]
    ]
    assert blocks == [
        (["10.0.0.1/32"], [443, 6443]),
        (["10.96.12.7/32", "52.216.0.0/15"], [9000, 443]),
    ]


def test_policy_values_reach_the_operator() -> None:
    (deployment,) = [o for o in render(VALUE_SETS["everything"]) if o["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value", "")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    policy = Policy.from_env(env)
    assert policy.images == ("registry.example.com/",) and policy.buckets == ("ml-*",)
    assert policy.operator_identity is False  # cluster-wide, and the value left null
    namespaced = [o for o in render(VALUE_SETS["namespaced"]) if o["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value", "")
        for e in namespaced[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert Policy.from_env(env).operator_identity is True
