"""The operator as the chart's ServiceAccount: RBAC enforced by the API server, least privilege.

The operator runs here as a process (no kubelet runs its pod) with a token from the
TokenRequest API for the chart's ServiceAccount, the args and env of the chart's Deployment.
It reconciles forests and a branch to created Jobs, serves a forest (Deployment, Service,
NetworkPolicy and, with two replicas, a PodDisruptionBudget, which goes at one replica) and
stops serving it, supersedes a Job, deletes a branch, generates a cluster set's branches and
deletes one of them, and deletes the forests. The API server's
audit log then shows every request it made: none was refused, and every rule of the chart's
Role was used by some request (least privilege).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.cluster.chart_operator import operator_command, token_kubeconfig
from tests.cluster.conftest import Release, tiny_forest
from tests.harness.kubectl import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def operator(
    kube: Kube, release: Release, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The chart's operator container, run as a process with the chart's identity."""
    args, env = operator_command(kube, release)
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "elmforest", *args],
            env={**os.environ, **env, "KUBECONFIG": str(token_kubeconfig(kube, release, tmp_path))},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _upload(folder: Path, endpoint: str, bucket: str, prefix: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def _jobs(kube: Kube, namespace: str, selector: str) -> list[str]:
    items = kube.json("get", "jobs", "-n", namespace, "-l", selector)["items"]
    return sorted(
        j["metadata"]["name"] for j in items if not j["metadata"].get("deletionTimestamp")
    )


def _names(kube: Kube, namespace: str, kind: str) -> list[str]:
    items = kube.json("get", kind, "-n", namespace)["items"]
    return sorted(
        i["metadata"]["name"] for i in items if not i["metadata"].get("deletionTimestamp")
    )


def _cluster_set(bucket: str) -> dict[str, Any]:
    return {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmClusterSet",
        "metadata": {"name": "topics"},
        "spec": {
            "forest": "seeded",
            "data": [f"s3://{bucket}/data/code.txt"],
            "clusters": 2,
            "sample": 10,
            "parallelism": 1,
        },
    }


def _assigned(endpoint: str, bucket: str, body: dict[str, Any], k: int, scratch: Path) -> None:
    """A set version's files as its fit and assignment Jobs leave them: the committed
    clusterer (its marker is what the operator reads) and the one worker's record."""
    from elmcore import layout
    from elmcore.records import AssignmentRecord
    from elmcore.storage import S3Credentials, open_storage
    from elmcore.storage.commit import commit_dir
    from elmforest.api.clusterset import ElmClusterSetSpec
    from elmforest.planner.cluster_steps import storage_name

    spec = ElmClusterSetSpec.model_validate({**body["spec"], "clusters": k})
    key = storage_name(body["metadata"]["name"], spec)
    storage = open_storage(
        f"s3://{bucket}/forests/seeded",
        endpoint=endpoint,
        region="us-east-1",
        credentials=S3Credentials("testing", "testing"),
    )
    folder = scratch / f"clusterer-{key}"
    folder.mkdir()
    (folder / "clusterer.json").write_text("{}")
    sha = commit_dir(storage, folder, layout.clusterer(key))
    record = AssignmentRecord(
        clusterer=sha, index=0, count=1, train=[3] * k, valid=[1] * k, files=[]
    )
    storage.write_bytes(layout.cluster_assignment(key, 0), record.model_dump_json().encode())


def _audited(kube: Kube, user: str) -> list[dict[str, Any]]:
    assert kube.plane is not None
    records = []
    for record in kube.plane.audit_records():
        if record.get("user", {}).get("username") == user and "objectRef" in record:
            records.append(record)
    return records


def test_operator_as_its_service_account_is_least_privilege(
    kube: Kube,
    installed_crds: Kube,
    release: Release,
    operator: tuple[subprocess.Popen[bytes], Path],
    s3_endpoint: str,
    s3_bucket: str,
    seeded_forest: Path,
    tmp_path: Path,
) -> None:
    process, log = operator
    ns = release.watched

    def wait(what: str, check: Callable[[], Any]) -> Any:
        def alive() -> str | None:
            if process.poll() is None:
                return None
            return f"the operator exited:\n{log.read_text()[-5000:]}"

        return wait_for(what, check, alive=alive)

    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    }
    _upload(seeded_forest, s3_endpoint, s3_bucket, "forests/seeded")
    seeded = tiny_forest("seeded", s3_bucket, s3_endpoint)
    # Two replicas (a PodDisruptionBudget), ingress from one labelled namespace, credentials
    # of their own for the servers.
    seeded["spec"]["serving"] = {
        "replicas": 2,
        "credentialsSecret": "serve-creds",
        "allowFrom": [{"namespaceSelector": {"matchLabels": {"team": "eval"}}}],
        "apiKeySecret": "serve-keys",
        "excludeExperts": ["legal"],
    }
    kube.apply([secret, tiny_forest("fresh", s3_bucket, s3_endpoint), seeded], "-n", ns)

    # A new forest starts its tokenizer Job; a forest whose seed is in storage becomes Ready.
    wait("the tokenizer Job", lambda: _jobs(kube, ns, "btm.elmforest.io/forest=fresh"))
    wait(
        "the seeded forest Ready",
        lambda: (
            kube.json("get", "ef", "seeded", "-n", ns).get("status", {}).get("phase") == "Ready"
        ),
    )
    branch = {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmBranch",
        "metadata": {"name": "seeded-code"},
        "spec": {
            "forest": "seeded",
            "domain": "code",
            "data": {"train": [f"s3://{s3_bucket}/data/code.txt"]},
            "training": {"steps": 10},
            # Deleting its files needs the operator's finalizer from the first Job on.
            "retention": "Delete",
        },
    }
    # Serving: a Deployment and a Service, applied server-side; the pod is admitted as
    # restricted (Pending: no node here).
    serve = "btm.elmforest.io/role=serve"
    wait(
        "the forest's server pod", lambda: kube.json("get", "pods", "-n", ns, "-l", serve)["items"]
    )
    services = kube.json("get", "services", "-n", ns, "-l", serve)["items"]
    assert [s["metadata"]["name"] for s in services] == ["seeded-serve"]
    # What the API server stored: the NetworkPolicy, the budget, the servers' own Secret.
    policy = wait(
        "the servers' NetworkPolicy",
        lambda: kube.json("get", "networkpolicies", "-n", ns, "-l", serve)["items"],
    )[0]
    assert policy["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "eval"}}}
    ]
    assert policy["spec"]["podSelector"]["matchLabels"]["btm.elmforest.io/role"] == "serve"
    budget = wait(
        "the servers' PodDisruptionBudget",
        lambda: kube.json("get", "poddisruptionbudgets", "-n", ns, "-l", serve)["items"],
    )[0]
    assert budget["spec"]["maxUnavailable"] == 1
    pod = kube.json("get", "deployment", "seeded-serve", "-n", ns)["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "serve-creds"
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    # The API keys' Secret, mounted read-only for the server's group; the opted-out expert.
    keys = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
    assert (keys["secretName"], keys["defaultMode"]) == ("serve-keys", 0o440)
    args = pod["containers"][0]["args"]
    assert args[args.index("--api-key-file") + 1].endswith("/api-keys")
    assert args[args.index("--exclude-experts") + 1] == "legal"
    # One replica: the budget goes (it would block every drain of that node).
    one = '{"spec": {"serving": {"replicas": 1}}}'
    kube.kubectl("patch", "ef", "seeded", "-n", ns, "--type=merge", "-p", one)
    wait(
        "the budget gone",
        lambda: not kube.json("get", "poddisruptionbudgets", "-n", ns, "-l", serve)["items"],
    )
    kube.apply(branch, "-n", ns)
    selector = "btm.elmforest.io/branch=seeded-code"
    # Its first Job is the prepare step's (it never ends here: no node runs its pod).
    assert wait("the branch's Job", lambda: _jobs(kube, ns, selector)) == ["seeded-code-v1-prep"]
    # The Job controller made its pod (Pending: no node), admitted under restricted.
    wait("the Job's pod", lambda: kube.json("get", "pods", "-n", ns, "-l", selector)["items"])

    # A new spec supersedes the running Job: the operator deletes it and starts version 2.
    branch["spec"]["training"]["steps"] = 12
    kube.apply(branch, "-n", ns)
    wait("version 2's Job alone", lambda: _jobs(kube, ns, selector) == ["seeded-code-v2-prep"])

    # Serving unset: the operator deletes its Deployment, Service and NetworkPolicy.
    kube.kubectl(
        "patch", "ef", "seeded", "-n", ns, "--type=json",
        "-p", '[{"op": "remove", "path": "/spec/serving"}]',
    )  # fmt: skip
    wait(
        "the servers gone",
        lambda: (
            not kube.json("get", "deployments,services,networkpolicies", "-n", ns, "-l", serve)[
                "items"
            ]
        ),
    )
    kube.kubectl("delete", "eb", "seeded-code", "-n", ns, "--timeout=60s")

    # A cluster set whose versions are already fitted and assigned in storage (no node runs
    # Jobs here): two generated branches are created (server-side apply), then k = 1 moves
    # topics-c0 to the new version's data and deletes topics-c1.
    topics = _cluster_set(s3_bucket)
    for clusters in (2, 1):
        _assigned(s3_endpoint, s3_bucket, topics, clusters, tmp_path)
    kube.apply(topics, "-n", ns)
    wait("two generated branches", lambda: _names(kube, ns, "eb") == ["topics-c0", "topics-c1"])
    topics["spec"]["clusters"] = 1
    kube.apply(topics, "-n", ns)
    wait("topics-c1 deleted", lambda: _names(kube, ns, "eb") == ["topics-c0"])
    kube.kubectl("delete", "ecs", "topics", "-n", ns, "--timeout=60s")
    wait("the set's branches gone", lambda: _names(kube, ns, "eb") == [])
    kube.kubectl("delete", "ef", "fresh", "seeded", "-n", ns, "--timeout=60s")
    wait("the forests' Jobs gone", lambda: not _jobs(kube, ns, "btm.elmforest.io/forest"))

    text = log.read_text()
    assert "Forbidden" not in text and " 403" not in text, text[-3000:]
    if kube.plane is None:
        pytest.skip("an external cluster: its audit log is not ours to read")
    user = f"system:serviceaccount:{release.namespace}:{release.account}"
    records = _audited(kube, user)
    refused = [r for r in records if r.get("responseStatus", {}).get("code") == 403]
    assert refused == [], refused[:3]
    used = set()
    for record in records:
        ref = record["objectRef"]
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        used.add((ref.get("apiGroup", ""), resource, record["verb"]))
        if record["verb"] == "patch" and record.get("responseStatus", {}).get("code") == 201:
            # A server-side apply that created its object: the API server checked "create".
            used.add((ref.get("apiGroup", ""), resource, "create"))
    role = kube.json("get", "role", release.account, "-n", ns)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted - used == set(), f"rules no request needed: {sorted(granted - used)}"
    assert used - granted == set(), f"requests beyond the rules: {sorted(used - granted)}"
