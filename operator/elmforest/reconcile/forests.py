"""Reconcile one ElmForest: observe its storage and Jobs, plan, apply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elmforest.api import FOREST
from elmforest.observe import observe_forest
from elmforest.planner.forest import plan_forest
from elmforest.reconcile.apply import apply_plan
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.sources import ClusterForestSource


async def reconcile_forest(
    ctx: OperatorContext, body: Mapping[str, Any], source: ClusterForestSource
) -> float | None:
    with ctx.metrics.timed(FOREST.kind):
        meta = body["metadata"]
        ctx.metrics.count("reconciles", FOREST.kind)
        observed = await ctx.io(observe_forest, source, body)
        plan = plan_forest(observed.input, observed.spec_error)
        await apply_plan(ctx, FOREST, body, plan, observed.storage)
        phase = plan.phase(observed.input.status.phase)
        ctx.metrics.phase(FOREST.kind, meta["namespace"], meta["name"], phase)
        return plan.requeue_after
