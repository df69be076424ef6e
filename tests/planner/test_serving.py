"""``spec.serving``: the forest's Deployment and Service, planned purely, and its status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from elmcore.manifest import ArtifactEntry, Manifest
from elmcore.records import ServingRecord
from elmforest.api.forest import ElmForestSpec, ElmForestStatus
from elmforest.planner.actions import ApplyObject, DeleteObject, PatchStatus
from elmforest.planner.forest import ForestInput, plan_forest
from elmforest.planner.observed import SPEC_HASH, OwnedObject, StorageView
from elmforest.planner.serving import KINDS, serving_name
from tests.harness.pss import restricted_violations

IMAGE = "r.example/t@sha256:" + "b" * 64
READY = Manifest(
    revision=7,
    tokenizer=ArtifactEntry(path="tokenizer", sha256="a" * 64),
    seed=ArtifactEntry(path="seed", sha256="b" * 64),
)


def spec(serving: dict[str, Any] | None = None) -> ElmForestSpec:
    body: dict[str, Any] = {
        "storage": {"uri": "s3://bkt/f", "credentialsSecret": "keys"},
        "trainer": {"image": IMAGE},
        "tokenizer": {"from": "s3://bkt/tok"},
        "seed": {"data": ["s3://bkt/mix.txt"]},
    }
    if serving is not None:
        body["serving"] = serving
    return ElmForestSpec.model_validate(body)


def plan(
    forest_spec: ElmForestSpec,
    observed: dict[str, OwnedObject] | None = None,
    records: list[ServingRecord] | None = None,
    manifest: Manifest = READY,
) -> tuple[list[Any], ElmForestStatus]:
    result = plan_forest(
        ForestInput(
            name="books",
            namespace="ns",
            uid="uid-1",
            generation=1,
            spec=forest_spec,
            status=ElmForestStatus(),
            storage=StorageView(manifest=manifest),
            serving=observed or {},
            serving_records=records or [],
        )
    )
    patches = [a.status for a in result.actions if isinstance(a, PatchStatus)]
    status = ElmForestStatus.model_validate(patches[-1]) if patches else ElmForestStatus()
    return result.actions, status


def applied(actions: list[Any]) -> dict[str, dict[str, Any]]:
    return {a.body["kind"]: a.body for a in actions if isinstance(a, ApplyObject)}


def test_unserved_forests_get_no_servers() -> None:
    actions, status = plan(spec())
    assert not applied(actions) and status.serving is None


def test_a_ready_forest_gets_a_restricted_deployment_and_a_service() -> None:
    actions, status = plan(spec({"replicas": 2, "topK": 3, "port": 9000}))
    bodies = applied(actions)
    deployment, service = bodies["Deployment"], bodies["Service"]
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["command"] == ["elmtrain"]
    args = container["args"]
    assert args[:3] == ["serve", "--forest", "s3://bkt/f"]
    assert args[args.index("--top-k") + 1] == "3" and args[args.index("--port") + 1] == "9000"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "keys"
    assert env["ELMTRAIN_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert deployment["spec"]["replicas"] == 2
    for body in (deployment, service):
        (owner,) = body["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("ElmForest", "books", "uid-1")
    # The Service selects exactly the Deployment's pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["port"] == 9000
    assert status.serving is not None
    assert status.serving.endpoint == "http://books-serve.ns.svc:9000/v1"
    assert status.serving.model == "books" and status.serving.revision is None


def test_a_steady_forest_writes_nothing_and_an_edit_reapplies_what_changed() -> None:
    first = applied(plan(spec({"topK": 2}))[0])
    observed = {
        kind: OwnedObject(
            kind, body["metadata"]["name"], body["metadata"]["annotations"][SPEC_HASH]
        )
        for kind, body in first.items()
    }
    assert applied(plan(spec({"topK": 2}), observed)[0]) == {}
    assert set(applied(plan(spec({"topK": 4}), observed)[0])) == {"Deployment"}


def test_unset_serving_deletes_the_servers() -> None:
    observed = {k: OwnedObject(k, "books-serve", "h") for k in KINDS}
    actions, status = plan(spec(), observed)
    deleted = {(a.kind, a.name) for a in actions if isinstance(a, DeleteObject)}
    assert deleted == {(kind, "books-serve") for kind in KINDS}
    assert status.serving is None


def test_ingress_is_the_forests_namespace_unless_allow_from_says() -> None:
    policy = applied(plan(spec({"port": 9000}))[0])["NetworkPolicy"]
    deployment = applied(plan(spec({"port": 9000}))[0])["Deployment"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # every pod of the forest's namespace
    assert rule["ports"] == [{"port": 9000, "protocol": "TCP"}]
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "eval"}}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gw"}},
            "podSelector": {
                "matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}]
            },
        },
    ]
    (rule,) = applied(plan(spec({"allowFrom": peers}))[0])["NetworkPolicy"]["spec"]["ingress"]
    assert [_without_empty(peer) for peer in rule["from"]] == peers


def _without_empty(node: Any) -> Any:
    """A peer as the user wrote it (the planner may spell out empty defaults)."""
    if isinstance(node, dict):
        return {k: _without_empty(v) for k, v in node.items() if v not in ({}, [])}
    if isinstance(node, list):
        return [_without_empty(v) for v in node]
    return node


def test_a_disruption_budget_only_with_more_than_one_replica() -> None:
    two = applied(plan(spec({"replicas": 2}))[0])
    budget = two["PodDisruptionBudget"]
    assert budget["spec"]["maxUnavailable"] == 1
    labels = two["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "PodDisruptionBudget" not in applied(plan(spec({"replicas": 1}))[0])
    # Scaled down to one: the budget goes (it would block every drain of that node).
    observed = {
        kind: OwnedObject(
            kind, body["metadata"]["name"], body["metadata"]["annotations"][SPEC_HASH]
        )
        for kind, body in two.items()
    }
    actions, _ = plan(spec({"replicas": 1}), observed)
    deleted = [(a.kind, a.name) for a in actions if isinstance(a, DeleteObject)]
    assert deleted == [("PodDisruptionBudget", "books-serve")]


def test_servers_get_default_requests_and_their_own_credentials() -> None:
    container = applied(plan(spec({}))[0])["Deployment"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    sized = spec({"resources": {"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}}})
    container = applied(plan(sized)[0])["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    resources = container["resources"]  # the user's value wins; the other default stays
    assert str(resources["requests"]["cpu"]) == "4" and resources["requests"]["memory"] == "2Gi"
    assert resources["limits"] == {"memory": "8Gi"}
    # The trainer Jobs' Secret by default; spec.serving.credentialsSecret for the servers.
    for serving, secret in (({}, "keys"), ({"credentialsSecret": "read-only"}, "read-only")):
        pod = applied(plan(spec(serving))[0])["Deployment"]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == secret


def test_an_allow_from_entry_needs_a_selector() -> None:
    with pytest.raises(ValueError, match="needs namespaceSelector, podSelector or both"):
        spec({"allowFrom": [{}]})


def test_no_servers_before_the_seed_exists() -> None:
    actions, _ = plan(spec({}), manifest=Manifest())
    assert not applied(actions)


def test_status_reports_the_oldest_revision_live_replicas_serve() -> None:
    now = datetime.now(UTC)

    def record(name: str, revision: int | None, age: float, message: str = "") -> ServingRecord:
        at = (now - timedelta(seconds=age)).isoformat(timespec="seconds")
        return ServingRecord(replica=name, revision=revision, message=message, updated_at=at)

    records = [
        record("a", 7, 10),
        record("b", 6, 30),
        record("gone", 2, 3600),  # a pod that went away long ago
        record("c", None, 5, "loading"),
    ]
    observed = {"Deployment": OwnedObject("Deployment", "books-serve", "x", ready_replicas=2)}
    _, status = plan(spec({}), observed, records)
    assert status.serving is not None
    assert status.serving.revision == 6 and status.serving.replicas == 2
    assert status.serving.message == "loading"


@pytest.mark.parametrize("forest", ["9lives", "a.b.c", "x" * 253])
def test_names_are_valid_service_names(forest: str) -> None:
    name = serving_name(forest)
    assert len(name) <= 63 and name[0].isalpha() and "." not in name
    assert name == serving_name(forest)


def test_an_api_key_secret_is_mounted_and_passed_to_the_server() -> None:
    deploy = applied(plan(spec({"apiKeySecret": "endpoint-keys"}))[0])["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "endpoint-keys"
    assert volume["secret"]["items"] == [{"key": "api-keys", "path": "api-keys"}]
    assert volume["secret"]["defaultMode"] == 0o440  # the pod's group (fsGroup) reads it
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] is True
    args = container["args"]
    assert args[args.index("--api-key-file") + 1] == f"{mount['mountPath']}/api-keys"
    assert restricted_violations(pod) == []
    # Without the field: no flag, no volume (an open endpoint, as before).
    plain = applied(plan(spec({}))[0])["Deployment"]
    assert "--api-key-file" not in plain["spec"]["template"]["spec"]["containers"][0]["args"]


def test_excluded_experts_are_passed_to_the_server() -> None:
    """spec.serving.excludeExperts: the server's --exclude-experts, a name per argument
    (argparse reads them up to the next flag)."""
    deploy = applied(plan(spec({"excludeExperts": ["legal", "code"]}))[0])["Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    at = args.index("--exclude-experts")
    assert args[at + 1 : at + 3] == ["legal", "code"]
    assert at + 3 == len(args) or args[at + 3].startswith("--")
    plain = applied(plan(spec({}))[0])["Deployment"]
    assert "--exclude-experts" not in plain["spec"]["template"]["spec"]["containers"][0]["args"]


def test_local_serving_keeps_the_opted_out_experts_out() -> None:
    """``elmforest serve -f``: spec.serving.excludeExperts reaches the local server too."""
    from elmforest.local.commands import serve_argv

    argv = serve_argv("books", spec({"excludeExperts": ["legal"]}), "127.0.0.1", 8000, 2)
    assert argv[argv.index("--exclude-experts") + 1 :] == ["legal"]
    assert "--exclude-experts" not in serve_argv("books", spec(), "127.0.0.1", 8000, 2)
