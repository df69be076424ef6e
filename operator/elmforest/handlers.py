"""Kopf registrations. Each handler only gathers its inputs and delegates to ``reconcile``.

Indexes keep what reconciles need in memory (forests, branches per forest, trainer Jobs), so a
reconcile reads the API only to write. Each forest and branch gets a daemon: a loop that
reconciles, then sleeps until woken by a related change or the resync interval.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
import structlog

from elmforest.adapters.kube import Kube, load_config
from elmforest.api import BRANCH, FOREST, GROUP, VERSION
from elmforest.planner.defaults import Defaults
from elmforest.planner.naming import FINALIZER, LABEL_BRANCH, LABEL_FOREST, MANAGED_BY, OPERATOR
from elmforest.planner.observed import JobState, job_state
from elmforest.planner.siblings import Sibling, owners_by_domain, sibling
from elmforest.reconcile.branches import finalize_branch, reconcile_branch
from elmforest.reconcile.context import OperatorContext, Settings
from elmforest.reconcile.forests import reconcile_forest

log = structlog.get_logger("elmforest.operator")
CONTEXT_KEY = "elmforest"
JOB_LABELS = {MANAGED_BY: OPERATOR}


def _ctx(memo: Any) -> OperatorContext:
    ctx: OperatorContext = memo[CONTEXT_KEY]
    return ctx


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Events come from the planner, not Kopf's logs
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # No runtime scans of namespaces or CRDs: the CRDs are installed before the operator
    # starts (a CRD upgrade restarts it), so RBAC needs neither (least privilege).
    settings.scanning.disabled = True
    load_config()
    ctx = OperatorContext(
        Kube(),
        Settings(
            resync_seconds=float(os.environ.get("ELMFOREST_RESYNC_SECONDS", "15")),
            defaults=Defaults.from_env(os.environ),
        ),
    )
    memo[CONTEXT_KEY] = ctx
    port = int(os.environ.get("ELMFOREST_METRICS_PORT", "0"))
    if port:
        memo["metrics_runner"] = await ctx.metrics.serve("0.0.0.0", port)
    log.info("operator.started", resync=ctx.settings.resync_seconds, metrics_port=port)


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    if CONTEXT_KEY in memo:
        _ctx(memo).close()
    if "metrics_runner" in memo:
        await memo["metrics_runner"].cleanup()


# ---- indexes -------------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, FOREST.plural)
def forest_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): dict(body)}


@kopf.index(GROUP, VERSION, BRANCH.plural)
def branch_index(
    namespace: str | None, body: kopf.Body, spec: kopf.Spec, **_: Any
) -> dict[Any, Any]:
    return {(namespace, spec.get("forest", "")): sibling(body)}


@kopf.index("batch", "v1", "jobs", labels=JOB_LABELS)
def job_index(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    # Keyed by owner, so a reconcile looks up its own Jobs instead of scanning them all.
    owners = body.get("metadata", {}).get("ownerReferences") or [{}]
    return {(namespace, owners[0].get("kind"), owners[0].get("name")): job_state(dict(body))}


def _forest_body(
    index: kopf.Index[Any, Any], namespace: str | None, name: str
) -> Mapping[str, Any] | None:
    return next(iter(index.get((namespace, name), [])), None)


def _siblings(index: kopf.Index[Any, Any], namespace: str | None, forest: str) -> list[Sibling]:
    return list(index.get((namespace, forest), []))


def _owned_jobs(
    index: kopf.Index[Any, Any], namespace: str, kind: str, owner: str
) -> dict[str, JobState]:
    return {job.name: job for job in index.get((namespace, kind, owner), [])}


async def _run_loop(
    ctx: OperatorContext,
    key: tuple[str, str, str],
    stopped: kopf.DaemonStopped,
    reconcile_once: Callable[[], Awaitable[float | None]],
) -> None:
    """Reconcile, then sleep until woken or the resync interval (shorter if asked) passes."""
    resync = ctx.settings.resync_seconds
    while not stopped:
        try:
            delay = await reconcile_once()
        except Exception:
            log.exception("reconcile_failed", kind=key[0], namespace=key[1], name=key[2])
            ctx.metrics.count("reconcile_errors", key[0])
            delay = ctx.settings.error_backoff_seconds
        await ctx.wakeups.wait(key, min(delay or resync, resync))


# ---- wake-ups: a change wakes the loops that depend on it ---------------------------------


@kopf.on.event("batch", "v1", "jobs", labels=JOB_LABELS)
def job_changed(namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any) -> None:
    ctx = _ctx(memo)
    namespace = namespace or ""
    if LABEL_BRANCH in labels:
        ctx.wakeups.wake((BRANCH.kind, namespace, labels[LABEL_BRANCH]))
    elif LABEL_FOREST in labels:
        ctx.wakeups.wake((FOREST.kind, namespace, labels[LABEL_FOREST]))


@kopf.on.event(GROUP, VERSION, BRANCH.plural)
def branch_changed(
    namespace: str | None,
    name: str,
    spec: kopf.Spec,
    memo: Any,
    **kwargs: Any,
) -> None:
    ctx = _ctx(memo)
    namespace = namespace or ""
    forest = spec.get("forest", "")
    ctx.wakeups.wake((BRANCH.kind, namespace, name))
    ctx.wakeups.wake((FOREST.kind, namespace, forest))
    for other in _siblings(
        kwargs["branch_index"], namespace, forest
    ):  # a slot or a domain may be free
        if other.name != name and other.phase in ("Waiting", "Failed"):
            ctx.wakeups.wake((BRANCH.kind, namespace, other.name))


@kopf.on.event(GROUP, VERSION, FOREST.plural)
def forest_changed(namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    ctx = _ctx(memo)
    namespace = namespace or ""
    for other in _siblings(kwargs["branch_index"], namespace, name):
        ctx.wakeups.wake((BRANCH.kind, namespace, other.name))


# ---- the reconcile loops -------------------------------------------------------------------


@kopf.daemon(GROUP, VERSION, FOREST.plural, cancellation_timeout=2.0)
async def forest_loop(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    stopped: kopf.DaemonStopped,
    memo: Any,
    **kwargs: Any,
) -> None:
    ctx = _ctx(memo)
    ns = namespace or ""

    async def reconcile_once() -> float | None:
        siblings = _siblings(kwargs["branch_index"], ns, name)
        jobs = _owned_jobs(kwargs["job_index"], ns, FOREST.kind, name)
        return await reconcile_forest(ctx, body, jobs, owners_by_domain(siblings))

    await _run_loop(ctx, (FOREST.kind, ns, name), stopped, reconcile_once)


@kopf.daemon(GROUP, VERSION, BRANCH.plural, cancellation_timeout=2.0)
async def branch_loop(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    stopped: kopf.DaemonStopped,
    memo: Any,
    **kwargs: Any,
) -> None:
    ctx = _ctx(memo)
    ns = namespace or ""

    async def reconcile_once() -> float | None:
        forest = str((body.get("spec") or {}).get("forest", ""))
        return await reconcile_branch(
            ctx,
            body,
            _forest_body(kwargs["forest_index"], ns, forest),
            _siblings(kwargs["branch_index"], ns, forest),
            _owned_jobs(kwargs["job_index"], ns, BRANCH.kind, name),
        )

    await _run_loop(ctx, (BRANCH.kind, ns, name), stopped, reconcile_once)


# ---- deletion ------------------------------------------------------------------------------


@kopf.on.delete(GROUP, VERSION, BRANCH.plural)
async def branch_deleted(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: Any,
    **kwargs: Any,
) -> None:
    ctx = _ctx(memo)
    namespace = namespace or ""
    forest = str((body.get("spec") or {}).get("forest", ""))
    await finalize_branch(
        ctx,
        body,
        _forest_body(kwargs["forest_index"], namespace, forest),
        _siblings(kwargs["branch_index"], namespace, forest),
    )
    ctx.wakeups.forget((BRANCH.kind, namespace, name))
    ctx.wakeups.wake((FOREST.kind, namespace, forest))


@kopf.on.delete(GROUP, VERSION, FOREST.plural)
async def forest_deleted(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """The forest's own Jobs go by owner reference; its branches' Jobs go here."""
    ctx = _ctx(memo)
    namespace = namespace or ""
    await ctx.io(ctx.kube.delete_jobs, namespace, f"{LABEL_FOREST}={name}")
    ctx.wakeups.forget((FOREST.kind, namespace, name))
    ctx.metrics.phase(FOREST.kind, namespace, name, None)
