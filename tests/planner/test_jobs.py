"""Trainer Jobs: Pod Security "restricted", digests, failure policy, placement, torchrun."""

from __future__ import annotations

from typing import Any

from elmforest.api.forest import ElmForestSpec
from elmforest.planner.jobs import JobRequest, Owner, build_job, merge_trainer
from elmforest.planner.naming import MAX_NAME, branch_job_name, child_name

IMAGE = "r.example/t@sha256:" + "b" * 64


def job(completions: int = 1, **trainer: Any) -> dict[str, Any]:
    spec = ElmForestSpec.model_validate(
        {
            "storage": {"uri": "s3://bkt/f", "credentialsSecret": "keys", "endpoint": "http://m:9"},
            "trainer": {"image": IMAGE, **trainer},
        }
    )
    return build_job(
        JobRequest(
            name="j",
            namespace="ns",
            owner=Owner("ElmBranch", "b", "u"),
            forest="f",
            role="branch",
            run_id="branch.x.v1",
            argv=["branch", "--forest", "s3://bkt/f"],
            trainer=spec.trainer,
            storage=spec.storage,
            branch="b",
            completions=completions,
        )
    )


def test_pods_meet_restricted_pod_security() -> None:
    pod = job()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert "@sha256:" in container["image"]
    assert pod["restartPolicy"] == "Never"


def test_failure_policy_and_credentials() -> None:
    body = job(activeDeadlineSeconds=3600)
    rules = body["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and 65 in rules[0]["onExitCodes"]["values"]
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert body["spec"]["activeDeadlineSeconds"] == 3600
    env = {e["name"]: e for e in body["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "keys"
    assert env["ELMFOREST_S3_ENDPOINT"]["value"] == "http://m:9"


def test_gpus_placement_and_queue() -> None:
    body = job(
        gpus=4,
        nodeSelector={"gpu": "h100"},
        queueName="research",
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
        priorityClassName="batch-low",
    )
    pod = body["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert (
        container["command"][0] == "elmtrain-torchrun"
        and "--nproc-per-node=4" in container["command"]
    )
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "batch-low"
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert body["spec"]["suspend"] is True  # Kueue's admission unsuspends it
    assert "suspend" not in job()["spec"]  # no queue: runs at once
    assert job(gpus=1)["spec"]["template"]["spec"]["containers"][0]["command"] == ["elmtrain"]


def test_branch_overrides_win_over_forest_defaults() -> None:
    spec = ElmForestSpec.model_validate(
        {"storage": {"uri": "s3://bkt/f"}, "trainer": {"image": IMAGE, "gpus": 1}}
    )
    merged = merge_trainer(spec.trainer, {"gpus": 8, "queue_name": None})
    assert merged.gpus == 8 and merged.image == IMAGE


def test_names_are_deterministic_and_short() -> None:
    assert branch_job_name("cook", 2, 3) == "cook-v2-a3"
    long = child_name("x" * 63, "v1-a1")
    assert len(long) <= MAX_NAME and long.endswith("-v1-a1")
    assert long == child_name("x" * 63, "v1-a1")
