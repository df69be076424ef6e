"""``elmtrain prepare``: tokenize text locations once into token shards in the forest's storage.

Every file is read as a stream and tokenized on every core; its shards are keyed by its
content and the forest's tokenizer, so every Job, attempt and branch that reads the same bytes
reuses them (the seed's mixture reuses its domains'). Training prepares what is missing itself;
on a cluster this runs first, as its own CPU-only Job, so GPU time never goes to tokenizing.

A rerun whose dataset records still match the files' listing answers from those records alone:
the tokenizer, torch and transformers are loaded only when there is text to tokenize.

``--workers N`` splits the work by file over N workers (an Indexed Job's pods, each told its
slice by ``--worker-index`` or by the ``JOB_COMPLETION_INDEX`` that Kubernetes sets): each
tokenizes its slice and records it, and the last to finish writes the dataset record from
every slice's, the same record (and so the same token sequence) as one worker would write.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import TYPE_CHECKING

from elmcore.errors import BadInputError
from elmcore.names import validate_run_id
from elmcore.records import Progress
from elmtrain.commands.common import add_forest_args, open_forest
from elmtrain.data.datasets import DatasetRecord
from elmtrain.run.outcome import failure_recorded
from elmtrain.run.progress import ProgressReporter

if TYPE_CHECKING:
    from elmtrain.data.store import TokenStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("prepare", help="tokenize text into token shards (once)")
    add_forest_args(parser)
    parser.add_argument("--data", nargs="+", required=True, help="text locations (one dataset)")
    parser.add_argument(
        "--val-data", nargs="*", default=[], help="another dataset (validation text)"
    )
    parser.add_argument("--run-id", default="prepare", help="where progress is reported")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="workers that share the text, split by file (one pod each of an Indexed Job)",
    )
    parser.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="this worker's slice, 0..workers-1 (default: $JOB_COMPLETION_INDEX)",
    )
    parser.set_defaults(func=run)


def worker_slice(workers: int, index: int | None) -> tuple[int, int]:
    """(workers, this worker's index), checked; the index from ``JOB_COMPLETION_INDEX`` (an
    Indexed Job's pod) when ``--worker-index`` is not given."""
    if workers < 1:
        raise BadInputError(f"--workers must be at least 1, not {workers}")
    named = "--worker-index"
    if index is None:
        found = os.environ.get("JOB_COMPLETION_INDEX")
        if found is None:
            if workers > 1:
                raise BadInputError(
                    f"--workers {workers} needs --worker-index (or JOB_COMPLETION_INDEX)"
                )
            return workers, 0
        named = "JOB_COMPLETION_INDEX (--worker-index)"
        try:
            index = int(found)
        except ValueError:
            raise BadInputError(f"{named} {found!r} is not an integer") from None
    if not 0 <= index < workers:
        raise BadInputError(f"{named} {index} is not in 0..{workers - 1} (--workers {workers})")
    return workers, index


def run(args: argparse.Namespace) -> list[DatasetRecord]:
    forest = open_forest(args)
    run_id = validate_run_id(args.run_id)
    with failure_recorded(forest, run_id):
        workers, index = worker_slice(args.workers, args.worker_index)
        reporter = ProgressReporter(forest.storage, run_id, interval=5.0)

        def progress(done: int, total: int) -> None:
            if index == 0:  # one worker's slice stands for all (the slices hold about equal bytes)
                reporter.report(
                    Progress(run_id=run_id, phase="preparing", step=done, total_steps=total)
                )

        @functools.cache
        def store() -> TokenStore:  # the tokenizer, loaded once, and only if needed
            return forest.token_store()

        def prepared(locations: list[str]) -> DatasetRecord | None:
            found = forest.prepared(locations)
            if found is not None:
                return found
            if workers == 1:
                return store().prepare(locations, progress)
            return store().prepare_slice(locations, workers, index, progress)

        lists = [args.data, args.val_data] if args.val_data else [args.data]
        datasets = [prepared(locations) for locations in lists]
        # Another worker may have been last on one list and this one on the other: a second
        # look (slices recorded, so nothing is hashed) finds the list combined since.
        datasets = [d or prepared(locations) for d, locations in zip(datasets, lists, strict=True)]
        complete = [d for d in datasets if d is not None]
        if len(complete) == len(datasets):  # the last worker (or the only one) is done
            total = sum(d.tokens for d in complete)
            reporter.report(
                Progress(run_id=run_id, phase="done", step=total, total_steps=total), force=True
            )
        return complete
