"""The baseline of ``bench.data``: tokenizing a JSON-lines corpus with the ``datasets`` library,
as its documentation shows (``load_dataset``, batched ``map`` on every core, ``save_to_disk``).

    python -m bench.data_baseline --tokenizer DIR --data corpus.jsonl --out DIR --num-proc 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--tokenizer", type=Path, required=True)
    cli.add_argument("--data", type=Path, required=True)
    cli.add_argument("--out", type=Path, required=True)
    cli.add_argument("--num-proc", type=int, required=True)
    args = cli.parse_args()

    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="datasets-cache-") as cache:
        dataset = load_dataset("json", data_files=str(args.data), split="train", cache_dir=cache)
        tokenized = dataset.map(
            lambda batch: tokenizer(batch["text"], add_special_tokens=False),
            batched=True,
            num_proc=args.num_proc,
            remove_columns=["text"],
        )
        tokenized.save_to_disk(str(args.out), num_proc=args.num_proc)


if __name__ == "__main__":
    main()
