"""The branch worker: one loop per operator that reconciles every ElmBranch from a work queue.

Kopf only watches branches (indexes and event handlers): it writes nothing to them, and no
branch has a daemon of its own. A change that matters marks its branch dirty; the worker takes
all dirty branches at once and reconciles them concurrently (bounded), one manifest read per
forest for the whole batch. A thousand new branches cost a finalizer, a status patch, an Event
and a Job each, and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
import structlog

from elmforest.api import BRANCH
from elmforest.observe.reads import PassReads
from elmforest.planner.branch import ACTIVE
from elmforest.planner.observed import JobState
from elmforest.planner.siblings import Sibling
from elmforest.reconcile.branches import Outcome, reconcile_branch
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.sources import ClusterBranchSource
from elmforest.scheduling.queue import WorkQueue

log = structlog.get_logger("elmforest.operator")
Key = tuple[str, str]  # (namespace, name)
BATCH_WINDOW_SECONDS = 0.05  # a burst of changes is reconciled as one batch (one manifest read)


@dataclass(frozen=True)
class BranchSources:
    """Lookups into Kopf's indexes: what a branch's reconcile reads, without API calls."""

    body: Callable[[Key], Mapping[str, Any] | None]
    forest: Callable[[str, str], Mapping[str, Any] | None]
    siblings: Callable[[str, str], list[Sibling]]
    jobs: Callable[[str, str], dict[str, JobState]]
    keys: Callable[[], Iterable[Key]]


class BranchWorker:
    def __init__(self, ctx: OperatorContext, sources: BranchSources, concurrency: int) -> None:
        self.ctx, self.sources = ctx, sources
        self.queue: WorkQueue[Key] = WorkQueue()
        ctx.metrics.watch_queue(lambda: len(self.queue))
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._behind: set[Key] = set()  # waiting for the echo of our own write
        self._waiting: defaultdict[tuple[str, str], set[str]] = defaultdict(set)

    def caught_up(self, namespace: str, name: str) -> None:
        """The echo of our write to this branch arrived: a reconcile waiting for it can run."""
        key = (namespace, name)
        if key in self._behind:
            self._behind.discard(key)
            self.queue.add(key)

    def add(self, namespace: str, name: str) -> None:
        self.queue.add((namespace, name))

    def start(self) -> None:
        """Start the loop, once (handlers call this on every event)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        resync = asyncio.create_task(self._resync())
        try:
            while True:
                keys = await self.queue.take(BATCH_WINDOW_SECONDS)
                batch = PassReads()  # one manifest read per forest for the batch
                for key in keys:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._reconcile(key, batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            resync.cancel()
            for task in list(self._tasks):
                task.cancel()
            self.queue.close()

    async def _resync(self) -> None:
        """The level-triggered safety net: every branch, every resync interval."""
        while True:
            for key in list(self.sources.keys()):
                self.queue.add(key)
            await asyncio.sleep(self.ctx.settings.resync_seconds)

    async def _reconcile(self, key: Key, batch: PassReads) -> None:
        namespace, name = key
        delay: float | None = None
        try:
            body = self.sources.body(key)
            version = str((body or {}).get("metadata", {}).get("resourceVersion"))
            if body is not None and self.ctx.expectations.behind(key, version):
                # Our last write has not come back yet, so this body is stale: its echo will
                # call ``caught_up``; the expiry is the fallback.
                self._behind.add(key)
                delay = self.ctx.expectations.expiry
            elif body is not None:
                forest = str((body.get("spec") or {}).get("forest", ""))
                source = ClusterBranchSource(
                    self.ctx,
                    namespace,
                    forest_body=self.sources.forest(namespace, forest),
                    forest_branches=batch.branches(
                        (namespace, forest), lambda: self.sources.siblings(namespace, forest)
                    ),
                    jobs=self.sources.jobs(namespace, name),
                    reads=batch,
                )
                with self.ctx.metrics.timed(BRANCH.kind):
                    outcome = await reconcile_branch(self.ctx, body, source)
                delay = outcome.requeue_after
                self._settled(namespace, forest, name, outcome)
        except asyncio.CancelledError:
            raise
        except kopf.TemporaryError as error:
            log.warning(
                "reconcile.retry",
                kind=BRANCH.kind,
                namespace=namespace,
                name=name,
                error=str(error),
            )
            delay = float(error.delay or self.ctx.settings.error_backoff_seconds)
        except Exception:
            log.exception("reconcile_failed", kind=BRANCH.kind, namespace=namespace, name=name)
            self.ctx.metrics.count("reconcile_errors", BRANCH.kind)
            delay = self.ctx.settings.error_backoff_seconds
        finally:
            self._slots.release()
            self.queue.done(key)
        if delay is not None:
            self.queue.add_after(key, delay)

    def _settled(self, namespace: str, forest: str, name: str, outcome: Outcome) -> None:
        """Keep the set of branches that wait on something (the forest, a slot, a domain);
        when this one gives up a slot, they may go on."""
        waiting = self._waiting[namespace, forest]
        if outcome.deleting or outcome.after in ACTIVE or outcome.after == "Merged":
            waiting.discard(name)
        else:
            waiting.add(name)
        if outcome.before in ACTIVE and outcome.after not in ACTIVE:
            self.wake_waiting(namespace, forest)

    def wake_waiting(self, namespace: str, forest: str) -> None:
        """Queue the forest's waiting branches: a slot, a domain or the forest may be free."""
        for name in self._waiting.get((namespace, forest), ()):
            self.queue.add((namespace, name))

    def forget(self, namespace: str, forest: str, name: str) -> None:
        self._waiting.get((namespace, forest), set()).discard(name)
