"""A branch on two nodes (``trainer.nodes: 2``) under the real API server and Job controller.

The planner's Service and Job are applied as rendered (only the owner reference, a branch that
does not exist here, and the container's program are replaced): the API server admits them,
the Job controller gives each pod its index's host name under the Service's subdomain, the
EndpointSlice controller publishes both hosts before they are ready (what cluster DNS serves),
and one pod's eviction restarts the gang as docs/operations.md says: the evicted index is
recreated without counting, the other's exit 75 counts once, and the Job then completes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import ProcessKubelet
from tests.planner.test_nodes import branch, created, forest, plan

pytestmark = pytest.mark.cluster

# Each pod records that it started, then "trains" until the test lets it finish; its own stop
# file stands for the ranks' vote after one pod's SIGTERM (every rank checkpoints, exits 75).
PROGRAM = """\
import os, pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
index = os.environ["JOB_COMPLETION_INDEX"]
(folder / f"started-{index}-{os.getpid()}").touch()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
while not (folder / "release").exists():
    if (folder / f"stop-{os.getpid()}").exists():
        sys.exit(75)
    time.sleep(0.2)
"""


def _rendered(ns: str, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    service, job = created(plan(forest(nodes=2, backoffLimit=1), branch()).actions)
    assert service is not None
    for body in (service, job):
        body["metadata"]["namespace"] = ns
        del body["metadata"]["ownerReferences"]  # no ElmBranch here: the GC would collect it
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["command"] = [sys.executable, "-c", PROGRAM, str(folder)]
    container["args"] = []
    # The suite's shared node is one: the pods share it (their one-per-node anti-affinity,
    # which would leave index 1 unscheduled here, is dropped).
    assert pod.pop("affinity")["podAntiAffinity"]
    # No scratch volumes: the node would map the test's folder (under /tmp) into the pod's /tmp.
    del container["volumeMounts"], pod["volumes"]
    pod["terminationGracePeriodSeconds"] = 10
    return service, job


def _wait(kube: Kube, ns: str, what: str, check: Any, timeout: float = 180) -> Any:
    """wait_for, saying on a timeout what the pods and EndpointSlices were."""
    try:
        return wait_for(what, check, timeout=timeout)
    except AssertionError as error:
        pods = [
            (p["metadata"]["name"], p["status"])
            for p in kube.json("get", "pods", "-n", ns)["items"]
        ]
        slices = kube.json("get", "endpointslices", "-n", ns)["items"]
        raise AssertionError(
            f"{error}: pods {json.dumps(pods)} slices {json.dumps(slices)}"
        ) from None


def _pods(kube: Kube, ns: str, job: str) -> list[dict[str, Any]]:
    selector = f"batch.kubernetes.io/job-name={job}"
    pods = kube.json("get", "pods", "-n", ns, "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _running(kube: Kube, ns: str, job: str) -> dict[str, dict[str, Any]] | None:
    """index -> pod, once every index has a running pod."""
    pods = {
        p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]: p
        for p in _pods(kube, ns, job)
        if p["status"].get("phase") == "Running"
    }
    return pods if len(pods) == 2 else None


def _hosts(kube: Kube, ns: str, service: str) -> list[str]:
    selector = f"kubernetes.io/service-name={service}"
    slices = kube.json("get", "endpointslices", "-n", ns, "-l", selector)["items"]
    return sorted(e.get("hostname", "") for s in slices for e in s.get("endpoints") or [])


def test_two_nodes_run_as_one_indexed_gang_behind_a_headless_service(
    kube: Kube, node: ProcessKubelet, tmp_path: Path
) -> None:
    ns = kube.namespace("nodes")
    service, job = _rendered(ns, tmp_path)
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    kube.apply([service, job])
    assert kube.json("get", "service", svc, "-n", ns)["spec"]["clusterIP"] == "None"
    pods = _wait(kube, ns, "both indexes to run", lambda: _running(kube, ns, name))
    for index, pod in pods.items():
        assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == (f"{name}-{index}", svc)
    # What the cluster's DNS answers <job>-0.<svc>.<ns>.svc from: both hosts, before readiness.
    expected = [f"{name}-0", f"{name}-1"]
    _wait(kube, ns, "the hosts in the EndpointSlice", lambda: _hosts(kube, ns, svc) == expected)
    assert job["spec"]["backoffLimit"] == 2  # backoffLimit 1, per node

    def programs_started() -> list[Path] | None:
        found = sorted(tmp_path.glob("started-*"))
        return found if len(found) == 2 else None

    first = _wait(kube, ns, "both programs to start", programs_started)
    # Evict index 1 (as a drain does); the ranks' vote then stops index 0 with 75.
    evicted = pods["1"]["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": evicted}}
    kube.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{ns}/pods/{evicted}/eviction",
        "-f",
        "-",
        stdin=json.dumps(eviction),
    )
    survivor = first[0].name.rsplit("-", 1)[1]
    (tmp_path / f"stop-{survivor}").touch()

    def restarted() -> dict[str, dict[str, Any]] | None:
        now = _running(kube, ns, name)
        first = {p["metadata"]["name"] for p in pods.values()}
        return now if now and not first & {p["metadata"]["name"] for p in now.values()} else None

    # Every index gets a new pod: the gang restarts (and would resume from its checkpoint).
    _wait(kube, ns, "a new pod for every index", restarted)
    (tmp_path / "release").touch()
    done = _wait(kube, ns, "the Job to complete", lambda: _complete(kube, ns, name))
    # The evicted pod is ignored (DisruptionTarget), index 0's 75 counts once: within the
    # limit, so no attempt is spent.
    assert (done.get("succeeded"), done.get("failed", 0)) == (2, 1), done
    started = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("started-*"))
    assert len(list(tmp_path.glob("started-*"))) == 4
    assert started == ["started-0", "started-0", "started-1", "started-1"]


def _complete(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    status: dict[str, Any] = kube.json("get", "job", name, "-n", ns).get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            assert condition["type"] == "Complete", status
            return status
    return None
