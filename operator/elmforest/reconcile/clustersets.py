"""Reconcile one ElmClusterSet: observe its forest, Jobs, branches and storage, plan, apply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elmforest.api import CLUSTER_SET
from elmforest.observe.clusterset import observe_cluster_set
from elmforest.planner.clusterset import plan_cluster_set
from elmforest.reconcile.apply import apply_plan
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.sources import ClusterSetSource


async def reconcile_cluster_set(
    ctx: OperatorContext, body: Mapping[str, Any], source: ClusterSetSource
) -> float | None:
    with ctx.metrics.timed(CLUSTER_SET.kind):
        meta = body["metadata"]
        ctx.metrics.count("reconciles", CLUSTER_SET.kind)
        observed = await ctx.io(observe_cluster_set, source, body)
        plan = plan_cluster_set(observed.input, observed.spec_error)
        await apply_plan(ctx, CLUSTER_SET, body, plan, None)
        phase = plan.phase(observed.input.status.phase)
        ctx.metrics.phase(CLUSTER_SET.kind, meta["namespace"], meta["name"], phase)
        return plan.requeue_after
