"""Many nodes for one branch: an Indexed Job of ``trainer.nodes`` pods behind a headless
Service, torchrun rendezvousing at index 0's stable name; one node stays one plain pod."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from elmcore.records import Progress
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.actions import ApplyObject, CreateJob, PatchStatus
from elmforest.planner.branch import BranchInput, ForestView, plan_branch, spec_fingerprint
from elmforest.planner.naming import MAX_NAME
from elmforest.planner.nodes import node_job_name, node_service_name
from elmforest.planner.observed import JobState, RunRecords

IMAGE = "r.example/t@sha256:" + "a" * 64
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def forest(**trainer: Any) -> ElmForestSpec:
    return ElmForestSpec.model_validate(
        {"storage": {"uri": "s3://bkt/f"}, "trainer": {"image": IMAGE, **trainer}}
    )


def branch(**trainer: Any) -> ElmBranchSpec:
    return ElmBranchSpec.model_validate(
        {
            "forest": "f",
            "domain": "cooking",
            "data": {"train": ["s3://bkt/d/cooking.txt"]},
            **({"trainer": trainer} if trainer else {}),
        }
    )


def plan(spec: ElmForestSpec, own: ElmBranchSpec, name: str = "cook", **changes: Any) -> Any:
    status = ElmBranchStatus(version=1, spec_hash=spec_fingerprint(own))
    base: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": "u1",
        "generation": 1,
        "spec": own,
        "status": status,
        "forest": ForestView("f", spec, ready=True, uid="fu"),
        "domain_owner": name,
    }
    return plan_branch(BranchInput(**{**base, **changes}))


def created(actions: list[Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    service = next((a.body for a in actions if isinstance(a, ApplyObject)), None)
    job = next(a.body for a in actions if isinstance(a, CreateJob))
    return service, job


def test_nodes_default_to_one_and_must_be_positive() -> None:
    assert forest().trainer.nodes == 1
    with pytest.raises(ValidationError):
        forest(nodes=0)


def test_one_node_is_one_plain_pod_without_a_service() -> None:
    service, job = created(plan(forest(gpus=2), branch()).actions)
    assert service is None
    assert "completionMode" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert "affinity" not in job["spec"]["template"]["spec"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == [
        "elmtrain-torchrun",
        "--standalone",
    ]


def test_many_nodes_run_as_an_indexed_job_behind_a_headless_service() -> None:
    actions = plan(forest(nodes=2, gpus=4, backoffLimit=3), branch()).actions
    kinds = [type(a) for a in actions]
    # Status names the Job first; the Service exists before the Job's pods look it up.
    assert kinds.index(PatchStatus) < kinds.index(ApplyObject) < kinds.index(CreateJob)
    service, job = created(actions)
    assert service is not None
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    assert (name, svc) == ("cook-v1-a1", "cook-nodes")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # Owned by the branch (garbage-collected with it), selecting exactly the Job's pods.
    assert service["metadata"]["ownerReferences"][0]["uid"] == "u1"
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 6  # a gang restart fails every pod once
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc
    # One pod per node: required anti-affinity among the branch's trainer pods.
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == service["spec"]["selector"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4  # per pod, not per Job
    command = container["command"]
    assert command[0] == "elmtrain-torchrun" and "--standalone" not in command
    assert "--nnodes=2" in command and "--nproc-per-node=4" in command
    assert "--rdzv-backend=c10d" in command and "--max-restarts=0" in command
    assert f"--rdzv-endpoint={name}-0.{svc}.ns.svc:29400" in command
    assert command[-2:] == ["-m", "elmtrain"]
    # The permanent exit codes still fail the Job at once; evictions still cost nothing.
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and 65 in rules[0]["onExitCodes"]["values"]
    assert rules[1]["action"] == "Ignore"


def test_a_cpu_node_runs_one_process() -> None:
    _, job = created(plan(forest(nodes=3), branch()).actions)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=3" in command and "--nproc-per-node=1" in command


def test_a_branch_overrides_the_forests_nodes_both_ways() -> None:
    service, job = created(plan(forest(), branch(nodes=2)).actions)
    assert service is not None and job["spec"]["completions"] == 2
    service, job = created(plan(forest(nodes=4), branch(nodes=1)).actions)
    assert service is None and "completions" not in job["spec"]


@pytest.mark.parametrize("name", ["9lives", "a.b.c", "x" * 253, "y" * 61])
def test_host_and_service_names_are_dns_labels_for_any_branch_name(name: str) -> None:
    for nodes in (2, 10, 256):
        job = node_job_name(name, 12, 3, nodes)
        assert len(f"{job}-{nodes - 1}") <= MAX_NAME and DNS_LABEL.match(f"{job}-{nodes - 1}")
    service = node_service_name(name)
    assert len(service) <= MAX_NAME and DNS_LABEL.match(service)
    assert node_job_name(name, 1, 1, 2) != node_job_name(name, 1, 2, 2)


def test_branches_whose_names_differ_only_by_dots_share_nothing() -> None:
    assert node_service_name("a.b") != node_service_name("a-b")
    assert node_job_name("a.b", 1, 1, 2) != node_job_name("a-b", 1, 1, 2)
    assert node_service_name("9lives") != node_service_name("n9lives")


def test_progress_comes_from_the_runs_records_and_retries_are_new_jobs() -> None:
    # Rank 0 writes the run's records; the planner reads them as for one pod.
    own = branch(nodes=2)
    status = ElmBranchStatus(
        version=1, spec_hash=spec_fingerprint(own), attempt=1, job_name="cook-v1-a1"
    )
    progress = Progress(run_id="branch.cooking.v1", phase="training", step=5, total_steps=10)
    running = plan(
        forest(),
        own,
        status=status,
        job=JobState("cook-v1-a1", "Running", started=True),
        records=RunRecords(progress=progress),
    )
    patch = next(a for a in running.actions if isinstance(a, PatchStatus))
    assert patch.status["progress"]["summary"] == "5/10 (50%)"
    failed = JobState("cook-v1-a1", "Failed", "BackoffLimitExceeded", "")
    service, job = created(plan(forest(), own, status=status, job=failed).actions)
    assert service is not None and job["metadata"]["name"] == "cook-v1-a2"
    assert "cook-v1-a2-0.cook-nodes.ns.svc:29400" in " ".join(
        job["spec"]["template"]["spec"]["containers"][0]["command"]
    )
