"""Following the forest: when its manifest's revision changes (an expert merged, retrained or
removed), load the new set in the background and swap it in whole.

Requests admitted before the swap finish on the set they started with; the old set is freed
once the last of them is done, so for a while both are in memory. A revision that fails to load
is logged and tried again at the next poll, while the old set keeps serving.
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
    ) -> None:
        self.forest, self.name, self.runtime = forest, name, runtime
        self.state, self.metrics, self.poll_seconds = state, metrics, poll_seconds
        self.prior_data, self.report_as, self.clock = list(prior_data), report_as, clock
        self.dtype = dtype
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follower", daemon=True)
        self._reported = -HEARTBEAT_SECONDS

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.poll_seconds)

    def poll(self) -> None:
        """Load the manifest's revision if it is new; report what is served."""
        try:
            manifest = self.forest.manifest()
            current = self.state.current
            if manifest.seed is not None and (
                current is None or manifest.revision != current.revision
            ):
                self._swap()
            elif manifest.seed is None:
                self.state.load_error = "the forest has no seed yet"
        except (ElmError, OSError) as error:
            self.state.load_error = f"cannot load revision: {error}"
            self.metrics.reloads.labels("failed").inc()
            log.warning("serve.load_failed", error=str(error))
        self._report()

    def _swap(self) -> None:
        started = self.clock()
        loaded: ModelSet = load_model_set(
            self.forest, self.name, self.runtime, self.prior_data, dtype=self.dtype
        )
        previous = self.state.current
        self.state.current, self.state.load_error = loaded, None  # the swap: one assignment
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
        self._reported = -HEARTBEAT_SECONDS  # report the new revision now

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
        except (ElmError, OSError) as error:
            log.warning("serve.report_failed", error=str(error))
