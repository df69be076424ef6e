"""Local mode's reconcile loop: the operator's planners, with the state file as the API server.

Each step observes every object (state, storage, local Jobs), asks the same pure planners the
operator asks, and applies their actions here: statuses to the state, Jobs to the process
runner, merges and removals to the forest's storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from elmcore.manifest import Manifest
from elmcore.records import Progress
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api import BRANCH, FOREST
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.api.forest import ElmForestSpec, ElmForestStatus, StorageSpec
from elmforest.api.immutable import changed_immutable_fields
from elmforest.local.resources import Declaration, Declared, ManifestError
from elmforest.local.runner import ProcessRunner
from elmforest.local.state import LocalState, ObjectRecord
from elmforest.planner.actions import (
    CreateJob,
    DeleteExpertFiles,
    DeleteJob,
    Event,
    MergeResult,
    PatchStatus,
    Plan,
    RemoveExpert,
)
from elmforest.planner.branch import (
    ACTIVE,
    BranchInput,
    current_prepare,
    plan_branch,
    plan_deletion,
    prepare_datasets,
    superseded_prepare_name,
)
from elmforest.planner.forest import (
    SEED_PREPARE_RUN,
    ForestInput,
    plan_forest,
    seed_prepare,
)
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.prepare import Preparation
from elmforest.planner.siblings import (
    domain_owner,
    forest_view,
    owner_before_deletion,
    owners_by_domain,
    sibling,
)

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
    # Each forest's manifest as read at the start of this step: its branches read their own
    # entries from it (only a branch changes its own entry), one read per forest, not per branch.
    manifests: dict[str, Manifest] = field(default_factory=dict)

    # ---- declarations -> objects -------------------------------------------------------------

    def declare(self, declaration: Declaration) -> None:
        """Create, update (a new generation) or mark for deletion, as ``kubectl apply --prune``.

        Every change to an immutable field is reported (one line each) before anything changes.
        """
        pairs = (
            (self.state.forests, declaration.forests),
            (self.state.branches, declaration.branches),
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
                if name not in declared:
                    record.deleting = True

    def delete(self, declaration: Declaration) -> None:
        """``down``: the declared objects go, and with a forest, all of its branches."""
        forests = set(declaration.forests)
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
        for line in self.runner.sync(self.state):
            self.on_log(line)
        for record in list(self.state.forests.values()):
            if record.deleting:
                self._finalize_forest(record)
            else:
                self._reconcile_forest(record)
        for record in list(self.state.branches.values()):
            if record.deleting:
                self._finalize_branch(record)
            else:
                self._reconcile_branch(record)
        for line in self.runner.sync(self.state):
            self.on_log(line)

    def finalize(self) -> None:
        """Carry out pending deletions only (``down``): branches first, then their forests."""
        for record in [b for b in self.state.branches.values() if b.deleting]:
            self._finalize_branch(record)
        for record in [f for f in self.state.forests.values() if f.deleting]:
            self._finalize_forest(record)

    def settled(self) -> bool:
        """Nothing left to do until the files change: no Job runs, every object is final."""
        if any(job.phase in ("Pending", "Running") for job in self.state.jobs.values()):
            return False
        if any(r.deleting for r in [*self.state.forests.values(), *self.state.branches.values()]):
            return False
        for forest in self.state.forests.values():
            phase = forest.status.get("phase")
            if phase == "Failed":
                continue  # its branches wait for a fixed forest: that is the user's move
            if phase != "Ready":
                return False
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

    # ---- forests -----------------------------------------------------------------------------

    def _reconcile_forest(self, record: ObjectRecord) -> None:
        spec = ElmForestSpec.model_validate(record.spec)
        storage = self.storage(spec.storage)
        view, records = storage.observe_forest()
        if view.manifest is not None:
            self.manifests[record.name] = view.manifest
        else:
            self.manifests.pop(record.name, None)
        owner = f"{FOREST.kind}/{record.name}"
        jobs = {n: self.runner.job_state(j) for n, j in self.state.jobs.items() if j.owner == owner}
        siblings = [sibling(b.body()) for b in self.branches_of(record.name)]
        self._remember_progress(record.name, records)
        preparation = None
        step = seed_prepare(record.name, spec, view.manifest)
        if step is not None and view.manifest is not None:
            job_name, datasets = step
            preparation = storage.preparation(
                view.manifest, datasets, self._job_state(job_name), SEED_PREPARE_RUN
            )
        inp = ForestInput(
            name=record.name,
            namespace="local",
            uid=record.uid,
            generation=record.generation,
            # Local mode trains; `elmforest serve -f` serves (no Deployment on this machine).
            spec=spec.model_copy(update={"serving": None}),
            status=ElmForestStatus.model_validate(record.status),
            storage=view,
            jobs=jobs,
            records=records,
            branches_by_domain=owners_by_domain(siblings),
            require_image=False,
            preparation=preparation,
        )
        self._apply(record, plan_forest(inp), storage)

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

    # ---- branches ----------------------------------------------------------------------------

    def _branch_input(self, record: ObjectRecord, deleting: bool = False) -> BranchInput:
        spec = ElmBranchSpec.model_validate(record.spec)
        status = ElmBranchStatus.model_validate(record.status)
        forest = self.state.forests.get(spec.forest)
        body = forest.body() if forest is not None else None
        if body is not None and deleting:
            # `down` of a whole forest: its branches still leave its manifest first.
            body["metadata"].pop("deletionTimestamp", None)
        view = forest_view(body)
        siblings = [sibling(b.body()) for b in self.branches_of(spec.forest)]
        records, merged = RunRecords(), None
        steady = status.phase == "Merged" and status.merged_version == status.version
        if view is not None and (deleting or not steady):
            storage = self.storage(view.spec.storage)
            # A deletion reads the manifest afresh: it must see what is there now.
            manifest = None if deleting else self.manifests.get(spec.forest)
            used = storage.used_versions() if status.version is None else None
            records, merged = storage.observe_branch(spec.domain, status.version, manifest, used)
        job = self.state.jobs.get(status.job_name) if status.job_name else None
        preparation = None
        if (
            view is not None
            and not deleting
            and (job is None or self.runner.job_state(job).phase == "Failed")
        ):
            preparation = self._branch_preparation(record.name, spec, status, view.spec)
        active = [s for s in siblings if s.name != record.name and s.phase in ACTIVE]
        return BranchInput(
            name=record.name,
            namespace="local",
            uid=record.uid,
            generation=record.generation,
            spec=spec,
            status=status,
            forest=view,
            domain_owner=(
                owner_before_deletion(siblings, record.name, spec.domain)
                if deleting
                else domain_owner(siblings, spec.domain)
            ),
            active_elsewhere=len(active),
            job=self.runner.job_state(job) if job is not None else None,
            records=records,
            merged=merged,
            preparation=preparation,
            superseded_prepare=self._job_state(superseded_prepare_name(record.name, spec, status)),
        )

    def _branch_preparation(
        self, name: str, spec: ElmBranchSpec, status: ElmBranchStatus, forest: ElmForestSpec
    ) -> Preparation | None:
        step = current_prepare(name, spec, status)
        job, run_id = (self._job_state(step[0]), step[1]) if step else (None, None)
        return self.storage(forest.storage).preparation(
            self.manifests.get(spec.forest), prepare_datasets(spec), job, run_id
        )

    def _job_state(self, name: str | None) -> JobState | None:
        job = self.state.jobs.get(name) if name else None
        return self.runner.job_state(job) if job is not None else None

    def _reconcile_branch(self, record: ObjectRecord) -> None:
        inp = self._branch_input(record)
        storage = self.storage(inp.forest.spec.storage) if inp.forest is not None else None
        self._apply(record, plan_branch(inp), storage)

    def _finalize_branch(self, record: ObjectRecord) -> None:
        inp = self._branch_input(record, deleting=True)
        if inp.forest is not None:
            self._apply(record, plan_deletion(inp), self.storage(inp.forest.spec.storage))
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
