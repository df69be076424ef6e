"""Every Job the operator builds meets PSS "restricted", pins its image, and is a valid Job."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.harness.pss import pod_spec_of, restricted_violations
from tests.planner.test_jobs import job

IMAGE = "registry.example.com/elmforest/trainer@sha256:" + "0" * 64
TRAINERS = {
    "cpu": {"image": IMAGE},
    "one-gpu": {"image": IMAGE, "gpus": 1, "queueName": "team-a"},
    "torchrun": {
        "image": IMAGE,
        "gpus": 8,
        "resources": {"requests": {"cpu": 32, "memory": "256Gi"}},
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
        "serviceAccountName": "trainer",
        "activeDeadlineSeconds": 86400,
    },
}


@pytest.mark.parametrize("name", TRAINERS)
def test_operator_jobs_are_restricted_valid_jobs(name: str) -> None:
    body = job(**TRAINERS[name])
    pod = pod_spec_of(body)
    assert pod is not None
    assert restricted_violations(pod) == []
    kubernetes_validate.validate(body, "1.31", strict=True)


def violations_after(change: Any) -> list[str]:
    body = copy.deepcopy(job(**TRAINERS["cpu"]))
    pod = body["spec"]["template"]["spec"]
    change(pod, pod["containers"][0])
    return restricted_violations(pod)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p, c: c.update(image="registry.example.com/trainer:latest"), "not pinned"),
        (lambda p, c: c["securityContext"].update(privileged=True), "privileged"),
        (lambda p, c: c["securityContext"].pop("allowPrivilegeEscalation"), "Escalation"),
        (lambda p, c: c["securityContext"]["capabilities"].update(drop=[]), "drop ALL"),
        (lambda p, c: c["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "adds"),
        (
            lambda p, c: (
                c["securityContext"].pop("runAsNonRoot"),
                p["securityContext"].pop("runAsNonRoot"),
            ),
            "runAsNonRoot",
        ),
        (
            lambda p, c: (
                c["securityContext"].pop("seccompProfile"),
                p["securityContext"].pop("seccompProfile"),
            ),
            "seccompProfile",
        ),
        (lambda p, c: p.update(hostNetwork=True), "hostNetwork"),
        (lambda p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "forbidden"),
        (lambda p, c: c.update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    ],
)
def test_the_checker_catches_each_violation(change: Any, expected: str) -> None:
    problems = violations_after(change)
    assert problems and any(expected in p for p in problems), problems
