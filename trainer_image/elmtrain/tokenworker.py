"""The tokenizing worker of ``elmtrain.data.encode``, in a module of its own: a spawned worker
imports only this (numpy and tokenizers), not ``elmtrain.data``, whose package brings torch and
transformers (half a gigabyte and seconds of start-up per worker, for nothing).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

_WORKER: dict[str, object] = {}  # the worker process's tokenizer


def start_worker(tokenizer_json: str) -> None:
    # One worker, one core: the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER["tokenizer"] = Tokenizer.from_str(tokenizer_json)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright (SIGKILL, or SIGTERM outside a pod) leaves no one to reap the
    # pool's workers; they would wait on its queue for ever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def encode_batch(tokenizer: object, docs: list[str], eos: int, dtype: str) -> np.ndarray:
    """One array: each document's ids, then end-of-text."""
    encoded = tokenizer.encode_batch_fast(docs, add_special_tokens=False)  # type: ignore[attr-defined]
    lengths = [len(e.ids) + 1 for e in encoded]
    out = np.empty(sum(lengths), dtype=dtype)
    at = 0
    for encoding, length in zip(encoded, lengths, strict=True):
        out[at : at + length - 1] = encoding.ids
        out[at + length - 1] = eos
        at += length
    return out


def encode_in_worker(docs: list[str], eos: int, dtype: str) -> np.ndarray:
    return encode_batch(_WORKER["tokenizer"], docs, eos, dtype)
