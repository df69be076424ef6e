"""Reconcile one ElmBranch (and finalize it on deletion): observe, plan, apply.

The branch's own finalizer (not Kopf's) guards what outlives the branch's Jobs: its run in
storage (with retention Delete) and its expert in the manifest. It is added just before the
first of those exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from elmforest.adapters.errors import SecretError
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api import BRANCH, FOREST
from elmforest.api.branch import ElmBranchStatus
from elmforest.observe import InvalidSpecError, observe_branch
from elmforest.observe.branch import slots_elsewhere
from elmforest.planner.actions import (
    CreateJob,
    DeleteExpertFiles,
    Event,
    MergeResult,
    PatchStatus,
    Plan,
    RemoveExpert,
)
from elmforest.planner.branch import ACTIVE, plan_branch, plan_deletion
from elmforest.planner.conditions import READY, set_condition
from elmforest.planner.naming import BRANCH_FINALIZER
from elmforest.reconcile.apply import apply_plan
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.sources import ClusterBranchSource

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
    ctx: OperatorContext, body: Mapping[str, Any], source: ClusterBranchSource
) -> Outcome:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    before = (body.get("status") or {}).get("phase")
    ctx.metrics.count("reconciles", BRANCH.kind)
    if meta.get("deletionTimestamp"):
        if BRANCH_FINALIZER not in (meta.get("finalizers") or []):
            return Outcome(None, before, None, deleting=True)  # nothing of ours, or done
        blocked = await finalize_branch(ctx, body, source)
        if blocked is not None:  # its storage is unreachable: the branch says so, and waits
            return Outcome(blocked, before, None, deleting=True)
        ctx.wakeups.wake((FOREST.kind, namespace, str((body.get("spec") or {}).get("forest"))))
        done = await _set_finalizer(ctx, body, present=False)
        return Outcome(None if done else CONFLICT_RETRY_SECONDS, before, None, deleting=True)
    try:
        inp = await ctx.io(observe_branch, source, body)
    except InvalidSpecError as error:
        await _invalid(ctx, body, str(error))
        return Outcome(None, before, "Failed")
    except SecretError as error:
        await _invalid(ctx, body, str(error))
        return Outcome(ctx.settings.resync_seconds, before, "Failed")
    forest, status = inp.spec.forest, inp.status
    # Slots are counted and taken under the forest's lock, so two branches never race for one.
    async with ctx.forest_lock(namespace, forest):
        plan = plan_branch(replace(inp, active_elsewhere=slots_elsewhere(source, inp)))
        if any(isinstance(a, CreateJob) for a in plan.actions):
            ctx.reserve(namespace, forest, name)
        # Manifest writes of one forest go in turn (no compare-and-swap retries); the rest of a
        # plan (status, Events, Jobs) needs only the slot taken above, so it runs outside the
        # lock and a thousand new branches do not queue behind one another's API calls.
        writes_storage = any(isinstance(a, STORAGE_ACTIONS) for a in plan.actions)
        if writes_storage:
            applied = await _apply(ctx, body, plan, status, source.opened)
    if not writes_storage:
        applied = await _apply(ctx, body, plan, status, source.opened)
    if not applied:
        ctx.release(namespace, forest, name)
        return Outcome(CONFLICT_RETRY_SECONDS, before, before)
    if writes_storage:
        ctx.wakeups.wake((FOREST.kind, namespace, forest))  # its manifest changed
    phase = plan.phase(status.phase or "")
    if phase not in ACTIVE:
        ctx.release(namespace, forest, name)
    ctx.metrics.phase(BRANCH.kind, namespace, name, phase or None)
    return Outcome(plan.requeue_after, before, phase or None)


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
    ctx: OperatorContext, body: Mapping[str, Any], source: ClusterBranchSource
) -> float | None:
    """Clean up after a deleted branch; seconds to retry after when it cannot yet."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    ctx.metrics.phase(BRANCH.kind, namespace, name, None)
    try:
        inp = await ctx.io(observe_branch, source, body)
    except InvalidSpecError:
        return None  # never valid, never trained: nothing to remove
    ctx.release(namespace, inp.spec.forest, name)
    if inp.forest is None:
        return None  # the forest is gone; its storage is the user's to keep or delete
    plan = plan_deletion(inp)
    await apply_plan(ctx, BRANCH, body, plan, source.opened)
    return plan.requeue_after
