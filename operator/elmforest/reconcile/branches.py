"""Reconcile one ElmBranch (and finalize it on deletion): observe, plan, apply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from elmforest.adapters.forest_storage import ForestStorage
from elmforest.adapters.kube import SecretNotFoundError
from elmforest.api import BRANCH
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
from elmforest.planner.branch import ACTIVE, BranchInput, plan_branch, plan_deletion
from elmforest.planner.conditions import READY, set_condition
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.siblings import Sibling, domain_owner, forest_view, owner_before_deletion
from elmforest.reconcile.apply import apply_plan
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.forests import validation_message

STORAGE_ACTIONS = (MergeResult, RemoveExpert, DeleteExpertFiles)


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


async def reconcile_branch(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    forest: Mapping[str, Any] | None,
    siblings: list[Sibling],
    jobs: Mapping[str, JobState],
) -> float | None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    ctx.metrics.count("reconciles", BRANCH.kind)
    try:
        spec = ElmBranchSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        await _invalid(ctx, body, validation_message(error, "spec"))
        return None
    status = ElmBranchStatus.model_validate(body.get("status") or {})
    view = forest_view(forest, ctx.settings.defaults)
    storage: ForestStorage | None = None
    records, merged = RunRecords(), None
    steady = status.phase == "Merged" and status.merged_version == status.version
    if view is not None and not steady:
        try:
            storage = await ctx.storage(namespace, view.spec.storage)
        except SecretNotFoundError as error:
            await _invalid(ctx, body, str(error))
            return ctx.settings.resync_seconds
        records, merged = await ctx.io(storage.observe_branch, spec.domain, status.version)
    # Slots are counted and taken under the forest's lock, so two branches never race for one.
    async with ctx.forest_lock(namespace, spec.forest):
        others = {s.name for s in siblings if s.name != name and s.phase in ACTIVE}
        others |= ctx.reserved(namespace, spec.forest) - {name}
        inp = BranchInput(
            name=name,
            namespace=namespace,
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            spec=spec,
            status=status,
            forest=view,
            domain_owner=domain_owner(siblings, spec.domain),
            active_elsewhere=len(others),
            job=jobs.get(status.job_name) if status.job_name else None,
            records=records,
            merged=merged,
        )
        plan = plan_branch(inp)
        if any(isinstance(a, CreateJob) for a in plan.actions):
            ctx.reserve(namespace, spec.forest, name)
        # Manifest writes of one forest go in turn (no compare-and-swap retries); the rest of a
        # plan (status, Events, Jobs) needs only the slot taken above, so it runs outside the
        # lock and a thousand new branches do not queue behind one another's API calls.
        writes_storage = any(isinstance(a, STORAGE_ACTIONS) for a in plan.actions)
        if writes_storage:
            await apply_plan(ctx, BRANCH, body, plan, storage)
    if not writes_storage:
        await apply_plan(ctx, BRANCH, body, plan, storage)
    phase = plan.phase(status.phase)
    if phase not in ACTIVE:
        ctx.release(namespace, spec.forest, name)
    ctx.metrics.phase(BRANCH.kind, namespace, name, phase)
    return plan.requeue_after


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
