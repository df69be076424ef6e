"""What a job's earlier attempts left: a finished result (a retried Job stops there), and bad
input recorded where the operator reads it.

Apart from ``jobs`` (the training itself) so that ``prepare``, and ``seed`` or ``branch`` rerun
after success, decide with storage reads alone, before torch or transformers is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import structlog

from elmcore import layout
from elmcore.errors import ElmError, ExitCode, NotFoundError
from elmcore.records import Progress, Result
from elmcore.storage.commit import verify_committed
from elmcore.storage.manifest_store import merge_verified

if TYPE_CHECKING:
    from elmtrain.forest import Forest
    from elmtrain.run.spec import JobSpec

log = structlog.get_logger(__name__)


def finished_result(forest: Forest, run_id: str) -> Result | None:
    """The result of an earlier successful attempt of this run, if its artifact verifies."""
    try:
        result = Result.model_validate_json(forest.storage.read_bytes(layout.run_result(run_id)))
        verify_committed(forest.storage, result.path, result.sha256)
    except (NotFoundError, ElmError):
        return None
    return result


@contextmanager
def failure_recorded(forest: Forest, run_id: str | None) -> Iterator[None]:
    """Record bad input in the run's progress (phase "failed", the message naming the file),
    where the operator reads it: a Job's own failure only says "exit code 65". No run id
    (a command run by hand): nothing is recorded."""
    try:
        yield
    except ElmError as error:
        if run_id and error.exit_code in (ExitCode.BAD_INPUT, ExitCode.USAGE):
            progress = Progress(run_id=run_id, phase="failed", message=str(error)[:1000])
            with suppress(ElmError, OSError):  # the error at hand matters more than this record
                forest.storage.write_bytes(
                    layout.run_progress(run_id), progress.model_dump_json().encode()
                )
        raise


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a job without it: torchrun's ``RANK``, which
    ``setup_runtime`` reads too, known here before torch is imported or a group joined."""
    return int(os.environ.get("RANK", "0")) == 0


def finish_if_done(forest: Forest, spec: JobSpec) -> Result | None:
    """A retried Job after success: verify the earlier result, merge it if asked (on rank 0),
    and stop before the runtime is set up or any model, tokenizer or torch is loaded."""
    previous = finished_result(forest, spec.run_id)
    if previous is None:
        return None
    log.info("job.already_finished", run_id=spec.run_id, path=previous.path)
    if spec.merge and is_main_process():
        merge_verified(forest.storage, previous)
    return previous
