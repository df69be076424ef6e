"""The process kubelet under Kubernetes' own Job controller: it counts, retries and fails Jobs.

Nothing of the Job controller is imitated here: the node only runs pods and reports what their
processes did, as a kubelet does; the real controller applies backoffLimit and podFailurePolicy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from elmforest.planner.jobs import failure_policy
from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import ProcessKubelet
from tests.planner.test_jobs import job as planned_job

pytestmark = pytest.mark.cluster


def _job(name: str, code: str, backoff: int = 0, grace: int = 30) -> dict[str, Any]:
    container = {
        "name": "trainer",
        "image": "registry.example.com/elmforest/trainer@sha256:" + "0" * 64,
        "command": [sys.executable, "-c", code],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff,
            "podFailurePolicy": failure_policy(),
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "terminationGracePeriodSeconds": grace,
                }
            },
        },
    }


def _condition(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    status = kube.json("get", "job", name, "-n", namespace).get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return {
                **condition,
                "succeeded": status.get("succeeded", 0),
                "failed": status.get("failed", 0),
            }
    return None


def test_jobs_succeed_fail_and_retry_as_the_job_controller_decides(
    kube: Kube, node: ProcessKubelet
) -> None:
    ns = kube.namespace("node")
    kube.apply(
        [
            _job("ok", "print('done')"),
            _job(
                "bad-input",
                "import sys; sys.exit(65)",
                backoff=3,
            ),
            _job("crash", "import sys; sys.exit(1)", backoff=1),
        ],
        "-n",
        ns,
    )
    ok = wait_for("ok to complete", lambda: _condition(kube, ns, "ok"))
    assert ok["type"] == "Complete" and ok["succeeded"] == 1
    bad = wait_for("bad-input to fail", lambda: _condition(kube, ns, "bad-input"))
    # podFailurePolicy FailJob on exit 65: no retry although backoffLimit allows 3.
    assert bad["type"] == "Failed" and bad["reason"] == "PodFailurePolicy" and bad["failed"] == 1
    crash = wait_for("crash to fail", lambda: _condition(kube, ns, "crash"))
    assert crash["type"] == "Failed" and crash["reason"] == "BackoffLimitExceeded"
    assert crash["failed"] == 2  # the first pod and one retry
    pods = kube.json("get", "pods", "-n", ns, "-l", "batch.kubernetes.io/job-name=crash")["items"]
    codes = [p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods]
    assert codes == [1, 1]


def test_eviction_is_a_disruption_not_a_failure(kube: Kube, node: ProcessKubelet) -> None:
    ns = kube.namespace("evict")
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
        "time.sleep(300)"
    )
    kube.apply(_job("sleeper", code, backoff=0, grace=5), "-n", ns)
    selector = "batch.kubernetes.io/job-name=sleeper"

    def running_pod() -> str | None:
        for pod in kube.json("get", "pods", "-n", ns, "-l", selector)["items"]:
            if pod["status"].get("phase") == "Running" and not pod["metadata"].get(
                "deletionTimestamp"
            ):
                return str(pod["metadata"]["name"])
        return None

    first = wait_for("the pod to run", running_pod)
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": first, "namespace": ns},
    }
    kube.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{ns}/pods/{first}/eviction",
        "-f",
        "-",
        stdin=json.dumps(eviction),
    )
    # The Job controller ignores the disrupted pod (podFailurePolicy) and starts another.
    second = wait_for("a replacement pod", lambda: (p := running_pod()) != first and p)
    assert second != first
    status = kube.json("get", "job", "sleeper", "-n", ns)["status"]
    assert status.get("failed", 0) == 0, status
    kube.kubectl("delete", "job", "sleeper", "-n", ns, "--wait=false")


def test_an_indexed_prepare_job_runs_each_index_once(
    kube: Kube, node: ProcessKubelet, tmp_path: Path
) -> None:
    """``spec.prepare.parallelism: 2``: the Indexed fields the planner renders are admitted
    beside its podFailurePolicy, and the real Job controller runs indexes 0 and 1 once each,
    handing each pod its index in ``JOB_COMPLETION_INDEX`` (what ``elmtrain prepare`` reads)."""
    ns = kube.namespace("indexed")
    rendered = planned_job(completions=2)["spec"]
    indexed = {key: rendered[key] for key in ("completionMode", "completions", "parallelism")}
    assert indexed == {"completionMode": "Indexed", "completions": 2, "parallelism": 2}
    code = (
        "import os, pathlib\n"
        f"pathlib.Path({str(tmp_path)!r}, 'index-' + os.environ['JOB_COMPLETION_INDEX']).touch()"
    )
    body = _job("prep", code)
    body["spec"].update(indexed)
    assert body["spec"]["podFailurePolicy"] == rendered["podFailurePolicy"]
    kube.apply(body, "-n", ns)
    done = wait_for("the indexed Job to complete", lambda: _condition(kube, ns, "prep"))
    assert done["type"] == "Complete" and done["succeeded"] == 2 and done["failed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index-0", "index-1"]
