"""Reconcile one ElmForest: observe its storage and Jobs, plan, apply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from elmcore.errors import ElmError
from elmcore.records import ServingRecord
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.adapters.kube import SecretNotFoundError
from elmforest.api import FOREST
from elmforest.api.forest import ElmForestSpec, ElmForestStatus
from elmforest.planner.forest import (
    SEED_PREPARE_RUN,
    ForestInput,
    plan_forest,
    seed_prepare,
)
from elmforest.planner.observed import JobState, OwnedObject, RunRecords, StorageView
from elmforest.planner.prepare import Preparation
from elmforest.reconcile.apply import apply_plan
from elmforest.reconcile.context import OperatorContext


def validation_message(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{prefix}.{where}: {first['msg']}" if where else f"{prefix}: {first['msg']}"


async def reconcile_forest(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    jobs: Mapping[str, JobState],
    branches_by_domain: dict[str, str],
    serving: Mapping[str, OwnedObject] | None = None,
) -> float | None:
    with ctx.metrics.timed(FOREST.kind):
        return await _reconcile_forest(ctx, body, jobs, branches_by_domain, serving or {})


def _serving_records(storage: ForestStorage) -> list[ServingRecord]:
    try:
        return storage.serving_records()
    except ElmError:
        return []  # unreadable now: the status shows no served revision until next time


async def _seed_preparation(
    ctx: OperatorContext,
    storage: ForestStorage,
    spec: ElmForestSpec,
    view: StorageView,
    jobs: Mapping[str, JobState],
    name: str,
) -> Preparation | None:
    """The seed text's prepare step, while the seed is still to be trained."""
    step = seed_prepare(name, spec, view.manifest)
    if step is None:
        return None
    job_name, datasets = step
    job = jobs.get(job_name)
    return await ctx.io(storage.preparation, view.manifest, datasets, job, SEED_PREPARE_RUN)


async def _reconcile_forest(
    ctx: OperatorContext,
    body: Mapping[str, Any],
    jobs: Mapping[str, JobState],
    branches_by_domain: dict[str, str],
    serving: Mapping[str, OwnedObject],
) -> float | None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status = ElmForestStatus.model_validate(body.get("status") or {})
    ctx.metrics.count("reconciles", FOREST.kind)
    spec: ElmForestSpec | None = None
    spec_error: str | None = None
    try:
        spec = ctx.settings.defaults.apply(ElmForestSpec.model_validate(body.get("spec") or {}))
    except ValidationError as error:
        spec_error = validation_message(error, "spec")
    view, storage = StorageView(), None
    records: dict[str, RunRecords] = {}
    serving_records: list[ServingRecord] = []
    preparation: Preparation | None = None
    if spec is not None:
        try:
            storage = await ctx.storage(namespace, spec.storage)
            view, records = await ctx.io(storage.observe_forest)
            preparation = await _seed_preparation(ctx, storage, spec, view, jobs, name)
            if spec.serving is not None:
                serving_records = await ctx.io(_serving_records, storage)
        except SecretNotFoundError as error:
            view = StorageView(error=str(error), error_reason="SecretNotFound")
    inp = ForestInput(
        name=name,
        namespace=namespace,
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=spec,
        status=status,
        storage=view,
        jobs=dict(jobs),
        records=records,
        branches_by_domain=branches_by_domain,
        preparation=preparation,
        serving=dict(serving),
        serving_records=serving_records,
    )
    plan = plan_forest(inp, spec_error)
    await apply_plan(ctx, FOREST, body, plan, storage)
    ctx.metrics.phase(FOREST.kind, namespace, name, plan.phase(status.phase))
    return plan.requeue_after
