"""``elmtrain cluster-assign``: one worker of a cluster set's Indexed Job. It streams its slice
of the documents (every ``count``-th from its ``index``-th) to their clusters, writes each
cluster's share as JSON lines (``clusters/<set>/data/c<i>/{train,valid}/part-<index>.jsonl``,
the generated branch's data locations) and tokenizes each file into token shards exactly as
``elmtrain prepare`` does, keyed by content: the branch's training then finds them prepared.

A rerun writes the same bytes (the assignment and the validation split are functions of each
document), so a retried worker or a preempted Job converges. No torch until tokenizing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from elmcore import layout
from elmcore.names import validate_label
from elmtrain.cache import cache_dir
from elmtrain.commands.common import add_forest_args, open_forest, write_output
from elmtrain.data.documents import iter_documents
from elmtrain.run.outcome import failure_recorded

if TYPE_CHECKING:
    from elmcore.records import AssignmentRecord
    from elmtrain.forest import Forest

log = structlog.get_logger(__name__)
SPLITS = ("train", "valid")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("cluster-assign", help="assign a slice of a cluster set's documents")
    add_forest_args(parser)
    parser.add_argument("--set", required=True, dest="cluster_set", help="the cluster set's name")
    parser.add_argument(
        "--run-id", default=None, help="record bad input in this run's progress (the operator's)"
    )
    parser.add_argument("--data", nargs="+", required=True, help="text locations (as fitted)")
    index = os.environ.get("JOB_COMPLETION_INDEX")  # set by an Indexed Job
    parser.add_argument("--index", type=int, default=int(index) if index else 0)
    parser.add_argument("--count", type=int, default=1, help="workers in all (parallelism)")
    parser.add_argument("--validation-fraction", type=float, default=0.02)
    parser.add_argument("--sha256", default=None, help="refuse any other clusterer")
    parser.add_argument(
        "--tokenize", action=argparse.BooleanOptionalAction, default=True,
        help="also write token shards with the forest's tokenizer (as prepare does)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from elmcore.errors import BadInputError

    name = validate_label(args.cluster_set, "cluster set")
    if args.count < 1 or not 0 <= args.index < args.count:
        raise BadInputError(f"--index {args.index} is not a worker of --count {args.count}")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise BadInputError(f"--validation-fraction {args.validation_fraction} not in [0, 1)")
    forest = open_forest(args)
    with failure_recorded(forest, args.run_id):
        record = _assign(args, forest, name)
    log.info(
        "clusters.assigned", set=name, index=args.index, train=record.train, valid=record.valid
    )
    result = record.model_dump()
    write_output(result, None, None)
    return result


def _assign(args: argparse.Namespace, forest: Forest, name: str) -> AssignmentRecord:
    """Assign this worker's documents, write its clusters' files and its record."""
    from elmcore.records import AssignmentRecord
    from elmtrain.clusters.partition import (
        batches,
        validation_share,
        worker_documents,
    )
    from elmtrain.clusters.store import load_clusterer

    clusterer, sha = load_clusterer(forest.storage, name, args.sha256)
    k = clusterer.settings.clusters
    counts = {split: [0] * k for split in SPLITS}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        handles: dict[tuple[int, str], TextIO] = {}
        documents = worker_documents(
            iter_documents(args.data, forest.endpoint), args.index, args.count
        )
        for batch in batches(documents):
            for text, cluster in zip(batch, clusterer.assign(batch).tolist(), strict=True):
                split = "valid" if validation_share(text, args.validation_fraction) else "train"
                if (cluster, split) not in handles:
                    handles[cluster, split] = (Path(tmp) / f"c{cluster}-{split}.jsonl").open("w")
                handles[cluster, split].write(json.dumps({"text": text}) + "\n")
                counts[split][cluster] += 1
        for handle in handles.values():
            handle.close()
        files = []
        for cluster, split in sorted(handles):
            key = f"{layout.cluster_data(name, cluster, split)}/part-{args.index:05d}.jsonl"
            forest.storage.upload_file(key, Path(tmp) / f"c{cluster}-{split}.jsonl")
            files.append(key)
    if args.tokenize and files:
        store = forest.token_store()
        for key in files:
            store.prepare([str(forest.storage.uri(key))])
    record = AssignmentRecord(
        clusterer=sha, index=args.index, count=args.count, train=counts["train"],
        valid=counts["valid"], files=files,
    )  # fmt: skip
    forest.storage.write_bytes(
        layout.cluster_assignment(name, args.index), record.model_dump_json(indent=1).encode()
    )
    return record
