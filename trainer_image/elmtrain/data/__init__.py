"""Text in, fixed-length token sequences out (one module per job):

``documents`` reads locations and streams their documents; ``encode`` tokenizes them on every
core; ``shards`` writes and reads token shards by byte ranges; ``datasets`` records which files
made up a list of locations; ``store`` prepares a list of locations once into a forest's storage
(``elmtrain prepare``) and opens it as lazy sequences; ``order`` says which sequences each step
trains on.

The names below are looked up in their modules on first use (PEP 562), not imported here:
``shards`` and ``order`` import torch, and importing any ``elmtrain.data.<module>`` runs this
file first, so an eager import here would load torch for ``documents`` or ``datasets`` too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elmtrain.data.documents import DOC_SEPARATOR, TEXT_SUFFIXES, iter_documents
    from elmtrain.data.order import batch_indices, sample_sequences
    from elmtrain.data.shards import TokenSequences
    from elmtrain.data.store import TokenStore, cache_store, load_sequences, tokenizer_fingerprint

_HOMES = {
    "DOC_SEPARATOR": "documents",
    "TEXT_SUFFIXES": "documents",
    "iter_documents": "documents",
    "batch_indices": "order",
    "sample_sequences": "order",
    "TokenSequences": "shards",
    "TokenStore": "store",
    "cache_store": "store",
    "load_sequences": "store",
    "tokenizer_fingerprint": "store",
}

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


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
