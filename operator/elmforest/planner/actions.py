"""What a planner asks the world to do; the reconcilers apply these in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from elmcore.records import Result


@dataclass(frozen=True)
class CreateJob:
    body: dict[str, Any]  # a complete batch/v1 Job; creating it twice is a no-op (409)


@dataclass(frozen=True)
class DeleteJob:
    name: str
    reason: str


@dataclass(frozen=True)
class ApplyObject:
    body: dict[str, Any]  # a whole object, applied server-side (the operator owns its fields)


@dataclass(frozen=True)
class DeleteObject:
    kind: str  # "Deployment" or "Service"
    name: str


@dataclass(frozen=True)
class MergeResult:
    result: Result  # verified against its commit marker, then merged by compare-and-swap


@dataclass(frozen=True)
class RemoveExpert:
    domain: str


@dataclass(frozen=True)
class DeleteExpertFiles:
    domain: str  # experts/<domain>/ and runs/branch.<domain>.*/


@dataclass(frozen=True)
class PatchStatus:
    status: dict[str, Any]  # the whole desired status; applied only if it differs


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


# What a plan asks of the forest's storage (the storage adapter carries these out).
StorageAction = MergeResult | RemoveExpert | DeleteExpertFiles

Action = (
    CreateJob
    | DeleteJob
    | ApplyObject
    | DeleteObject
    | MergeResult
    | RemoveExpert
    | DeleteExpertFiles
    | PatchStatus
    | Event
)


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None  # seconds; None: wait for a change

    def add(self, *actions: Action) -> Plan:
        self.actions.extend(actions)
        return self

    def phase(self, default: str) -> str:
        """The phase this plan's status patch sets, else ``default`` (unchanged)."""
        patches = [a.status for a in self.actions if isinstance(a, PatchStatus)]
        return str(patches[-1].get("phase", default)) if patches else default
