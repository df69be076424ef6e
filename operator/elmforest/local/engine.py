"""Local mode's reconcile loop: the operator's planners, with the state file as the API server.

Each step observes every object through the operator's own observation (``elmforest.observe``:
the engine is this mode's source of objects, Jobs and storage), asks the same pure planners,
and applies their actions here: statuses to the state, Jobs to the process runner, merges and
removals to the forest's storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, assert_never

from elmcore.manifest import Manifest
from elmcore.records import Progress
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api import BRANCH, FOREST
from elmforest.api.forest import StorageSpec
from elmforest.api.immutable import changed_immutable_fields
from elmforest.local import cluster_sets
from elmforest.local.resources import Declaration, Declared, ManifestError
from elmforest.local.runner import ProcessRunner
from elmforest.local.state import LocalState, ObjectRecord
from elmforest.observe import observe_branch, observe_forest
from elmforest.observe.clusterset import observe_cluster_set
from elmforest.observe.reads import PassReads
from elmforest.planner.actions import (
    ApplyObject,
    CreateJob,
    DeleteExpertFiles,
    DeleteJob,
    DeleteObject,
    Event,
    MergeResult,
    PatchStatus,
    Plan,
    RemoveExpert,
)
from elmforest.planner.branch import plan_branch, plan_deletion
from elmforest.planner.clusterset import plan_cluster_set
from elmforest.planner.defaults import Defaults
from elmforest.planner.forest import plan_forest
from elmforest.planner.observed import JobState, OwnedObject, RunRecords
from elmforest.planner.policy import Policy
from elmforest.planner.siblings import ForestBranches, sibling

SETTLED_BRANCH = frozenset({"Merged", "Failed", "Suspended"})
EventSink = Callable[[ObjectRecord, Event], None]
LogSink = Callable[[str], None]


@dataclass
class Engine:
    state: LocalState
    runner: ProcessRunner
    on_event: EventSink
    on_log: LogSink
    storages: dict[StorageSpec, ForestStorage] = field(default_factory=dict)
    progress: dict[str, Progress] = field(default_factory=dict)  # forest -> tokenizer/seed run
    # Reads shared by one step: each forest's manifest is read once for all of its branches
    # (only a branch changes its own entry), as the operator's worker batches do.
    reads: PassReads = field(default_factory=PassReads)

    # ---- declarations -> objects -------------------------------------------------------------

    def declare(self, declaration: Declaration) -> None:
        """Create, update (a new generation) or mark for deletion, as ``kubectl apply --prune``.

        Every change to an immutable field is reported (one line each) before anything changes.
        """
        pairs = (
            (self.state.forests, declaration.forests),
            (self.state.branches, declaration.branches),
            (self.state.cluster_sets, declaration.cluster_sets),
        )
        problems = [
            problem
            for records, declared in pairs
            for item in declared.values()
            if (problem := _immutable_change(records.get(item.name), item))
        ]
        if problems:
            raise ManifestError("\n".join(problems))
        for records, declared in pairs:
            for item in declared.values():
                self._upsert(records, item)
            for name, record in records.items():
                if name not in declared and record.owner is None:  # generated: its owner's
                    record.deleting = True

    def delete(self, declaration: Declaration) -> None:
        """``down``: the declared objects go, and with a forest, all of its branches."""
        forests = set(declaration.forests)
        for name, record in self.state.cluster_sets.items():
            if name in declaration.cluster_sets or record.spec.get("forest") in forests:
                record.deleting = True
        for name, record in self.state.branches.items():
            if name in declaration.branches or record.spec.get("forest") in forests:
                record.deleting = True
        for name in forests & set(self.state.forests):
            self.state.forests[name].deleting = True

    def _upsert(self, records: dict[str, ObjectRecord], item: Declared) -> None:
        record = records.get(item.name)
        if record is None:
            records[item.name] = ObjectRecord(
                kind=item.kind,
                name=item.name,
                created=self.state.stamp(),
                source=str(item.source),
                spec=item.raw_spec,
            )
            return
        if record.spec != item.raw_spec:
            record.spec, record.generation = item.raw_spec, record.generation + 1
        record.source, record.deleting = str(item.source), False

    # ---- one reconcile pass ------------------------------------------------------------------

    def step(self) -> None:
        self.reads = PassReads()
        for line in self.runner.sync(self.state):
            self.on_log(line)
        for record in list(self.state.forests.values()):
            if record.deleting:
                self._finalize_forest(record)
            else:
                self._reconcile_forest(record)
        for record in list(self.state.cluster_sets.values()):
            if record.deleting:
                self._finalize_cluster_set(record)
            else:
                self._reconcile_cluster_set(record)
        for record in list(self.state.branches.values()):
            if record.deleting:
                self._finalize_branch(record)
            else:
                self._reconcile_branch(record)
        for line in self.runner.sync(self.state):
            self.on_log(line)

    def finalize(self) -> None:
        """Carry out pending deletions only (``down``): branches first, then their forests."""
        self.reads = PassReads()
        for record in [s for s in self.state.cluster_sets.values() if s.deleting]:
            cluster_sets.release(self.state, record)
        for record in [b for b in self.state.branches.values() if b.deleting]:
            self._finalize_branch(record)
        for record in [s for s in self.state.cluster_sets.values() if s.deleting]:
            self._finalize_cluster_set(record)
        for record in [f for f in self.state.forests.values() if f.deleting]:
            self._finalize_forest(record)

    def settled(self) -> bool:
        """Nothing left to do until the files change: no Job runs, every object is final."""
        if any(job.phase in ("Pending", "Running") for job in self.state.jobs.values()):
            return False
        records = [*self.state.forests.values(), *self.state.branches.values()]
        if any(r.deleting for r in [*records, *self.state.cluster_sets.values()]):
            return False
        for cluster_set in self.state.cluster_sets.values():
            forest = self.state.forests.get(str(cluster_set.spec.get("forest")))
            if forest is not None and forest.status.get("phase") == "Failed":
                continue  # it waits for a fixed forest
            if cluster_set.status.get("phase") not in ("Ready", "Failed"):
                return False
        for forest in self.state.forests.values():
            phase = forest.status.get("phase")
            if phase == "Failed":
                continue  # its branches wait for a fixed forest: that is the user's move
            if phase != "Ready":
                return False
            if (forest.status.get("mix") or {}).get("phase") == "Mixing":
                return False  # a mix Job is planned or its result not recorded yet
            for branch in self.branches_of(forest.name):
                if branch.status.get("phase") not in SETTLED_BRANCH:
                    return False
        return True

    def branches_of(self, forest: str) -> list[ObjectRecord]:
        return [b for b in self.state.branches.values() if b.spec.get("forest") == forest]

    def storage(self, spec: StorageSpec) -> ForestStorage:
        if spec not in self.storages:
            self.storages[spec] = ForestStorage(spec)
        return self.storages[spec]

    # ---- observation: this mode's side of elmforest.observe's sources ----------------------

    @property
    def defaults(self) -> Defaults | None:
        return None  # no chart: a spec's own values and the models' defaults

    policy = Policy()  # one person's machine: no guardrails between teams
    runs_servers = False  # `elmforest serve -f` serves; no Deployment on this machine
    requires_image = False  # Jobs are local processes

    def forest(self, name: str) -> dict[str, Any] | None:
        record = self.state.forests.get(name)
        return record.body() if record is not None else None

    def branches(self, forest: str) -> ForestBranches:
        # Read afresh (not once per step): a branch given a slot earlier in this step holds it.
        return ForestBranches([sibling(b.body()) for b in self.branches_of(forest)])

    def reserved(self, forest: str) -> set[str]:
        return set()  # one step at a time: a slot taken shows in the state at once

    def job(self, name: str) -> JobState | None:
        job = self.state.jobs.get(name)
        return self.runner.job_state(job) if job is not None else None

    def forest_jobs(self, forest: str) -> dict[str, JobState]:
        owner = f"{FOREST.kind}/{forest}"
        return {n: self.runner.job_state(j) for n, j in self.state.jobs.items() if j.owner == owner}

    def serving_objects(self, forest: str) -> dict[str, OwnedObject]:
        return {}

    def set_jobs(self, name: str) -> dict[str, JobState]:
        owner = cluster_sets.owner_of(name)
        return {n: self.runner.job_state(j) for n, j in self.state.jobs.items() if j.owner == owner}

    def set_branches(self, name: str) -> list[dict[str, Any]]:
        return [b.body() for b in cluster_sets.generated_branches(self.state, name)]

    def branch_names(self) -> set[str]:
        return set(self.state.branches)

    def manifest(self, storage: ForestStorage) -> Manifest | None:
        return self.reads.manifest(storage)

    def used_versions(self, storage: ForestStorage) -> dict[str, int]:
        return self.reads.used_versions(storage)

    # ---- forests -----------------------------------------------------------------------------

    def _reconcile_forest(self, record: ObjectRecord) -> None:
        observed = observe_forest(self, record.body())
        self._remember_progress(record.name, observed.input.records)
        self._apply(record, plan_forest(observed.input, observed.spec_error), observed.storage)

    def _remember_progress(self, forest: str, records: dict[str, RunRecords]) -> None:
        progress = next((r.progress for r in records.values() if r.progress), None)
        if progress is None:
            self.progress.pop(forest, None)
        else:
            self.progress[forest] = progress

    def _finalize_forest(self, record: ObjectRecord) -> None:
        if self.branches_of(record.name):
            return  # its branches leave first (their experts leave the manifest)
        owner = f"{FOREST.kind}/{record.name}"
        for name in [n for n, j in self.state.jobs.items() if j.owner == owner]:
            self.runner.delete(self.state, name)
        del self.state.forests[record.name]
        self.on_log(f"forest {record.name}: removed (its storage is kept)")

    # ---- cluster sets ------------------------------------------------------------------------

    def _reconcile_cluster_set(self, record: ObjectRecord) -> None:
        observed = observe_cluster_set(self, record.body())
        self._apply(record, plan_cluster_set(observed.input, observed.spec_error), None)

    def _finalize_cluster_set(self, record: ObjectRecord) -> None:
        if not cluster_sets.release(self.state, record):
            return  # its branches leave first (their experts leave the manifest)
        owner = cluster_sets.owner_of(record.name)
        for name in [n for n, j in self.state.jobs.items() if j.owner == owner]:
            self.runner.delete(self.state, name)
        del self.state.cluster_sets[record.name]
        self.on_log(f"cluster set {record.name}: removed (its clusters' files are kept)")

    # ---- branches ----------------------------------------------------------------------------

    def _reconcile_branch(self, record: ObjectRecord) -> None:
        inp = observe_branch(self, record.body())
        storage = self.storage(inp.forest.spec.storage) if inp.forest is not None else None
        self._apply(record, plan_branch(inp), storage)

    def _finalize_branch(self, record: ObjectRecord) -> None:
        inp = observe_branch(self, record.body())
        if inp.forest is not None:
            plan = plan_deletion(inp)
            self._apply(record, plan, self.storage(inp.forest.spec.storage))
            if plan.requeue_after is not None:  # its storage is unreachable: try again later
                self.on_log(f"branch {record.name}: {record.status.get('message', '')}")
                return
        owner = f"{BRANCH.kind}/{record.name}"
        for name in [n for n, j in self.state.jobs.items() if j.owner == owner]:
            self.runner.delete(self.state, name)
        del self.state.branches[record.name]
        self.on_log(f"branch {record.name}: removed")

    # ---- actions -----------------------------------------------------------------------------

    def _apply(self, record: ObjectRecord, plan: Plan, storage: ForestStorage | None) -> None:
        for action in plan.actions:
            match action:
                case PatchStatus(status=status):
                    record.status = status
                case CreateJob(body=body):
                    if self.runner.submit(self.state, body):
                        self.on_log(f"{record.name}: Job {body['metadata']['name']} created")
                case DeleteJob(name=name, reason=reason):
                    self.runner.delete(self.state, name)
                    self.on_log(f"{record.name}: Job {name} deleted ({reason})")
                case MergeResult() | RemoveExpert() | DeleteExpertFiles():
                    assert storage is not None
                    self.on_log(f"{record.name}: {storage.apply(action)}")
                case Event():
                    self.on_event(record, action)
                case ApplyObject(body=body) if body["kind"] == BRANCH.kind:
                    if cluster_sets.apply_branch(self.state, body, record.source):
                        self.on_log(f"{record.name}: ElmBranch {body['metadata']['name']} applied")
                case DeleteObject(kind=BRANCH.kind, name=name):
                    if name in self.state.branches:
                        self.state.branches[name].deleting = True
                        self.on_log(f"{record.name}: ElmBranch {name} deleted")
                case ApplyObject() | DeleteObject():
                    # Servers are not this mode's (observation hides spec.serving): say so
                    # rather than drop a planner's action silently.
                    raise ManifestError(
                        f"{record.name}: local mode runs no {type(action).__name__} "
                        "(serve the forest with `elmforest serve -f`)"
                    )
                case _:
                    assert_never(action)


def _immutable_change(record: ObjectRecord | None, item: Declared) -> str:
    """What the API server's ``self == oldSelf`` rules would refuse in this update, or ''."""
    if record is None or record.spec == item.raw_spec:
        return ""
    old = type(item.spec).model_validate(record.spec)
    changed = changed_immutable_fields(old, item.spec)
    if not changed:
        return ""
    return (
        f"{item.where}: {item.kind} {item.name!r}: {', '.join(changed)}: is immutable once set "
        "(delete the object first, or give the new one another name)"
    )
