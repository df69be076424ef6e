"""``elmtrain tokenizer``: train (or import) the forest's byte-level BPE tokenizer."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from elmcore import layout
from elmcore.records import Result
from elmcore.storage.commit import commit_dir
from elmcore.storage.manifest_store import merge_verified
from elmtrain.cache import cache_dir
from elmtrain.commands.common import add_forest_args, open_forest
from elmtrain.data.documents import iter_documents
from elmtrain.forest import download_folder

RUN_ID = "tokenizer"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (or import one)")
    add_forest_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="text locations to train on")
    source.add_argument("--from", dest="source", help="an existing HF tokenizer folder")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--merge", action="store_true", help="record it in the manifest")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Result:
    from elmtrain.model.tokenizer import load_tokenizer, train_tokenizer  # transformers

    forest = open_forest(args)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp) / "tokenizer"
        if args.source:
            tokenizer = load_tokenizer(
                download_folder(args.source, forest.endpoint, "tokenizer.json")
            )
            tokenizer.save_pretrained(folder)
        else:
            train_tokenizer(iter_documents(args.data, forest.endpoint), args.vocab_size, folder)
        sha = commit_dir(forest.storage, folder, layout.TOKENIZER)
    result = Result(run_id=RUN_ID, kind="tokenizer", path=layout.TOKENIZER, sha256=sha)
    forest.storage.write_bytes(layout.run_result(RUN_ID), result.model_dump_json(indent=1).encode())
    if args.merge:
        merge_verified(forest.storage, result)
    return result
