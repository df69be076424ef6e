"""Carry out a plan's actions in order, against Kubernetes and storage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, assert_never, cast

import kopf
import structlog

from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api import BRANCH, Kind
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
from elmforest.planner.diff import merge_patch
from elmforest.reconcile.context import OperatorContext

log = structlog.get_logger("elmforest.apply")


async def apply_plan(
    ctx: OperatorContext,
    kind: Kind,
    body: Mapping[str, Any],
    plan: Plan,
    storage: ForestStorage | None,
) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current_status = dict(body.get("status") or {})
    for action in plan.actions:
        match action:
            case PatchStatus(status=status):
                patch = merge_patch(current_status, status)
                if patch:
                    version = await ctx.io(ctx.kube.patch_status, kind, namespace, name, patch)
                    if kind is BRANCH:
                        ctx.expectations.wrote((namespace, name), version)
                    current_status = status
                    ctx.metrics.count("status_patches", kind.kind)
            case CreateJob(body=job):
                created = await ctx.io(ctx.kube.create_job, job)
                ctx.expectations.created_job((namespace, job["metadata"]["name"]))
                if created:
                    ctx.metrics.count("jobs_created", kind.kind)
                    log.info("job.created", job=job["metadata"]["name"], owner=name)
            case ApplyObject(body=owned):
                await ctx.io(ctx.kube.apply, owned)
                ctx.metrics.count("serving_applied", kind.kind)
                log.info("applied", kind=owned["kind"], name=owned["metadata"]["name"], owner=name)
            case DeleteObject(kind=object_kind, name=object_name):
                await ctx.io(ctx.kube.delete_object, object_kind, namespace, object_name)
                log.info("deleted", kind=object_kind, name=object_name, owner=name)
            case DeleteJob(name=job_name, reason=reason):
                await ctx.io(ctx.kube.delete_job, namespace, job_name)
                log.info("job.deleted", job=job_name, reason=reason)
            case MergeResult() | RemoveExpert() | DeleteExpertFiles():
                assert storage is not None
                done = await ctx.io(storage.apply, action)
                if isinstance(action, MergeResult):
                    ctx.metrics.count("merges", kind.kind)
                log.info("storage.changed", owner=name, change=done)
            case Event(type=type_, reason=reason, message=message):
                kopf.event(
                    kopf.Body(cast(kopf.RawBody, dict(body))),
                    type=type_,
                    reason=reason,
                    message=message,
                )
            case _:
                assert_never(action)
