"""What the reconcilers observed, in plain types the planners read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from elmcore.manifest import Manifest
from elmcore.records import Progress, Result

JobPhase = Literal["Running", "Succeeded", "Failed"]
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue's: which LocalQueue admits the Job


@dataclass(frozen=True)
class JobState:
    name: str
    phase: JobPhase
    reason: str = ""  # the Failed condition's reason (PodFailurePolicy, BackoffLimitExceeded...)
    message: str = ""
    started: bool = False  # a pod was created: the trainer may have written progress
    suspended: bool = False  # held by its queue (Kueue): no pod until admitted
    queue: str = ""  # the Kueue LocalQueue named by its label, if any

    @property
    def permanent(self) -> bool:
        """Failed by the pod failure policy: the trainer said the input is bad (exit 65)."""
        return self.phase == "Failed" and self.reason == "PodFailurePolicy"


def job_state(job: dict[str, object]) -> JobState:
    """Read a batch/v1 Job's status the way the Job controller writes it."""
    metadata = job.get("metadata")
    found = job.get("status")
    name = str(metadata.get("name", "")) if isinstance(metadata, dict) else ""
    status: dict[str, object] = found if isinstance(found, dict) else {}
    conditions = status.get("conditions")
    conditions = conditions if isinstance(conditions, list) else []
    for condition in conditions:
        if not isinstance(condition, dict) or condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobState(name, "Succeeded")
        if condition.get("type") == "Failed":
            return JobState(
                name, "Failed", str(condition.get("reason", "")), str(condition.get("message", ""))
            )
    counts = [status.get(n) for n in ("active", "succeeded", "failed")]
    started = any(isinstance(c, int) and c > 0 for c in counts)
    spec = job.get("spec")
    suspended = isinstance(spec, dict) and spec.get("suspend") is True
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    queue = str(labels.get(QUEUE_LABEL, "")) if isinstance(labels, dict) else ""
    return JobState(name, "Running", started=started, suspended=suspended, queue=queue)


@dataclass(frozen=True)
class RunRecords:
    """A run's records in storage: its progress and, once finished, its verified result."""

    progress: Progress | None = None
    result: Result | None = None
    # For a branch that has no version yet: the highest version of its domain that storage
    # holds files of (an earlier branch's, kept by retention Keep); the new one starts above.
    used_version: int = 0


@dataclass(frozen=True)
class StorageView:
    """The forest's storage as the operator could read it."""

    manifest: Manifest | None = None
    error: str | None = None  # why storage could not be read (bad secret, unreachable...)
    error_reason: str = "StorageUnavailable"


SPEC_HASH = "btm.elmforest.io/spec-hash"  # on what the operator applies: the desired state's


@dataclass(frozen=True)
class OwnedObject:
    """A Deployment or Service the operator applied for a forest, as the watch last saw it."""

    kind: str
    name: str
    spec_hash: str
    ready_replicas: int = 0  # Deployments: status.readyReplicas


def owned_object(kind: str, body: dict[str, object]) -> OwnedObject:
    metadata = body.get("metadata")
    meta: dict[str, object] = metadata if isinstance(metadata, dict) else {}
    annotations = meta.get("annotations")
    spec_hash = annotations.get(SPEC_HASH, "") if isinstance(annotations, dict) else ""
    status = body.get("status")
    ready = status.get("readyReplicas") if isinstance(status, dict) else None
    return OwnedObject(
        kind,
        str(meta.get("name", "")),
        str(spec_hash),
        ready if isinstance(ready, int) else 0,
    )
