"""Kueue for real: a forest whose trainer names a LocalQueue is admitted two GPUs at a time.

Kueue v0.17.0 is built from its module and installed from its own manifests
(tests/harness/kueue.py) on a control plane of this module's own, so its webhooks (which refuse
pods when no manager answers) never touch the other tests' cluster. A ClusterQueue holds 2
``nvidia.com/gpu`` of quota; the node has 4; every trainer Job asks for one GPU. The operator
creates its Jobs suspended; Kueue's webhook and controller make a Workload of each, admit them
in order as quota frees, and unsuspend them; the Job controller then starts their pods. The
LocalQueue is held (Kueue's stopPolicy) while the four branches reach it, so that every one of
them waits and says so, and released: two are admitted, then the other two.

The pods run the stand-in trainer (tests/harness/standin.py: real records and committed
artifacts, copied from a forest the real trainer made once per session), each "training" for a
few seconds: what is tested is admission, which real training only made slower (the real
plane's end-to-end test, tests/cluster/test_forest_e2e.py, trains for real).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import quickstart
from tests.cluster.conftest import install_chart, own_plane, start_node
from tests.harness.controlplane import free_port
from tests.harness.kubectl import Kube, wait_for
from tests.harness.kueue import KueueManager
from tests.harness.nodeagent import PROGRAMS, ProcessKubelet
from tests.planner.test_nodes import branch, created, forest, plan
from tests.reliability.scenario import STANDIN

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
wait = partial(wait_for, timeout=300, every=1.0)
QUEUE, CLUSTER_QUEUE, FLAVOR = "training", "trainer-gpus", "default-flavor"
GPU_QUOTA = 2


@pytest.fixture(scope="module")
def kueue_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    why = "Kueue is installed on a local control plane of the test's own only"
    with own_plane(tmp_path_factory, "kueue", why) as kube:
        yield kube


@pytest.fixture(scope="module")
def kueue_node(
    kueue_kube: Kube, tmp_path_factory: pytest.TempPathFactory, seeded_forest: Path
) -> Iterator[ProcessKubelet]:
    assert kueue_kube.plane is not None
    agent = start_node(
        kueue_kube.plane,
        kueue_kube,
        tmp_path_factory.mktemp("kueue-node"),
        programs={**PROGRAMS, "elmtrain": STANDIN},
    )
    # Long enough that two admitted Jobs overlap and the others wait for the quota.
    agent.base_env.update(
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),  # python -m tests.harness.standin
        STANDIN_TEMPLATES=str(seeded_forest),
        STANDIN_SECONDS="4",
    )
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def kueue(kueue_kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KueueManager]:
    manager = KueueManager(kueue_kube, tmp_path_factory.mktemp("kueue"))
    try:
        yield manager.start()
    finally:
        manager.stop()


def _queues(
    namespace: str, cluster_queue: str = CLUSTER_QUEUE, queue: str = QUEUE
) -> list[dict[str, Any]]:
    """One flavor, a ClusterQueue with 2 GPUs of quota (CPU and memory to spare), a LocalQueue."""
    quota = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": str(GPU_QUOTA)}
    return [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": FLAVOR},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {},
                # Strict: a newer Workload never overtakes an older one waiting for quota
                # (BestEffortFIFO, the default, lets it when the older was set aside).
                "queueingStrategy": "StrictFIFO",
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": k, "nominalQuota": v} for k, v in quota.items()
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": queue, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue},
        },
    ]


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _condition(obj: dict[str, Any], kind: str) -> datetime.datetime | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == kind and condition["status"] == "True":
            return _time(condition["lastTransitionTime"])
    return None


def _stop_policy(kube: Kube, namespace: str, policy: str) -> None:
    """Hold or release the LocalQueue (Kueue's own switch: held, nothing new is admitted)."""
    patch = f'{{"spec": {{"stopPolicy": "{policy}"}}}}'
    kube.kubectl("patch", "localqueue", QUEUE, "-n", namespace, "--type=merge", "-p", patch)


def _queue_name(body: dict[str, Any]) -> None:
    if body["kind"] == "ElmForest":
        body["spec"]["trainer"] = {"queueName": QUEUE}


@pytest.mark.timeout(900)
def test_a_forest_is_admitted_two_gpus_at_a_time_by_kueue(
    kueue_kube: Kube,
    kueue_node: ProcessKubelet,
    kueue: KueueManager,
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    kube = kueue_kube
    release = install_chart(
        kube,
        "queued",
        "queued",
        healthPort=str(free_port()),
        # One replica (still behind the Lease): the process kubelet runs pods in this machine's
        # network, where a standby's health port would clash with the leader's; the handover
        # of two replicas is tests/cluster/test_leader_election.py's.
        replicas="1",
        **{
            "metrics.port": str(free_port()),
            "resyncSeconds": "2",
            "trainer.gpus": "1",  # one GPU per Job: the quota admits two at a time
            "trainer.resources.requests.cpu": "1",
            "trainer.resources.requests.memory": "1Gi",
            "trainer.resources.limits.memory": "8Gi",
        },
    )
    ns = release.watched
    # Kueue's validating webhook judges the queues: it answers, through the API server.
    wait("Kueue's webhooks to answer", lambda: kube.apply(_queues(ns), check=False).returncode == 0)
    folder = quickstart.on_s3(
        kube, ns, s3_endpoint, s3_bucket, tmp_path / "quickstart", seed_steps=20, edit=_queue_name
    )
    # The seed first, through the queue; then the queue is held while the four branches reach
    # it, so that all four wait for certain (their prepare Jobs end at different times: left
    # alone, a branch may find free quota, and none need wait) and the release admits them two
    # at a time. Kueue's own stopPolicy holds the LocalQueue: Workloads are still made.
    kube.kubectl("apply", "-f", str(folder / "forest.yaml"), "-n", ns)
    wait(
        "the seed merged",
        lambda: (
            (kube.json("get", "ef", quickstart.FOREST, "-n", ns).get("status") or {}).get("phase")
            == "Ready"
        ),
        timeout=600,
        alive=kueue.exited,
    )
    _stop_policy(kube, ns, "Hold")
    for domain in quickstart.DOMAINS:
        kube.kubectl("apply", "-f", str(folder / f"branch-{domain}.yaml"), "-n", ns)

    def all_waiting() -> bool:
        statuses = quickstart.branches(kube, ns)
        return all(statuses.get(d, {}).get("phase") == "Waiting" for d in quickstart.DOMAINS)

    wait("four branches waiting for the held queue", all_waiting, timeout=600, alive=kueue.exited)
    _stop_policy(kube, ns, "None")

    wait(
        "four merged branches",
        lambda: quickstart.all_merged(kube, ns, quickstart.DOMAINS),
        timeout=900,
        alive=kueue.exited,
    )

    jobs = kube.json("get", "jobs", "-n", ns)["items"]
    trainer_jobs = [j for j in jobs if j["metadata"]["labels"].get("kueue.x-k8s.io/queue-name")]
    # The tokenizer's, the seed's and one per branch: all of them went through the queue
    # (the prepare Jobs, CPU only, have spec.prepare.queueName, unset here).
    assert len(trainer_jobs) == 2 + len(quickstart.DOMAINS), [j["metadata"]["name"] for j in jobs]

    def finished_workloads() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = kube.json("get", "workloads.kueue.x-k8s.io", "-n", ns)[
            "items"
        ]
        done = len(items) == len(trainer_jobs) and all(_condition(w, "Finished") for w in items)
        return items if done else None

    # Kueue marks a Workload Finished after its Job completes (the merge may come first).
    workloads = wait("every Workload Finished", finished_workloads, timeout=60)
    by_job = {
        ref["name"]: w
        for w in workloads
        for ref in w["metadata"].get("ownerReferences", [])
        if ref["kind"] == "Job"
    }
    assert sorted(by_job) == sorted(j["metadata"]["name"] for j in trainer_jobs)
    # Every Workload was admitted once, to this queue, and finished; first in, first out.
    admissions = []
    for name, workload in by_job.items():
        admitted = _condition(workload, "Admitted")
        assert admitted is not None, (name, workload.get("status"))
        assert workload["status"]["admission"]["clusterQueue"] == CLUSTER_QUEUE
        admissions.append((admitted, _time(workload["metadata"]["creationTimestamp"]), name))
    admissions.sort()  # by admission time; ties (the same second) by creation
    assert [c for _, c, _ in admissions] == sorted(c for _, c, _ in admissions), admissions
    # Never more than the quota's GPUs running at once, and the quota reached: the node has 4
    # GPUs, so the queue (not the node) held the other branches back. Lifetimes are the
    # node's own (process start to exit), every trainer pod asking for one GPU.
    # (The prepare Jobs ask for no GPU and no queue: their pods are not counted.)
    queued_jobs = tuple(f"{ns}/{j['metadata']['name']}-" for j in trainer_jobs)
    pods = {k: v for k, v in kueue_node.lifetimes.items() if k.startswith(queued_jobs)}
    assert len(pods) == len(trainer_jobs), sorted(kueue_node.lifetimes)
    spans = [(start, end) for start, end in pods.values() if end is not None]
    assert len(spans) == len(pods), pods
    running = [sum(1 for s, e in spans if s <= start < e) for start, _ in spans]
    assert max(running) == GPU_QUOTA, sorted(spans)
    # Each trainer pod started after its Job's admission, as Kueue unsuspended it.
    for job in trainer_jobs:
        name = job["metadata"]["name"]
        start = _time(job["status"]["startTime"])
        assert start >= _condition(by_job[name], "Admitted"), name  # type: ignore[operator]
    # Every branch held by the queue said so in an Event too (its status was seen above).
    events = kube.json("get", "events", "-n", ns)["items"]
    queued = {
        e["involvedObject"]["name"]
        for e in events
        if e["reason"] == "Waiting" and f"admission by queue {QUEUE}" in e["message"]
    }
    assert queued >= set(quickstart.DOMAINS), queued
    manifest_experts = kube.json("get", "ef", quickstart.FOREST, "-n", ns)["status"]["expertCount"]
    assert manifest_experts == len(quickstart.DOMAINS)


def _workload_of(kube: Kube, ns: str, job: str) -> dict[str, Any] | None:
    for workload in kube.json("get", "workloads.kueue.x-k8s.io", "-n", ns)["items"]:
        if any(r["name"] == job for r in workload["metadata"].get("ownerReferences", [])):
            return workload  # type: ignore[no-any-return]
    return None


def test_a_two_node_branch_is_admitted_whole_as_one_workload(
    kueue_kube: Kube, kueue: KueueManager
) -> None:
    """``trainer.nodes: 2`` with one GPU a pod, through a queue of 2 GPUs: Kueue makes one
    Workload of the Indexed Job (one pod set of 2 pods) and admits both pods' quota at once; a
    second such branch waits whole (no pod of it starts) until the first's quota is free."""
    kube = kueue_kube
    ns = kube.namespace("gang")
    queues = _queues(ns, "gang-gpus", "gang")
    wait("Kueue's webhooks to answer", lambda: kube.apply(queues, check=False).returncode == 0)
    jobs = []
    for name in ("first", "second"):
        rendered = plan(forest(nodes=2, gpus=1, queueName="gang"), branch(), name=name).actions
        service, job = created(rendered)
        assert service is not None and job["spec"]["suspend"] is True
        for body in (service, job):
            body["metadata"]["namespace"] = ns
            del body["metadata"]["ownerReferences"]  # no ElmBranch here
        jobs.append(job["metadata"]["name"])
        kube.apply([service, job])
        if name == "first":
            admitted = wait(
                "the first gang admitted",
                lambda: (w := _workload_of(kube, ns, jobs[0])) and _condition(w, "Admitted") and w,
                alive=kueue.exited,
            )
    assert [p["count"] for p in admitted["spec"]["podSets"]] == [2]
    assignments = admitted["status"]["admission"]["podSetAssignments"]
    assert [a["count"] for a in assignments] == [2]
    assert assignments[0]["resourceUsage"]["nvidia.com/gpu"] == "2"
    assert kube.json("get", "job", jobs[0], "-n", ns)["spec"]["suspend"] is False

    def refused() -> dict[str, Any] | None:
        workload = _workload_of(kube, ns, jobs[1])
        conditions = (workload or {}).get("status", {}).get("conditions", [])
        pending = [c for c in conditions if c["type"] == "QuotaReserved" and c["status"] == "False"]
        return workload if pending and "insufficient" in pending[0]["message"] else None

    # The second gang has no quota while the first holds it: suspended, without a pod.
    waiting = wait("the second gang held back", refused, alive=kueue.exited)
    assert [p["count"] for p in waiting["spec"]["podSets"]] == [2]
    assert kube.json("get", "job", jobs[1], "-n", ns)["spec"]["suspend"] is True
    selector = f"batch.kubernetes.io/job-name={jobs[1]}"
    assert kube.json("get", "pods", "-n", ns, "-l", selector)["items"] == []
    kube.kubectl("delete", "job", jobs[0], "-n", ns, "--cascade=foreground", "--wait=false")
    second = wait(
        "the second gang admitted once the first is gone",
        lambda: (w := _workload_of(kube, ns, jobs[1])) and _condition(w, "Admitted") and w,
        alive=kueue.exited,
    )
    assert [a["count"] for a in second["status"]["admission"]["podSetAssignments"]] == [2]
