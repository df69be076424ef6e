"""Following the forest: when its manifest's revision changes (an expert merged, retrained or
removed), load the new set in the background and swap it in whole.

Requests admitted before the swap finish on the set they started with; the old set is freed
once the last of them is done, so for a while both are in memory.

The follower never dies: whatever fails while reading the manifest or loading a revision (an
invalid manifest, a missing or corrupt expert file, no memory left, a bug) keeps the last good
revision serving, is shown by ``/readyz``, a metric and the replica's record in storage (the
operator puts it on the forest), and is tried again after a delay that doubles with each
failure. A newer revision than the one that failed is tried at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog
import torch

from elmcore import layout
from elmcore.errors import ElmError
from elmcore.records import ServingRecord
from elmtrain.forest import Forest
from elmtrain.runtime import Runtime
from elmtrain.serving.app import ServingState
from elmtrain.serving.metrics import ServeMetrics
from elmtrain.serving.modelset import ModelSet, load_model_set

log = structlog.get_logger(__name__)
HEARTBEAT_SECONDS = 60.0
BACKOFF_MAX_SECONDS = 300.0  # the longest wait between attempts at a failing revision


class Follower:
    def __init__(
        self,
        forest: Forest,
        name: str,
        runtime: Runtime,
        state: ServingState,
        metrics: ServeMetrics,
        poll_seconds: float,
        prior_data: Sequence[str] = (),
        report_as: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        dtype: torch.dtype = torch.float32,
        excluded: Sequence[str] = (),
    ) -> None:
        self.forest, self.name, self.runtime = forest, name, runtime
        self.state, self.metrics, self.poll_seconds = state, metrics, poll_seconds
        self.prior_data, self.report_as, self.clock = list(prior_data), report_as, clock
        self.dtype, self.excluded = dtype, tuple(excluded)  # the endpoint's opt-outs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follower", daemon=True)
        self._reported = -HEARTBEAT_SECONDS
        self._attempting: int | None = None  # the revision being loaded (None: the manifest)
        self._retry_at = 0.0  # no attempt at the failing revision (or manifest) before this

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # poll handles its own failures: this is a bug, and survived
                log.exception("serve.follow_failed")
            self._stop.wait(self.poll_seconds)

    def poll(self) -> None:
        """Load the manifest's revision if it is new; report what is served."""
        try:
            self._follow()
        except Exception as error:  # anything at all: the last good revision keeps serving
            self._failed(error)
        self._report()

    def _follow(self) -> None:
        state, now = self.state, self.clock()
        self._attempting = None
        if state.failures and state.failing_revision is None and now < self._retry_at:
            return  # the manifest was unreadable: wait out the backoff
        manifest = self.forest.manifest()
        current = state.current
        if manifest.seed is None:
            state.load_error = "the forest has no seed yet"
            return
        if current is not None and manifest.revision == current.revision:
            if state.failures:  # the manifest went back to what is served: nothing fails
                self._recovered()
            return
        if manifest.revision == state.failing_revision and now < self._retry_at:
            return
        self._attempting = manifest.revision
        self._swap()

    def _failed(self, error: BaseException) -> None:
        state, revision = self.state, self._attempting
        same = state.failures > 0 and state.failing_revision == revision
        state.failures = state.failures + 1 if same else 1
        state.failing_revision = revision
        what = "the manifest" if revision is None else f"revision {revision}"
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:400]
        served = f"; serving revision {state.current.revision}" if state.current else ""
        message = f"{what} failed to load: {detail}{served}"
        delay = min(self.poll_seconds * 2 ** (state.failures - 1), BACKOFF_MAX_SECONDS)
        self._retry_at = self.clock() + max(delay, self.poll_seconds)
        if message != state.load_error:
            self._reported = -HEARTBEAT_SECONDS  # tell the operator now, not at the heartbeat
        state.load_error = message
        self.metrics.reloads.labels("failed").inc()
        self.metrics.load_failures.set(state.failures)
        expected = isinstance(error, (ElmError, OSError))
        log.warning(
            "serve.load_failed",
            revision=revision,
            attempt=state.failures,
            retry_in_seconds=round(delay, 1),
            error=detail,
            exc_info=not expected,  # a surprise gets its traceback
        )

    def _recovered(self) -> None:
        state = self.state
        state.load_error, state.failing_revision, state.failures = None, None, 0
        self.metrics.load_failures.set(0)
        self._reported = -HEARTBEAT_SECONDS

    def _swap(self) -> None:
        started = self.clock()
        loaded: ModelSet = load_model_set(
            self.forest,
            self.name,
            self.runtime,
            self.prior_data,
            dtype=self.dtype,
            excluded=self.excluded,
        )
        previous = self.state.current
        self.state.current = loaded  # the swap: one assignment
        self._recovered()
        self.metrics.reloads.labels("loaded").inc()
        self.metrics.revision.set(loaded.revision)
        self.metrics.experts.set(len(loaded.expert_dirs))
        log.info(
            "serve.swapped",
            revision=loaded.revision,
            previous=previous.revision if previous else None,
            experts=[m.domain for m in loaded.experts],
            seconds=round(self.clock() - started, 2),
        )

    def _report(self) -> None:
        if self.report_as is None or self.clock() - self._reported < HEARTBEAT_SECONDS:
            return
        current = self.state.current
        record = ServingRecord(
            replica=self.report_as,
            revision=current.revision if current else None,
            experts={m.domain: m.version for m in current.experts if m.domain and m.version}
            if current
            else {},
            message=self.state.load_error or "",
        )
        try:
            self.forest.storage.write_bytes(
                layout.serving(self.report_as), record.model_dump_json().encode()
            )
            self._reported = self.clock()
        except Exception as error:  # storage, or a bug: the next heartbeat tries again
            log.warning("serve.report_failed", error=str(error)[:400])
