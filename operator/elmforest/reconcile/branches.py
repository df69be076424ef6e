"""Reconcile one ElmBranch (and finalize it on deletion): observe, plan, apply.

The branch's own finalizer (not Kopf's) guards what outlives the branch's Jobs: its run in
storage (with retention Delete) and its expert in the manifest. It is added just before the
first of those exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from elmcore.manifest import Manifest
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.adapters.kube import SecretNotFoundError
from elmforest.api import BRANCH, FOREST
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.planner.actions import (
    CreateJob,
    DeleteExpertFiles,
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
    spec_fingerprint,
    superseded_prepare_name,
)
from elmforest.planner.conditions import READY, set_condition
from elmforest.planner.naming import BRANCH_FINALIZER
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.prepare import Preparation
from elmforest.planner.siblings import (
    ForestBranches,
    Sibling,
    forest_view,
    owner_before_deletion,
)
from elmforest.reconcile.apply import apply_plan
from elmforest.reconcile.batch import Batch
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.forests import validation_message

STORAGE_ACTIONS = (MergeResult, RemoveExpert, DeleteExpertFiles)
CONFLICT_RETRY_SECONDS = 1.0  # the object changed under a write: the watch brings it shortly


@dataclass(frozen=True)
class Outcome:
    requeue_after: float | None  # seconds; None: wait for a change
    before: str | None  # the branch's phase before this reconcile
    after: str | None  # and after it (None: not planned yet)
    deleting: bool = False


async def _invalid(ctx: OperatorContext, body: Mapping[str, Any], message: str) -> None:
    status = ElmBranchStatus.model_validate(body.get("status") or {})
    generation = int(body["metadata"].get("generation") or 0)
    new = status.model_copy(deep=True)
    new.phase, new.message, new.observed_generation = "Failed", message, generation
    new.conditions = set_condition(
        new.conditions, READY, "False", "InvalidSpec", message, generation
    )
    plan = Plan()
    if new.to_api() != status.to_api():
        plan.add(Event("Warning", "InvalidSpec", message), PatchStatus(new.to_api()))
    await apply_plan(ctx, BRANCH, body, plan, None)


def _records_version(
    spec: ElmBranchSpec, status: ElmBranchStatus, job: JobState | None
) -> int | None:
    """The version whose run records the planner needs; None when it cannot use them: a new
    version never ran, and a Job with no pod yet has written nothing."""
    if status.version is None or status.spec_hash != spec_fingerprint(spec):
        return None
    if job is not None and job.phase == "Running" and not job.started:
        return None
    return status.version


def _needs_finalizer(plan: Plan, status: ElmBranchStatus, retention: str) -> bool:
    """Whether the branch has (or is about to have) something outside Kubernetes' garbage
    collection to clean up on deletion: an expert in the manifest, or, with retention Delete,
    a run in storage. A branch that keeps its files needs none until it merges: its Jobs go by
    owner reference, and one write (and its watch echo) per branch is saved."""
    if status.merged_version is not None or any(
        isinstance(a, STORAGE_ACTIONS) for a in plan.actions
    ):
        return True
    return retention == "Delete" and (
        status.job_name is not None or any(isinstance(a, CreateJob) for a in plan.actions)
    )


async def _set_finalizer(ctx: OperatorContext, body: Mapping[str, Any], present: bool) -> bool:
    """Add or remove the branch's finalizer; False if the object changed meanwhile (retry)."""
    meta = body["metadata"]
    current = list(meta.get("finalizers") or [])
    wanted = [f for f in current if f != BRANCH_FINALIZER] + ([BRANCH_FINALIZER] if present else [])
    if wanted == current:
        return True
    key = (meta["namespace"], meta["name"])
    version = await ctx.io(
        ctx.kube.set_finalizers, BRANCH, *key, meta.get("resourceVersion", ""), wanted
    )
    ctx.expectations.wrote(key, version)
    return version is not None


async def reconcile_branch(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    forest: Mapping[str, Any] | None,
    branches: ForestBranches,
    jobs: Mapping[str, JobState],
    batch: Batch | None = None,
) -> Outcome:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    before = (body.get("status") or {}).get("phase")
    ctx.metrics.count("reconciles", BRANCH.kind)
    if meta.get("deletionTimestamp"):
        if BRANCH_FINALIZER not in (meta.get("finalizers") or []):
            return Outcome(None, before, None, deleting=True)  # nothing of ours, or done
        await finalize_branch(ctx, body, forest, branches.siblings)
        ctx.wakeups.wake((FOREST.kind, namespace, str((body.get("spec") or {}).get("forest"))))
        done = await _set_finalizer(ctx, body, present=False)
        return Outcome(None if done else CONFLICT_RETRY_SECONDS, before, None, deleting=True)
    try:
        spec = ElmBranchSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        await _invalid(ctx, body, validation_message(error, "spec"))
        return Outcome(None, before, "Failed")
    status = ElmBranchStatus.model_validate(body.get("status") or {})
    view = forest_view(forest, ctx.settings.defaults)
    job = jobs.get(status.job_name) if status.job_name else None
    if (
        job is None
        and status.job_name
        and ctx.expectations.job_pending((namespace, status.job_name))
    ):
        job = JobState(status.job_name, "Running")  # just created; the watch has not shown it
    storage: ForestStorage | None = None
    records, merged = RunRecords(), None
    preparation: Preparation | None = None
    steady = status.phase == "Merged" and status.merged_version == status.version
    if view is not None and not steady:
        try:
            storage = await ctx.storage(namespace, view.spec.storage)
        except SecretNotFoundError as error:
            await _invalid(ctx, body, str(error))
            return Outcome(ctx.settings.resync_seconds, before, "Failed")
        manifest = (await batch.view(storage)).manifest if batch is not None else None
        if manifest is not None and manifest.tokenizer and manifest.seed:
            # Storage is the truth: a forest whose seed is merged is ready, whether or not
            # the forest's own loop has written that to its status yet.
            view = replace(view, ready=True, observed=True)
        version = _records_version(spec, status, job)
        used = None
        if status.version is None:  # a new (or re-created) branch picks its first version
            used = await (batch.used_versions(storage) if batch else ctx.io(storage.used_versions))
        records, merged = await ctx.io(storage.observe_branch, spec.domain, version, manifest, used)
        if job is None or job.phase == "Failed":  # the planner may start a Job: prepare first?
            preparation = await _preparation(ctx, storage, spec, status, manifest, jobs, name)
    # Slots are counted and taken under the forest's lock, so two branches never race for one.
    async with ctx.forest_lock(namespace, spec.forest):
        others = (branches.active | ctx.reserved(namespace, spec.forest)) - {name}
        inp = BranchInput(
            name=name,
            namespace=namespace,
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            spec=spec,
            status=status,
            forest=view,
            domain_owner=branches.owners.get(spec.domain),
            active_elsewhere=len(others),
            job=job,
            records=records,
            merged=merged,
            preparation=preparation,
            superseded_prepare=_job(jobs, superseded_prepare_name(name, spec, status)),
        )
        plan = plan_branch(inp)
        if any(isinstance(a, CreateJob) for a in plan.actions):
            ctx.reserve(namespace, spec.forest, name)
        # Manifest writes of one forest go in turn (no compare-and-swap retries); the rest of a
        # plan (status, Events, Jobs) needs only the slot taken above, so it runs outside the
        # lock and a thousand new branches do not queue behind one another's API calls.
        writes_storage = any(isinstance(a, STORAGE_ACTIONS) for a in plan.actions)
        if writes_storage:
            applied = await _apply(ctx, body, plan, status, storage)
    if not writes_storage:
        applied = await _apply(ctx, body, plan, status, storage)
    if not applied:
        ctx.release(namespace, spec.forest, name)
        return Outcome(CONFLICT_RETRY_SECONDS, before, before)
    if writes_storage:
        ctx.wakeups.wake((FOREST.kind, namespace, spec.forest))  # its manifest changed
    phase = plan.phase(status.phase or "")
    if phase not in ACTIVE:
        ctx.release(namespace, spec.forest, name)
    ctx.metrics.phase(BRANCH.kind, namespace, name, phase or None)
    return Outcome(plan.requeue_after, before, phase or None)


async def _preparation(
    ctx: OperatorContext,
    storage: ForestStorage,
    spec: ElmBranchSpec,
    status: ElmBranchStatus,
    manifest: Manifest | None,
    jobs: Mapping[str, JobState],
    name: str,
) -> Preparation | None:
    """The prepare step of the branch's current version, as far as the planner needs it."""
    step = current_prepare(name, spec, status)
    job, run_id = (jobs.get(step[0]), step[1]) if step else (None, None)
    return await ctx.io(storage.preparation, manifest, prepare_datasets(spec), job, run_id)


def _job(jobs: Mapping[str, JobState], name: str | None) -> JobState | None:
    return jobs.get(name) if name else None


async def _apply(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    plan: Plan,
    status: ElmBranchStatus,
    storage: ForestStorage | None,
) -> bool:
    """The finalizer first (before anything it must clean up exists), then the plan."""
    retention = str((body.get("spec") or {}).get("retention", "Keep"))
    if _needs_finalizer(plan, status, retention) and not await _set_finalizer(
        ctx, body, present=True
    ):
        return False
    await apply_plan(ctx, BRANCH, body, plan, storage)
    return True


async def finalize_branch(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    forest: Mapping[str, Any] | None,
    siblings: list[Sibling],
) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        spec = ElmBranchSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return  # never valid, never trained: nothing to remove
    view = forest_view(forest, ctx.settings.defaults)
    ctx.release(namespace, spec.forest, name)
    ctx.metrics.phase(BRANCH.kind, namespace, name, None)
    if view is None:
        return  # the forest is gone; its storage is the user's to keep or delete
    storage = await ctx.storage(namespace, view.spec.storage)
    merged = await ctx.io(storage.merged_expert, spec.domain)
    inp = BranchInput(
        name=name,
        namespace=namespace,
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=spec,
        status=ElmBranchStatus.model_validate(body.get("status") or {}),
        forest=view,
        domain_owner=owner_before_deletion(siblings, name, spec.domain),
        merged=merged,
    )
    await apply_plan(ctx, BRANCH, body, plan_deletion(inp), storage)
