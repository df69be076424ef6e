"""Two nodes with cluster DNS: a ``trainer.nodes: 2`` branch's pods find each other by name.

CoreDNS (built from its Go module, tests/harness/clusterdns.py) answers from the suite's API
server; two process nodes give each pod its own address, resolv.conf and host name, as a
kubelet and a CNI plugin do. The planner's Service and Job run as rendered, the program only
swapped for a probe: ``elmtrain-torchrun`` rendezvouses (c10d) at ``<job>-0.<svc>.<ns>.svc``,
the two ranks all-reduce over gloo, and each name resolves to its pod's reported address.
Nothing in the operator knows it is in a test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import ROOT, start_node
from tests.cluster.rendezvous_probe import PREFIX
from tests.harness.clusterdns import ClusterDNS
from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import ProcessKubelet
from tests.planner.test_nodes import branch, created, forest, plan

pytestmark = pytest.mark.cluster

# Only this module's pods go to these nodes (the session's other tests use node-0).
TAINT = {"key": "elmforest-test/cluster-dns", "value": "true", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def cluster_dns(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDNS]:
    if kube.plane is None:
        pytest.skip("the process nodes join the local control plane only")
    dns = ClusterDNS(tmp_path_factory.mktemp("coredns"), kube.plane.kubeconfig).start()
    yield dns
    dns.stop()


@pytest.fixture(scope="module")
def dns_nodes(
    kube: Kube, cluster_dns: ClusterDNS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ProcessKubelet]]:
    assert kube.plane is not None
    nodes = []
    try:
        for index in range(2):
            name = f"dns-{index}"
            folder = tmp_path_factory.mktemp(name)
            nodes.append(
                start_node(kube.plane, kube, folder, name, dns=cluster_dns.address, taints=[TAINT])
            )
            # The probe's package, as the node's own environment (a pod's env naming a path
            # under /tmp would be rewritten into its /tmp volume: a checkout under /tmp broke).
            env = nodes[-1].base_env
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        yield nodes
    finally:
        for node in nodes:
            node.stop()
            kube.kubectl("delete", "node", node.name, "--wait=false", check=False)


def _rendered(ns: str) -> tuple[dict[str, Any], dict[str, Any]]:
    toleration = {"key": TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
    spec = forest(nodes=2, tolerations=[toleration])
    service, job = created(plan(spec, branch(), namespace=ns).actions)
    assert service is not None
    for body in (service, job):
        del body["metadata"]["ownerReferences"]  # no ElmBranch here: the GC would collect it
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    # One pod per node: the planner's required anti-affinity spreads them over dns-0 and dns-1.
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    container = pod["containers"][0]
    command = container["command"]
    assert command[0] == "elmtrain-torchrun" and command[-2:] == ["-m", "elmtrain"]
    hosts = [f"{name}-{index}.{svc}" for index in range(2)]
    container["command"] = [*command[:-1], "tests.cluster.rendezvous_probe", *hosts]
    container["args"] = []
    return service, job


def _pods(kube: Kube, ns: str, job: str) -> list[dict[str, Any]]:
    selector = f"batch.kubernetes.io/job-name={job}"
    return list(kube.json("get", "pods", "-n", ns, "-l", selector)["items"])


def _done(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    status: dict[str, Any] = kube.json("get", "job", name, "-n", ns).get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return {"type": condition["type"], **status}
    return None


def _stuck(kube: Kube, nodes: list[ProcessKubelet], ns: str, job: str) -> str:
    """Why the Job did not finish: its pods (phase, node, address) and their logs' tails (it
    timed out once in a full two-worker run of the suite and passed alone; this says where)."""
    lines = []
    for pod in _pods(kube, ns, job):
        meta, status = pod["metadata"], pod.get("status", {})
        lines.append(
            f"{meta['name']}: {status.get('phase')} on {pod['spec'].get('nodeName')} "
            f"ip {status.get('podIP')} {status.get('containerStatuses', '')}"
        )
        lines += [f"  {n.log_of(ns, meta['name'])[-2000:]}" for n in nodes]
    return "\n".join(lines) or "no pods"


def test_two_nodes_rendezvous_by_dns_and_all_reduce_over_gloo(
    kube: Kube, dns_nodes: list[ProcessKubelet], tmp_path: Path
) -> None:
    ns = kube.namespace("dns")
    service, job = _rendered(ns)
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    kube.apply([service, job])
    try:
        done = wait_for("the 2-node Job to finish", lambda: _done(kube, ns, name), timeout=300)
    except AssertionError as timeout:
        raise AssertionError(_stuck(kube, dns_nodes, ns, name)) from timeout
    every = _pods(kube, ns, name)
    logs = [n.log_of(ns, p["metadata"]["name"]) for n in dns_nodes for p in every]
    assert done["type"] == "Complete", (done, [log[-3000:] for log in logs])
    index = "batch.kubernetes.io/job-completion-index"
    pods = {p["metadata"]["annotations"][index]: p for p in every}
    assert sorted(p["spec"]["nodeName"] for p in pods.values()) == ["dns-0", "dns-1"]
    address = {index: pod["status"]["podIP"] for index, pod in pods.items()}
    assert len(set(address.values())) == 2  # each pod its own address
    lines = [line for log in logs for line in log.splitlines() if line.startswith(PREFIX)]
    records = [json.loads(line.removeprefix(PREFIX)) for line in lines]
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert {r["world"] for r in records} == {2} and {r["sum"] for r in records} == {3.0}
    assert sorted(r["host"] for r in records) == [f"{name}-0", f"{name}-1"]
    for record in records:
        # Every pod resolves both hosts, by the relative names a pod's search path completes.
        assert record["resolved"] == {f"{name}-{i}.{svc}": address[str(i)] for i in range(2)}
