"""``elmtrain prepare``: tokenize text locations once into token shards in the forest's storage.

Every file is read as a stream and tokenized on every core; its shards are keyed by its
content and the forest's tokenizer, so every Job, attempt and branch that reads the same bytes
reuses them (the seed's mixture reuses its domains'). Training prepares what is missing itself;
on a cluster this runs first, as its own CPU-only Job, so GPU time never goes to tokenizing.

A rerun whose dataset records still match the files' listing answers from those records alone:
the tokenizer, torch and transformers are loaded only when there is text to tokenize.
"""

from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING

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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> list[DatasetRecord]:
    forest = open_forest(args)
    run_id = validate_run_id(args.run_id)
    with failure_recorded(forest, run_id):
        reporter = ProgressReporter(forest.storage, run_id, interval=5.0)

        def progress(done: int, total: int) -> None:
            reporter.report(
                Progress(run_id=run_id, phase="preparing", step=done, total_steps=total)
            )

        @functools.cache
        def store() -> TokenStore:  # the tokenizer, loaded once, and only if needed
            return forest.token_store()

        def prepared(locations: list[str]) -> DatasetRecord:
            return forest.prepared(locations) or store().prepare(locations, progress)

        datasets = [prepared(args.data)]
        if args.val_data:
            datasets.append(prepared(args.val_data))
        total = sum(d.tokens for d in datasets)
        reporter.report(
            Progress(run_id=run_id, phase="done", step=total, total_steps=total), force=True
        )
        return datasets
