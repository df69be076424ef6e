"""Progress records in storage (for the operator) and the pod's termination message."""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from elmcore import layout
from elmcore.errors import ElmError
from elmcore.records import Progress
from elmcore.storage import Storage

log = structlog.get_logger(__name__)
TERMINATION_LOG = "ELMTRAIN_TERMINATION_LOG"


class ProgressReporter:
    """Writes ``runs/<id>/progress.json`` at most every ``interval`` seconds (and when forced)."""

    def __init__(self, storage: Storage | None, run_id: str, interval: float = 10.0) -> None:
        self.storage, self.run_id, self.interval = storage, run_id, interval
        self._last_write = -float("inf")

    def report(self, progress: Progress, force: bool = False) -> None:
        now = time.monotonic()
        if self.storage is None or (not force and now - self._last_write < self.interval):
            return
        self._last_write = now
        try:
            self.storage.write_bytes(
                layout.run_progress(self.run_id), progress.model_dump_json().encode()
            )
        except ElmError as error:
            # Progress is advisory: a storage hiccup must not kill a training run.
            log.warning("progress.write_failed", error=str(error))


def write_termination_message(message: str) -> None:
    """Kubernetes shows this file's content as the container's termination message."""
    path = Path(os.environ.get(TERMINATION_LOG, "/dev/termination-log"))
    try:
        if path.parent.is_dir():
            path.write_text(message[:4000])
    except OSError:
        pass
