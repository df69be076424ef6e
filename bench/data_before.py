"""The second baseline of ``bench.data``: the trainer's data path before token shards (removed
with issue 19), reproduced so its speed is measured in the same session as ``elmtrain
prepare``: one process reads JSON lines, tokenizes batches of 256 documents with the fast
tokenizer into one Python list, and packs the whole stream into an int64 tensor.

    python -m bench.data_before --tokenizer DIR --data corpus.jsonl --seq-len 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_ENCODE_BATCH = 256  # the old data.py's batch


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--tokenizer", type=Path, required=True)
    cli.add_argument("--data", type=Path, required=True)
    cli.add_argument("--seq-len", type=int, default=128)
    args = cli.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eos)
        batch.clear()

    with args.data.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                batch.append(json.loads(line)["text"])
                if len(batch) >= _ENCODE_BATCH:
                    flush()
    flush()
    tokens = np.asarray(ids, dtype=np.uint16)
    n = len(tokens) // args.seq_len
    packed = torch.from_numpy(tokens[: n * args.seq_len].astype(np.int64)).view(n, args.seq_len)
    print(f"{len(tokens)} tokens, {packed.shape[0]} sequences")


if __name__ == "__main__":
    main()
