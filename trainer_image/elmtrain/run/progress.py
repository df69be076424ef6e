"""Progress records in storage (for the operator) and the pod's termination message."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from elmcore import layout
from elmcore.errors import ElmError
from elmcore.records import Progress
from elmcore.storage import Storage

log = structlog.get_logger(__name__)
TERMINATION_LOG = "ELMTRAIN_TERMINATION_LOG"


class ProgressReporter:
    """Writes ``runs/<id>/progress.json`` at most every ``interval`` seconds (and when forced).

    Inside ``in_background()`` (the training loop) the writes happen on one thread of their
    own, so a slow or throttled storage never stalls a step. That thread writes the newest
    record handed to it; one that arrives while a write is under way replaces any record still
    waiting, so records are never written out of order and the last one written is the newest.
    Leaving the block waits for that last write. A storage error is logged, as in the
    foreground (progress is advisory); any other error in the thread is raised in the caller,
    at its next ``report`` or on leaving the block.
    """

    def __init__(self, storage: Storage | None, run_id: str, interval: float = 10.0) -> None:
        self.storage, self.run_id, self.interval = storage, run_id, interval
        self._last_write = -float("inf")
        self._lock = threading.Condition()
        self._waiting: Progress | None = None  # the next record for the writer thread
        self._closing = False
        self._failure: BaseException | None = None
        self._writer: threading.Thread | None = None

    def due(self, force: bool = False) -> bool:
        """Whether ``report`` would write now: the loop builds a record (and reads its loss
        from the device) only then."""
        now = time.monotonic()
        return self.storage is not None and (force or now - self._last_write >= self.interval)

    def report(self, progress: Progress, force: bool = False) -> None:
        self._raise_failure()
        if not self.due(force):
            return
        self._last_write = time.monotonic()
        if self._writer is None:
            self._write(progress)
            return
        with self._lock:
            self._waiting = progress
            self._lock.notify()

    @contextmanager
    def in_background(self) -> Iterator[None]:
        """Reports made inside the block are written by a thread; all are written on exit."""
        if self.storage is None or self._writer is not None:
            yield
            return
        self._writer = threading.Thread(target=self._drain, name="progress", daemon=True)
        self._writer.start()
        try:
            yield
        except BaseException:
            self._stop()
            if self._failure is not None:  # the body's own error is the one to see
                log.error("progress.writer_failed", error=repr(self._failure))
                self._failure = None
            raise
        self._stop()
        self._raise_failure()

    def _stop(self) -> None:
        assert self._writer is not None
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._writer.join()
        self._writer, self._closing = None, False

    def _drain(self) -> None:
        while True:
            with self._lock:
                while self._waiting is None and not self._closing:
                    self._lock.wait()
                if self._waiting is None:
                    return  # closing, and everything handed over is written
                progress, self._waiting = self._waiting, None
            try:
                self._write(progress)
            except BaseException as error:  # a bug: surfaces in the caller, never lost here
                with self._lock:
                    self._failure, self._waiting = error, None
                return

    def _raise_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _write(self, progress: Progress) -> None:
        assert self.storage is not None
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
