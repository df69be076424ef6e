"""The chart installed for real: helm, the API server's PodSecurity admission, the Job controller.

The operator's namespace and the watched one enforce Pod Security ``restricted``. The API
server itself must admit the operator's pod (created by the real ReplicaSet controller) and
every kind of trainer Job the planner builds (CPU, GPU, torchrun), with no PodSecurity warning.
"""

from __future__ import annotations

import copy
import json

import pytest

from elmforest.api import BRANCH, FOREST
from tests.chart.test_pod_security import TRAINERS
from tests.cluster.conftest import Release
from tests.harness.kubectl import Kube, wait_for
from tests.planner.test_jobs import job

pytestmark = pytest.mark.cluster


def test_helm_installs_the_chart_with_its_crds(kube: Kube, release: Release) -> None:
    status = kube.helm("status", release.name, "-n", release.namespace, "-o", "json").stdout
    assert '"status":"deployed"' in status.replace(" ", ""), status
    for kind in (FOREST, BRANCH):
        crd = kube.json("get", f"crd/{kind.crd_name}", "--show-managed-fields")
        if not release.crds_before:  # helm created them from the chart's crds/ folder
            managers = {m["manager"] for m in crd["metadata"]["managedFields"]}
            assert "helm" in managers, managers
    version = kube.kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.37.' in version, version  # Helm and clients compare this


def test_the_operator_pod_is_admitted_under_restricted(kube: Kube, release: Release) -> None:
    selector = "app.kubernetes.io/name=elmforest"
    pods = wait_for(
        "the ReplicaSet controller to create the operator's pod",
        lambda: kube.json("get", "pods", "-n", release.namespace, "-l", selector)["items"],
    )
    pod = pods[0]["spec"]
    assert pod["serviceAccountName"] == release.account
    assert pod["containers"][0]["image"].endswith("@sha256:" + "ab" * 32)
    events = kube.json("get", "events", "-n", release.namespace)["items"]
    refused = [e["message"] for e in events if e["reason"] == "FailedCreate"]
    assert refused == [], refused
    # The namespace really enforces: a pod that breaks the profile is refused by the server.
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {
            "containers": [
                {"name": "c", "image": "busybox", "securityContext": {"privileged": True}}
            ]
        },
    }
    result = kube.kubectl(
        "create",
        "--dry-run=server",
        "-n",
        release.namespace,
        "-f",
        "-",
        stdin=json.dumps(bad),
        check=False,
    )
    assert result.returncode != 0 and "violates PodSecurity" in result.stderr, result.stderr
    # ... and warns of a Job whose pods it would refuse (what the trainer Jobs are checked for).
    bad_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "privileged"},
        "spec": {"template": {"spec": {**bad["spec"], "restartPolicy": "Never"}}},
    }
    result = kube.kubectl(
        "create", "--dry-run=server", "-n", release.namespace, "-f", "-", stdin=json.dumps(bad_job)
    )
    assert "would violate PodSecurity" in result.stderr, result.stderr


@pytest.mark.parametrize("variant", sorted(TRAINERS))
def test_every_trainer_job_is_admitted_under_restricted(
    kube: Kube, release: Release, variant: str
) -> None:
    namespace = release.watched
    trainer = TRAINERS[variant]
    # What the planner's Job names must exist, as on a real cluster.
    if "serviceAccountName" in trainer:
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": trainer["serviceAccountName"]},
            },
            "-n",
            namespace,
        )
    if "priorityClassName" in trainer:
        kube.apply(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": trainer["priorityClassName"]},
                "value": 1000,
            }
        )
    body = copy.deepcopy(job(**trainer))
    body["metadata"]["namespace"] = namespace
    body["metadata"].pop("ownerReferences", None)  # no owner exists in this namespace
    result = kube.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(body))
    assert "PodSecurity" not in result.stderr, result.stderr  # a Job's pods would be refused
    # The pod its controller would create, admitted by the enforcing PodSecurity plugin.
    template = body["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **template.get("metadata", {}),
            "name": f"{variant}-pod",
            "namespace": namespace,
        },
        "spec": template["spec"],
    }
    kube.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(pod))
