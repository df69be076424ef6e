"""Which worker reads a document, and which of its cluster's splits it joins (pure)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator

BATCH = 1024  # documents vectorized at once: bounded memory, few calls into scikit-learn


def validation_share(text: str, fraction: float) -> bool:
    """Whether a document is kept for validation: decided by its bytes' hash, so every rerun
    and every worker puts the same documents aside (``spec.validationFraction``)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def worker_documents(documents: Iterable[str], index: int, count: int) -> Iterator[str]:
    """Worker ``index`` of ``count`` takes every ``count``-th document from its ``index``-th:
    the slices cover the corpus once, however its files are sized (one huge file included)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}")
    return itertools.islice(documents, index, None, count)


def batches(documents: Iterable[str], size: int = BATCH) -> Iterator[list[str]]:
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
