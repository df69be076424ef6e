"""Text in, fixed-length token sequences out (one module per job):

``documents`` reads locations and streams their documents; ``encode`` tokenizes them on every
core; ``shards`` writes and reads token shards by byte ranges; ``store`` prepares a list of
locations once into a forest's storage (``elmtrain prepare``) and opens it as lazy sequences;
``order`` says which sequences each step trains on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from elmcore.storage import open_storage
from elmtrain.cache import cache_dir
from elmtrain.data.documents import DOC_SEPARATOR, TEXT_SUFFIXES, iter_documents
from elmtrain.data.order import batch_indices, sample_sequences
from elmtrain.data.shards import TokenSequences
from elmtrain.data.store import TokenStore

__all__ = [
    "DOC_SEPARATOR",
    "TEXT_SUFFIXES",
    "TokenSequences",
    "TokenStore",
    "batch_indices",
    "cache_store",
    "iter_documents",
    "load_sequences",
    "sample_sequences",
    "tokenizer_fingerprint",
]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cache_store(tokenizer: PreTrainedTokenizerFast, endpoint: str | None = None) -> TokenStore:
    """Shards in this machine's cache, for text read without a forest (benchmarks, tests)."""
    storage = open_storage(str(cache_dir() / "tokens"))
    return TokenStore(storage, tokenizer, tokenizer_fingerprint(tokenizer), endpoint)


def load_sequences(
    locations: Sequence[str], store: TokenStore, seq_len: int, limit: int | None = None
) -> torch.Tensor:
    """The first ``limit`` (all, if None) windows of the locations, read into memory: for
    evaluation sets; training reads ``store.sequences`` lazily."""
    sequences = store.sequences(locations, seq_len)
    return sequences[: len(sequences) if limit is None else limit]
