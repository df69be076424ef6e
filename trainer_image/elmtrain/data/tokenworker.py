"""The tokenizing worker of ``elmtrain.data.encode``, in a module of its own: a spawned worker
imports only this (numpy, tokenizers, tiktoken), not ``elmtrain.data``, whose package brings
torch and transformers (half a gigabyte and seconds of start-up per worker, for nothing).

Where ``elmtrain.data.rankbpe`` can reproduce the tokenizer, documents go through it (about three
times faster); each encoder's first batch is also encoded by the fast tokenizer and compared,
and a difference sends it back to the fast tokenizer for good, so the ids never depend on
which one ran.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
from tokenizers import Tokenizer

from elmtrain.data.rankbpe import RankEncoder, rank_encoder

_WORKER: dict[str, DocumentEncoder] = {}  # the worker process's encoder


class DocumentEncoder:
    """Documents to one token array, by the rank-based encoder where it agrees."""

    def __init__(self, tokenizer_json: str) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.ranked: RankEncoder | None
        self.ranked, self.how = rank_encoder(tokenizer_json)
        self._checked = False

    def _fast(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(docs, add_special_tokens=False)]

    def ids(self, docs: list[str]) -> list[list[int]]:
        if self.ranked is None:
            return self._fast(docs)
        ranked = [self.ranked.encode(doc) for doc in docs]
        if not self._checked:
            self._checked = True
            fast = self._fast(docs)
            if fast != ranked:
                self.ranked, self.how = None, "fast tokenizer (the rank-based ids differed)"
                sys.stderr.write(f"elmtrain tokenizing: {self.how}\n")  # no logger in a worker
                return fast
        return ranked

    def encode(self, docs: list[str], eos: int, dtype: str) -> np.ndarray:
        """One array: each document's ids, then end-of-text."""
        flat: list[int] = []
        for ids in self.ids(docs):
            flat += ids
            flat.append(eos)
        return np.array(flat, dtype=dtype)


def start_worker(tokenizer_json: str) -> None:
    # One worker, one core: the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = DocumentEncoder(tokenizer_json)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright (SIGKILL, or SIGTERM outside a pod) leaves no one to reap the
    # pool's workers; they would wait on its queue for ever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def encode_in_worker(docs: list[str], eos: int, dtype: str) -> np.ndarray:
    return _WORKER["encoder"].encode(docs, eos, dtype)
