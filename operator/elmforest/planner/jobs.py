"""The trainer Job manifest, built purely from the resources (no API calls).

Every pod meets Pod Security Standards "restricted"; the failure policy makes preemption free and
bad input final (the trainer's exit code 65 fails the Job at once, no retries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elmcore.errors import ExitCode
from elmforest.api import API_VERSION
from elmforest.api.forest import Resources, StorageSpec, TrainerSpec
from elmforest.planner.naming import (
    ANNOTATION_RUN,
    LABEL_BRANCH,
    LABEL_CLUSTER_SET,
    LABEL_FOREST,
    LABEL_ROLE,
    MANAGED_BY,
    OPERATOR,
)
from elmforest.planner.nodes import headless_service, one_pod_per_node, rendezvous_command
from elmforest.planner.observed import QUEUE_LABEL

CONTAINER = "trainer"
TRAINER_UID = 10001  # the trainer image's user
GPU_RESOURCE = "nvidia.com/gpu"
CACHE = "/cache"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True)
class Owner:
    kind: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class JobRequest:
    name: str
    namespace: str
    owner: Owner
    forest: str
    role: str  # tokenizer | seed | branch
    run_id: str
    argv: list[str]  # elmtrain arguments after the program name
    trainer: TrainerSpec
    storage: StorageSpec
    branch: str | None = None
    completions: int = 1  # above 1: an Indexed Job of this many pods, all at once
    nodes: int = 1  # above 1: one training run over this many pods (planner/nodes.py)
    service: str | None = None  # with nodes: the headless Service, the pods' subdomain
    cluster_set: str | None = None  # an ElmClusterSet's fit or assignment Job


def merge_trainer(base: TrainerSpec, overrides: dict[str, Any]) -> TrainerSpec:
    """The forest's trainer settings with a branch's overrides (set fields win)."""
    return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def storage_env(storage: StorageSpec, credentials: str | None = None) -> list[dict[str, Any]]:
    """The trainer image's environment for the forest's storage; ``credentials``: a Secret
    other than ``storage.credentialsSecret`` (the servers' own)."""
    secret = credentials or storage.credentials_secret
    env: list[dict[str, Any]] = [
        {"name": "ELMFOREST_LOG_FORMAT", "value": "json"},
        {"name": "ELMTRAIN_CACHE", "value": f"{CACHE}/elmtrain"},
        {"name": "HF_HOME", "value": f"{CACHE}/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TMPDIR", "value": "/tmp"},
    ]
    if storage.endpoint:
        env.append({"name": "ELMFOREST_S3_ENDPOINT", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    if secret:
        for key in CREDENTIAL_KEYS:
            ref: dict[str, Any] = {"name": secret, "key": key}
            if key == "AWS_SESSION_TOKEN":
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def container_resources(resources: Resources, gpus: int) -> dict[str, Any]:
    requests = dict(resources.requests)
    limits = dict(resources.limits)
    if gpus:
        limits[GPU_RESOURCE] = gpus
        requests[GPU_RESOURCE] = gpus
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _command(request: JobRequest) -> list[str]:
    trainer = request.trainer
    if request.nodes > 1:
        assert request.service, "a multi-node Job needs its headless Service"
        return rendezvous_command(
            request.name, request.service, request.namespace, request.nodes, trainer.gpus
        )
    if trainer.gpus > 1:
        # One process per GPU; the trainer reads torchrun's environment for DDP. The wrapper
        # exits with the ranks' code (65, 75), which torchrun itself turns into 1.
        return [
            "elmtrain-torchrun",
            "--standalone",
            f"--nproc-per-node={trainer.gpus}",
            "-m",
            "elmtrain",
        ]
    return ["elmtrain"]


def scratch_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The writable folders of a read-only-root container: caches, /tmp, shared memory."""
    volumes = [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "cache", "mountPath": CACHE},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def scheduling(
    service_account: str | None,
    priority_class: str | None,
    node_selector: dict[str, str],
    tolerations: list[Any],
) -> dict[str, Any]:
    """The pod spec's optional placement fields, only those that are set."""
    optional = {
        "serviceAccountName": service_account,
        "priorityClassName": priority_class,
        "nodeSelector": node_selector or None,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
        or None,
    }
    return {k: v for k, v in optional.items() if v is not None}


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [int(ExitCode.USAGE), int(ExitCode.BAD_INPUT)],
                },
            },
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def pod_labels(request: JobRequest) -> dict[str, str]:
    labels = {
        MANAGED_BY: OPERATOR,
        "app.kubernetes.io/name": "elmforest-trainer",
        LABEL_FOREST: request.forest,
        LABEL_ROLE: request.role,
    }
    if request.branch:
        labels[LABEL_BRANCH] = request.branch
    if request.cluster_set:
        labels[LABEL_CLUSTER_SET] = request.cluster_set
    return labels


def build_service(request: JobRequest) -> dict[str, Any]:
    """A multi-node Job's headless Service: it selects the pods of every attempt of the
    branch (one Job runs at a time), so each attempt's pods resolve under the same name."""
    assert request.service, "only a multi-node Job has a Service"
    labels = pod_labels(request)
    owner = request.owner.reference()
    return headless_service(request.service, request.namespace, labels, labels, owner)


def build_job(request: JobRequest) -> dict[str, Any]:
    trainer = request.trainer
    labels = pod_labels(request)
    job_labels = dict(labels)
    if trainer.queue_name:
        job_labels[QUEUE_LABEL] = trainer.queue_name
    volumes, mounts = scratch_volumes()
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": trainer.image,
        "imagePullPolicy": trainer.image_pull_policy,
        "command": _command(request),
        "args": request.argv,
        # The image the trainer records in each expert's lineage (pinned by digest).
        "env": [*storage_env(request.storage), {"name": "ELMTRAIN_IMAGE", "value": trainer.image}],
        "resources": container_resources(trainer.resources, trainer.gpus),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
    }
    pod_spec.update(
        scheduling(
            trainer.service_account_name,
            trainer.priority_class_name,
            trainer.node_selector,
            trainer.tolerations,
        )
    )
    spec: dict[str, Any] = {
        "backoffLimit": trainer.backoff_limit,
        "podFailurePolicy": failure_policy(),
        "ttlSecondsAfterFinished": trainer.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if request.completions > 1:
        # Each pod reads its index from JOB_COMPLETION_INDEX; the Job succeeds once every
        # index has, and backoffLimit counts the failures of all of them together.
        spec["completionMode"] = "Indexed"
        spec["completions"] = request.completions
        spec["parallelism"] = request.completions
    if request.nodes > 1:
        # One pod per index, all at once; the Job controller names each host <job>-<index>,
        # which the subdomain makes resolvable. A restart of the gang fails every pod once,
        # so the backoff limit is per node. Evictions stay free (DisruptionTarget: Ignore).
        spec["completionMode"] = "Indexed"
        spec["completions"] = spec["parallelism"] = request.nodes
        spec["backoffLimit"] = trainer.backoff_limit * request.nodes
        pod_spec["subdomain"] = request.service
        pod_spec["affinity"] = one_pod_per_node(labels)
    if trainer.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = trainer.active_deadline_seconds
    if trainer.queue_name:
        # Created suspended, as Kueue expects: its admission unsuspends the Job. Without this,
        # pods could start before Kueue's webhook or controller sees the Job.
        spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": request.name,
            "namespace": request.namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_RUN: request.run_id},
            "ownerReferences": [request.owner.reference()],
        },
        "spec": spec,
    }
