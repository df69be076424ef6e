"""Text in, fixed-length token sequences out: read, tokenize once (cached), pack, sample.

A location is a file, a folder or an S3 prefix of ``.txt`` (documents separated by two blank
lines), ``.jsonl`` (one ``{"text": ...}`` per line), each optionally gzip-compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from elmcore.errors import BadInputError
from elmcore.storage import Storage, open_storage
from elmcore.storage.base import sha256_file
from elmcore.uris import StorageURI
from elmtrain.cache import cache_dir

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
DOC_SEPARATOR = "\n\n\n"  # two blank lines
_ENCODE_BATCH = 256
# Part of each cached token file's key: bump it when reading text changes what it yields.
TOKENS_FORMAT = 2  # 2: blank JSON-lines records are skipped, empty files are bad input


def _text_keys(storage: Storage, location: str) -> list[str]:
    keys = storage.list_keys("")
    if keys == [""]:  # the location is a single object
        if not location.endswith(TEXT_SUFFIXES):
            raise BadInputError(f"{location}: not a text file ({', '.join(TEXT_SUFFIXES)})")
        return keys
    usable = [k for k in keys if k.endswith(TEXT_SUFFIXES)]
    if not usable:
        raise BadInputError(f"no text files ({', '.join(TEXT_SUFFIXES)}) at {location}")
    return usable


def _documents(path: Path, name: str) -> Iterator[str]:
    """The non-blank documents of one file; a file that holds none is bad input (exit 65), as
    is one that is not UTF-8, not gzip, or not JSON lines of ``{"text": ...}``."""
    opener = gzip.open if name.endswith(".gz") else open
    found = False
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if ".jsonl" in name:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise BadInputError(f"{name}:{number}: not JSON ({error.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise BadInputError(f"{name}:{number}: expected {{'text': ...}}")
                    if record["text"].strip():
                        found = True
                        yield record["text"]
            else:
                for doc in handle.read().split(DOC_SEPARATOR):
                    if doc.strip():
                        found = True
                        yield doc.strip("\n")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise BadInputError(f"{name}: unreadable text ({error})") from None
    if not found:
        raise BadInputError(f"{name}: no text (the file is empty or holds only blank documents)")


def iter_documents(locations: Sequence[str], endpoint: str | None = None) -> Iterator[str]:
    """Every document of every location, in a fixed order (sorted keys)."""
    for name, local in _local_files(locations, endpoint):
        yield from _documents(local, name)


def _local_files(locations: Sequence[str], endpoint: str | None) -> Iterator[tuple[str, Path]]:
    """(name, local copy) of every text file, in order; each copy lives until the next one."""
    for location in locations:
        storage = open_storage(location, endpoint=endpoint)
        for key in _text_keys(storage, location):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "data"
                storage.download_file(key, local)
                yield key or StorageURI.parse(location).name, local


def _tokenize_file(path: Path, name: str, tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        if not batch:
            return
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eos)  # documents are separated by end-of-text
        batch.clear()

    for doc in _documents(path, name):
        batch.append(doc)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    flush()
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    return np.asarray(ids, dtype=dtype)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def load_tokens(
    locations: Sequence[str], tokenizer: PreTrainedTokenizerFast, endpoint: str | None = None
) -> np.ndarray:
    """One token stream for all locations; each file is tokenized once and cached by content."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    parts: list[np.ndarray] = []
    for name, local in _local_files(locations, endpoint):
        key = f"{sha256_file(local)}-{fingerprint}-v{TOKENS_FORMAT}"
        cached = cache_dir() / "tokens" / f"{key}.npy"
        if cached.is_file():
            parts.append(np.load(cached))
            continue
        tokens = _tokenize_file(local, name, tokenizer)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npy")
        np.save(staging, tokens)
        staging.replace(cached)  # atomic: concurrent jobs may share the cache
        parts.append(tokens)
    if not parts:
        raise BadInputError(f"no documents in {', '.join(locations)}")
    return np.concatenate(parts)


def pack(tokens: np.ndarray, seq_len: int, where: str = "data") -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows of the stream, as a [N, seq_len] int64 tensor."""
    n = len(tokens) // seq_len
    if n == 0:
        raise BadInputError(
            f"{where}: {len(tokens)} tokens are fewer than one sequence of {seq_len}"
        )
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)


def load_sequences(
    locations: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    seq_len: int,
    endpoint: str | None = None,
) -> torch.Tensor:
    return pack(load_tokens(locations, tokenizer, endpoint), seq_len, ", ".join(locations))


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch_size: int, n_sequences: int, seed: int) -> list[int]:
    """The sequences of optimizer step ``step``: a pure function of (step, seed), so a resumed
    run, or one split over several ranks, sees exactly the same data."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_sequences)
        indices.append(int(_permutation(n_sequences, seed, epoch)[offset]))
    return indices


def sample_sequences(sequences: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A fixed random sample (without replacement) of at most ``count`` sequences."""
    if count >= len(sequences):
        return sequences
    return sequences[torch.from_numpy(_permutation(len(sequences), seed, 1 << 30)[:count].copy())]
