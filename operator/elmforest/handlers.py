"""Kopf registrations. Each handler only gathers its inputs and delegates to ``reconcile``.

Indexes keep what reconciles need in memory (forests, branches, trainer Jobs), so a reconcile
reads the API only to write. Each forest gets a daemon: a loop that reconciles, then sleeps
until woken by a related change or the resync interval. Branches, which come by the thousand,
are only watched: a change that matters queues the branch for the one branch worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
import structlog

from elmforest.adapters.kube import Kube, load_config
from elmforest.api import BRANCH, CLUSTER_SET, FOREST, GROUP, VERSION
from elmforest.planner.defaults import Defaults
from elmforest.planner.naming import (
    FINALIZER,
    LABEL_BRANCH,
    LABEL_CLUSTER_SET,
    LABEL_FOREST,
    LABEL_ROLE,
    MANAGED_BY,
    OPERATOR,
)
from elmforest.planner.observed import JobState, OwnedObject, job_state, owned_object
from elmforest.planner.policy import Policy
from elmforest.planner.serving import ROLE as SERVING_ROLE
from elmforest.planner.siblings import ForestBranches, Sibling, sibling
from elmforest.reconcile.clustersets import reconcile_cluster_set
from elmforest.reconcile.context import OperatorContext, Settings
from elmforest.reconcile.forests import reconcile_forest
from elmforest.reconcile.sources import ClusterForestSource, ClusterSetSource
from elmforest.scheduling.worker import BranchSources, BranchWorker

log = structlog.get_logger("elmforest.operator")
CONTEXT_KEY = "elmforest"
WORKER_KEY = "branch_worker"
JOB_LABELS = {MANAGED_BY: OPERATOR}
SERVING_LABELS = {MANAGED_BY: OPERATOR, LABEL_ROLE: SERVING_ROLE}


def _ctx(memo: Any) -> OperatorContext:
    ctx: OperatorContext = memo[CONTEXT_KEY]
    return ctx


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
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
    operator_settings = Settings(
        resync_seconds=float(os.environ.get("ELMFOREST_RESYNC_SECONDS", "15")),
        defaults=Defaults.from_env(os.environ),
        policy=Policy.from_env(os.environ),
    )
    ctx = OperatorContext(Kube(connections=operator_settings.workers), operator_settings)
    memo[CONTEXT_KEY] = ctx
    # Kopf hands startup the indexes it is about to fill; the worker reads them as they are.
    memo[WORKER_KEY] = BranchWorker(ctx, _sources(kwargs), ctx.settings.workers * 2)
    port = int(os.environ.get("ELMFOREST_METRICS_PORT", "0"))
    if port:
        memo["metrics_runner"] = await ctx.metrics.serve("0.0.0.0", port)
    log.info("operator.started", resync=ctx.settings.resync_seconds, metrics_port=port)


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    if WORKER_KEY in memo:
        await memo[WORKER_KEY].stop()
    if CONTEXT_KEY in memo:
        _ctx(memo).close()
    if "metrics_runner" in memo:
        await memo["metrics_runner"].cleanup()


# ---- indexes -------------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, FOREST.plural)
def forest_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): dict(body)}


@kopf.index(GROUP, VERSION, BRANCH.plural)
def branch_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace or "", name): dict(body)}


@kopf.index(GROUP, VERSION, CLUSTER_SET.plural)
def cluster_set_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace or "", name): dict(body)}


@kopf.index("batch", "v1", "jobs", labels=JOB_LABELS)
def job_index(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    # Keyed by owner, so a reconcile looks up its own Jobs instead of scanning them all.
    owners = body.get("metadata", {}).get("ownerReferences") or [{}]
    return {(namespace, owners[0].get("kind"), owners[0].get("name")): job_state(dict(body))}


def _serving_key(namespace: str | None, labels: kopf.Labels) -> tuple[str, str]:
    return (namespace or "", labels.get(LABEL_FOREST, ""))


@kopf.index("apps", "v1", "deployments", labels=SERVING_LABELS)
def deployment_index(
    namespace: str | None, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {_serving_key(namespace, labels): owned_object("Deployment", dict(body))}


@kopf.index("", "v1", "services", labels=SERVING_LABELS)
def service_index(
    namespace: str | None, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {_serving_key(namespace, labels): owned_object("Service", dict(body))}


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=SERVING_LABELS)
def network_policy_index(
    namespace: str | None, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {_serving_key(namespace, labels): owned_object("NetworkPolicy", dict(body))}


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=SERVING_LABELS)
def disruption_budget_index(
    namespace: str | None, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {_serving_key(namespace, labels): owned_object("PodDisruptionBudget", dict(body))}


SERVING_INDEXES = (
    "deployment_index",
    "service_index",
    "network_policy_index",
    "disruption_budget_index",
)


def _serving(indexes: Mapping[str, Any], namespace: str, forest: str) -> dict[str, OwnedObject]:
    """The forest's serving objects (planner/serving.py's kinds), by kind, as last watched."""
    found = {}
    for index in (indexes[name] for name in SERVING_INDEXES):
        for owned in index.get((namespace, forest), []):
            found[owned.kind] = owned
    return found


def _forest_body(
    index: kopf.Index[Any, Any], namespace: str | None, name: str
) -> Mapping[str, Any] | None:
    return next(iter(index.get((namespace, name), [])), None)


def _siblings(index: kopf.Index[Any, Any], namespace: str, forest: str) -> list[Sibling]:
    """The forest's branches, derived from the one branch index (a scan: callers do it once
    per forest reconcile or per worker batch)."""
    return [
        sibling(body)
        for (ns, _), bodies in index.items()
        for body in bodies
        if ns == namespace and (body.get("spec") or {}).get("forest", "") == forest
    ]


def _owned_jobs(
    index: kopf.Index[Any, Any], namespace: str, kind: str, owner: str
) -> dict[str, JobState]:
    return {job.name: job for job in index.get((namespace, kind, owner), [])}


def _sources(indexes: Mapping[str, Any]) -> BranchSources:
    bodies, forests, jobs = indexes["branch_index"], indexes["forest_index"], indexes["job_index"]
    return BranchSources(
        body=lambda key: next(iter(bodies.get(key, [])), None),
        forest=lambda namespace, name: _forest_body(forests, namespace, name),
        siblings=lambda namespace, forest: _siblings(bodies, namespace, forest),
        jobs=lambda namespace, name: _owned_jobs(jobs, namespace, BRANCH.kind, name),
        keys=lambda: list(bodies.keys()),
    )


def _worker(memo: Any) -> BranchWorker:
    """The branch worker, started by the first handler call: Kopf calls handlers only once its
    indexes are full, and the task inherits the handler's context (Kopf's Event poster)."""
    worker: BranchWorker = memo[WORKER_KEY]  # each object's memo is a copy: share the object
    worker.start()
    return worker


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
async def job_changed(
    type: str,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    labels: kopf.Labels,
    memo: Any,
    **_: Any,
) -> None:
    ctx, worker, namespace = _ctx(memo), _worker(memo), namespace or ""
    if LABEL_CLUSTER_SET in labels:  # a set's fit or assignment Job
        ctx.wakeups.wake((CLUSTER_SET.kind, namespace, labels[LABEL_CLUSTER_SET]))
    elif LABEL_BRANCH in labels:
        # A Job's own creation is no news to the branch that created it; a pod starting, the
        # Job ending or going away is.
        state = job_state(dict(body))
        seen = (state.phase, state.started)
        ctx.expectations.job_seen((namespace, name))
        before = ctx.job_states.pop((namespace, name), None)
        if type != "DELETED":
            ctx.job_states[namespace, name] = seen
        if type == "DELETED" or before not in (None, seen) or seen != ("Running", False):
            worker.add(namespace, labels[LABEL_BRANCH])
    elif LABEL_FOREST in labels:
        ctx.wakeups.wake((FOREST.kind, namespace, labels[LABEL_FOREST]))


@kopf.on.event("apps", "v1", "deployments", labels=SERVING_LABELS)
async def deployment_changed(
    namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any
) -> None:
    """A server pod became ready (or went): the forest's status says how many are."""
    _ctx(memo).wakeups.wake((FOREST.kind, namespace or "", labels.get(LABEL_FOREST, "")))


@kopf.on.event(GROUP, VERSION, BRANCH.plural)
async def branch_changed(
    type: str,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    spec: kopf.Spec,
    memo: Any,
    **_: Any,
) -> None:
    ctx, worker, namespace = _ctx(memo), _worker(memo), namespace or ""
    forest = spec.get("forest", "")
    key = (namespace, name)
    owner_set = (body.get("metadata", {}).get("labels") or {}).get(LABEL_CLUSTER_SET)
    if owner_set:  # a generated branch: its set counts merged branches (our writes too)
        ctx.wakeups.wake((CLUSTER_SET.kind, namespace, owner_set))
    if ctx.expectations.echo(key, str(body.get("metadata", {}).get("resourceVersion"))):
        worker.caught_up(namespace, name)  # our own write: news only to a reconcile waiting on it
        return
    worker.add(namespace, name)
    ctx.wakeups.wake((FOREST.kind, namespace, forest))
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        ctx.expectations.forget(key)
        worker.forget(namespace, forest, name)
        worker.wake_waiting(namespace, forest)  # its domain and its slot are free


@kopf.on.event(GROUP, VERSION, FOREST.plural)
async def forest_changed(
    type: str,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: Any,
    **kwargs: Any,
) -> None:
    """Wake the branches and cluster sets waiting on this forest when what they wait for
    changed: its existence, spec or readiness (not its expert count)."""
    ctx, worker, namespace = _ctx(memo), _worker(memo), namespace or ""
    meta = body.get("metadata", {})
    seen = (
        type != "DELETED",
        meta.get("generation"),
        (body.get("status") or {}).get("phase"),
        bool(meta.get("deletionTimestamp")),
    )
    if ctx.forest_states.get((namespace, name)) != seen:
        ctx.forest_states[namespace, name] = seen
        worker.wake_waiting(namespace, name)
        for set_name in _sets_of(kwargs["cluster_set_index"], namespace, name):
            ctx.wakeups.wake((CLUSTER_SET.kind, namespace, set_name))


def _sets_of(index: kopf.Index[Any, Any], namespace: str, forest: str) -> list[str]:
    return [
        name
        for (ns, name), bodies in index.items()
        for body in bodies
        if ns == namespace and (body.get("spec") or {}).get("forest") == forest
    ]


@kopf.on.event(GROUP, VERSION, CLUSTER_SET.plural)
async def cluster_set_changed(
    type: str, namespace: str | None, name: str, memo: Any, **_: Any
) -> None:
    """A deleted set's loop ends with it (its branches go by owner reference)."""
    if type == "DELETED":
        ctx, key = _ctx(memo), (CLUSTER_SET.kind, namespace or "", name)
        ctx.wakeups.forget(key)
        ctx.metrics.phase(*key, None)


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
        source = ClusterForestSource(
            ctx,
            ns,
            jobs=_owned_jobs(kwargs["job_index"], ns, FOREST.kind, name),
            forest_branches=ForestBranches(_siblings(kwargs["branch_index"], ns, name)),
            serving=_serving(kwargs, ns, name),
        )
        return await reconcile_forest(ctx, body, source)

    await _run_loop(ctx, (FOREST.kind, ns, name), stopped, reconcile_once)


def _generated(index: kopf.Index[Any, Any], namespace: str, owner: str) -> list[Mapping[str, Any]]:
    """The branches an ElmClusterSet generated (by its label), from the one branch index."""
    return [
        body
        for (ns, _), bodies in index.items()
        for body in bodies
        if ns == namespace
        and (body.get("metadata", {}).get("labels") or {}).get(LABEL_CLUSTER_SET) == owner
    ]


@kopf.daemon(GROUP, VERSION, CLUSTER_SET.plural, cancellation_timeout=2.0)
async def cluster_set_loop(
    body: kopf.Body,
    spec: kopf.Spec,
    namespace: str | None,
    name: str,
    stopped: kopf.DaemonStopped,
    memo: Any,
    **kwargs: Any,
) -> None:
    ctx = _ctx(memo)
    ns = namespace or ""

    async def reconcile_once() -> float | None:
        source = ClusterSetSource(
            ctx,
            ns,
            forest_body=_forest_body(kwargs["forest_index"], ns, spec.get("forest", "")),
            jobs=_owned_jobs(kwargs["job_index"], ns, CLUSTER_SET.kind, name),
            generated=_generated(kwargs["branch_index"], ns, name),
            names={b for (n, b) in kwargs["branch_index"] if n == ns},
        )
        return await reconcile_cluster_set(ctx, body, source)

    await _run_loop(ctx, (CLUSTER_SET.kind, ns, name), stopped, reconcile_once)


# ---- deletion ------------------------------------------------------------------------------


@kopf.on.delete(GROUP, VERSION, FOREST.plural)
async def forest_deleted(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """The forest's own Jobs go by owner reference; its branches' Jobs go here."""
    ctx = _ctx(memo)
    namespace = namespace or ""
    await ctx.io(ctx.kube.delete_jobs, namespace, f"{LABEL_FOREST}={name}")
    ctx.wakeups.forget((FOREST.kind, namespace, name))
    ctx.metrics.phase(FOREST.kind, namespace, name, None)
