"""Documents to tokens on every core: batches of documents go to worker processes, each with
its own copy of the fast tokenizer, and come back as token arrays in order.

At most ``2 * workers`` batches are in flight, so memory stays bounded however long the input
is. Each document's tokens are followed by the end-of-text token, as training expects.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from elmtrain.data.tokenworker import DocumentEncoder, encode_in_worker, start_worker

BATCH_CHARS = 1 << 20  # characters of text per batch handed to a worker


def batches(docs: Iterable[str], chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(
    docs: Iterable[str], tokenizer_json: str, eos: int, dtype: str, workers: int
) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, characters read) per batch, in document order."""
    if workers <= 1:
        encoder = DocumentEncoder(tokenizer_json)
        for batch in batches(docs):
            yield encoder.encode(batch, eos, dtype), sum(map(len, batch))
        return
    # spawn: workers never inherit this process's threads (torch, boto3) or its memory (and,
    # unlike forkserver, need no socket under TMPDIR, whose path may be too long for one).
    context = get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=start_worker, initargs=(tokenizer_json,)
    ) as pool:
        pending: deque[tuple[Future[np.ndarray], int]] = deque()
        for batch in batches(docs):
            pending.append((pool.submit(encode_in_worker, batch, eos, dtype), sum(map(len, batch))))
            if len(pending) >= 2 * workers:
                future, chars = pending.popleft()
                yield future.result(), chars
        while pending:
            future, chars = pending.popleft()
            yield future.result(), chars
