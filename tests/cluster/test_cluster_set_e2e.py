"""An ElmClusterSet on the real control plane (c-BTM, issue 30): the chart's operator (its pod
on the session's node) fits the clusterer in one CPU Job, assigns the documents in one Indexed
Job of two workers, applies one ElmBranch per cluster (owned by the set, visible with ``kubectl
get eb``), and those train and merge like any branch; ``kubectl get ecs`` and ``kubectl
explain`` show the kind; deleting the set lets Kubernetes' garbage collector delete its
branches, whose finalizers take their experts out of the manifest."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.cluster import quickstart
from tests.cluster.conftest import install_chart
from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
wait = partial(wait_for, timeout=420, every=1.0)
SET_LABEL = "btm.elmforest.io/cluster-set"


def cluster_set(bucket: str) -> dict[str, Any]:
    return {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmClusterSet",
        "metadata": {"name": "topics"},
        "spec": {
            "forest": quickstart.FOREST,
            # Two domains' text, given as one unlabeled corpus.
            "data": [f"s3://{bucket}/data/code/train.txt", f"s3://{bucket}/data/quotes/train.txt"],
            "clusters": 2,
            "sample": 500,
            "balance": False,
            "validationFraction": 0.1,
            "parallelism": 2,
            "branchTemplate": {"init": {"strategy": "seed"}, "training": {"steps": 4}},
        },
    }


def set_status(kube: Kube, ns: str) -> dict[str, Any]:
    status: dict[str, Any] = kube.json("get", "ecs", "topics", "-n", ns).get("status") or {}
    assert status.get("phase") != "Failed", status
    return status


@pytest.mark.timeout(900)
def test_a_cluster_set_fits_assigns_branches_and_goes(
    kube: Kube, node: ProcessKubelet, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    release = install_chart(kube, "topics", "topics", settings=quickstart.node_chart())
    ns = release.watched
    folder = quickstart.on_s3(kube, ns, s3_endpoint, s3_bucket, tmp_path / "qs", seed_steps=10)
    kube.kubectl("apply", "-f", str(folder / "forest.yaml"), "-n", ns)
    kube.apply(cluster_set(s3_bucket), "-n", ns)

    status = wait(
        "the set Ready", lambda: (s := set_status(kube, ns)).get("phase") == "Ready" and s
    )
    assert status["branches"] == ["topics-c0", "topics-c1"]
    assert sum(status["clusterSizes"]) == status["documents"] > 100
    # One fit Job and one Indexed assignment Job of two workers, each created once.
    jobs = kube.json("get", "jobs", "-n", ns, "-l", f"{SET_LABEL}=topics")["items"]
    by_role = {j["metadata"]["labels"]["btm.elmforest.io/role"]: j for j in jobs}
    assert sorted(by_role) == ["cluster-assign", "cluster-fit"] and len(jobs) == 2
    assign = by_role["cluster-assign"]
    assert assign["spec"]["completionMode"] == "Indexed"
    assert assign["status"].get("succeeded") == 2
    # The generated branches: owned by the set, labelled, listed by kubectl get eb.
    listed = kube.kubectl("get", "eb", "-n", ns, "-l", f"{SET_LABEL}=topics").stdout
    assert "topics-c0" in listed and "topics-c1" in listed
    for name in status["branches"]:
        branch = kube.json("get", "eb", name, "-n", ns)
        owner = branch["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == (
            "ElmClusterSet",
            "topics",
            True,
        )
        assert branch["status"]["phase"] == "Merged"
        cluster = branch["spec"]["cluster"]
        assert cluster["clustererSha256"] == status["clustererSha256"]
        assert cluster["set"] == status["storageName"]
    shown = kube.kubectl("get", "ecs", "-n", ns, "-o", "wide").stdout
    assert "Ready" in shown and str(status["documents"]) in shown, shown
    explained = kube.kubectl("explain", "elmclusterset.spec.clusters").stdout
    assert "clusters" in explained.lower(), explained
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def experts() -> list[str]:
        key = f"forests/{quickstart.FOREST}/manifest.json"
        manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        return sorted(manifest["experts"])

    assert experts() == ["topics-c0", "topics-c1"]
    events = kube.json("get", "events", "-n", ns, "--field-selector",
                       "involvedObject.kind=ElmClusterSet")["items"]  # fmt: skip
    reasons = {e["reason"] for e in events}
    assert {"Fitting", "Assigning", "Branching", "Ready"} <= reasons, reasons

    kube.kubectl("delete", "ecs", "topics", "-n", ns, "--wait=true", "--timeout=120s")
    wait("the generated branches gone", lambda: not kube.json("get", "eb", "-n", ns)["items"])
    wait("their experts out of the manifest", lambda: experts() == [])
