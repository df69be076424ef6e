"""The cluster's side of observation: what a reconcile reads, from Kopf's indexes (gathered in
the event loop: they are not read from threads) and from storage (read in an I/O thread)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from elmcore.manifest import Manifest
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.forest import StorageSpec
from elmforest.observe.reads import PassReads
from elmforest.planner.defaults import Defaults
from elmforest.planner.observed import JobState, OwnedObject
from elmforest.planner.policy import Policy
from elmforest.planner.siblings import ForestBranches
from elmforest.reconcile.context import OperatorContext


@dataclass
class _Storage:
    ctx: OperatorContext
    namespace: str
    opened: ForestStorage | None = None  # the client observation used; the plan applies with it

    @property
    def defaults(self) -> Defaults | None:
        return self.ctx.settings.defaults

    @property
    def policy(self) -> Policy:
        return self.ctx.settings.policy

    def storage(self, spec: StorageSpec) -> ForestStorage:
        self.opened = self.ctx.storage(self.namespace, spec)
        return self.opened


@dataclass
class ClusterBranchSource(_Storage):
    """One branch's reconcile: its forest, siblings and Jobs as the indexes showed them when
    the reconcile began, and the reads its worker batch shares."""

    forest_body: Mapping[str, Any] | None = None
    forest_branches: ForestBranches = field(default_factory=lambda: ForestBranches([]))
    jobs: Mapping[str, JobState] = field(default_factory=dict)
    reads: PassReads = field(default_factory=PassReads)

    def forest(self, name: str) -> Mapping[str, Any] | None:
        return self.forest_body

    def branches(self, forest: str) -> ForestBranches:
        return self.forest_branches

    def reserved(self, forest: str) -> set[str]:
        return self.ctx.reserved(self.namespace, forest)

    def job(self, name: str) -> JobState | None:
        job = self.jobs.get(name)
        if job is None and self.ctx.expectations.job_pending((self.namespace, name)):
            return JobState(name, "Running")  # just created; the watch has not shown it yet
        return job

    def manifest(self, storage: ForestStorage) -> Manifest | None:
        return self.reads.manifest(storage)

    def used_versions(self, storage: ForestStorage) -> dict[str, int]:
        return self.reads.used_versions(storage)


@dataclass
class ClusterForestSource(_Storage):
    """One forest's reconcile: its Jobs, branches and servers as the indexes showed them."""

    jobs: Mapping[str, JobState] = field(default_factory=dict)
    forest_branches: ForestBranches = field(default_factory=lambda: ForestBranches([]))
    serving: Mapping[str, OwnedObject] = field(default_factory=dict)
    runs_servers: bool = True
    requires_image: bool = True

    def forest_jobs(self, forest: str) -> dict[str, JobState]:
        return dict(self.jobs)

    def branches(self, forest: str) -> ForestBranches:
        return self.forest_branches

    def serving_objects(self, forest: str) -> dict[str, OwnedObject]:
        return dict(self.serving)


@dataclass
class ClusterSetSource(_Storage):
    """One cluster set's reconcile: its forest, Jobs and generated branches as the indexes
    showed them."""

    forest_body: Mapping[str, Any] | None = None
    jobs: Mapping[str, JobState] = field(default_factory=dict)
    generated: list[Mapping[str, Any]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # every branch of the namespace

    def forest(self, name: str) -> Mapping[str, Any] | None:
        return self.forest_body

    def set_jobs(self, name: str) -> dict[str, JobState]:
        return dict(self.jobs)

    def set_branches(self, name: str) -> Sequence[Mapping[str, Any]]:
        return list(self.generated)

    def branch_names(self) -> set[str]:
        return set(self.names)
