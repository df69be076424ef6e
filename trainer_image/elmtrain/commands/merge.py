"""``elmtrain merge``: verify a finished run's artifact and merge it into the manifest (CAS)."""

from __future__ import annotations

import argparse

from elmcore import layout
from elmcore.manifest import Manifest
from elmcore.records import Result
from elmcore.storage.manifest_store import merge_verified
from elmtrain.commands.common import add_forest_args, open_forest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("merge", help="merge a finished run into the forest manifest")
    add_forest_args(parser)
    parser.add_argument("--run-id", required=True, help="e.g. tokenizer, seed, branch.code.v1")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Manifest:
    forest = open_forest(args)
    result = Result.model_validate_json(forest.storage.read_bytes(layout.run_result(args.run_id)))
    return merge_verified(forest.storage, result)
