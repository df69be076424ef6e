"""Token shards: one text file's tokens as raw little-endian uint16 (or uint32) files of at
most ``SHARD_TOKENS`` each, with an index; and reading windows of a sequence of such files by
byte ranges (``pread`` on local storage, ranged GETs on S3), never the whole corpus at once.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from elmcore.errors import BadInputError, IntegrityError, NotFoundError
from elmcore.storage import Storage
from elmcore.storage.base import sha256_bytes
from elmtrain.data.chunks import CHUNK_BYTES, REPAIR, ChunkDigests, VerifiedChunks, digest_file

SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB of uint16 per shard file
# Windows read at once from remote storage: one ranged GET each, so a batch costs about one
# round trip instead of one per sequence; within botocore's default pool of 10 connections.
REMOTE_READS = 8
INDEX = "index.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


class ShardIndex(BaseModel):
    """``index.json`` of one file's shard folder (committed with it)."""

    model_config = ConfigDict(extra="forbid")

    source: str  # the text file's name
    source_sha256: str
    source_bytes: int = Field(ge=0)
    documents: int = Field(ge=0)
    dtype: str
    shards: list[int]  # tokens per shard file, in order (tokens-00000.bin, ...)

    @property
    def tokens(self) -> int:
        return sum(self.shards)


def shard_name(number: int) -> str:
    return f"tokens-{number:05d}.bin"


def checksums_name(number: int) -> str:
    """The shard file's chunk checksums (``elmtrain.data.chunks``)."""
    return f"tokens-{number:05d}.sha256"


class ShardWriter:
    """Appends token arrays to shard files in a local folder, starting a new file at the cap."""

    def __init__(
        self, folder: Path, dtype: str, cap: int = SHARD_TOKENS, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.folder, self.dtype, self.cap = folder, np.dtype(dtype), cap
        self.chunk_bytes = chunk_bytes
        self.shards: list[int] = []
        self._handle: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        at = 0
        while at < len(tokens):
            if self._handle is None or self.shards[-1] >= self.cap:
                self._open_next()
            room = self.cap - self.shards[-1]
            piece = tokens[at : at + room].astype(self.dtype.newbyteorder("<"), copy=False)
            assert self._handle is not None
            self._handle.write(piece.tobytes())
            self.shards[-1] += len(piece)
            at += len(piece)

    def _open_next(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = (self.folder / shard_name(len(self.shards))).open("wb")
        self.shards.append(0)

    def close(self) -> list[int]:
        """Token counts per shard file; each file's chunk checksums written beside it."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for number in range(len(self.shards)):
            digests = digest_file(self.folder / shard_name(number), self.chunk_bytes)
            (self.folder / checksums_name(number)).write_text(digests.model_dump_json())
        return self.shards


@dataclass(frozen=True)
class ShardFile:
    key: str  # the shard file's key in storage
    tokens: int
    checksums: str | None = None  # the key of its chunk checksums; None: shards made before them
    checksums_sha256: str | None = None  # the checksum file's own sha256 (from the marker)


class TokenStream:
    """The concatenated tokens of shard files, read by position."""

    def __init__(self, storage: Storage, files: Sequence[ShardFile], dtype: str) -> None:
        self.storage, self.files = storage, list(files)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.starts = [0]
        for shard in self.files:
            self.starts.append(self.starts[-1] + shard.tokens)
        # Local storage: each shard file is opened once and read by ``pread``, not opened and
        # closed for every window; remote storage reads several windows at once.
        self.local = bool(self.files) and storage.local_path(self.files[0].key) is not None
        self._descriptors: dict[int, int | None] = {}
        self._digests: dict[int, ChunkDigests] = {}
        self._verified = VerifiedChunks()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, position: int, count: int) -> np.ndarray:
        """``count`` tokens from ``position``, across shard files where a window spans them."""
        out = np.empty(count, dtype=self.dtype)
        self.read_into(position, out)
        return out

    def read_into(self, position: int, out: np.ndarray) -> None:
        """``len(out)`` tokens from ``position`` into ``out`` (of this stream's dtype)."""
        filled, size = 0, self.dtype.itemsize
        while filled < len(out):
            at = position + filled
            number = bisect.bisect_right(self.starts, at) - 1
            offset = at - self.starts[number]
            take = min(len(out) - filled, self.files[number].tokens - offset)
            data = self._read(number, offset * size, take * size)
            out[filled : filled + take] = np.frombuffer(data, dtype=self.dtype)
            filled += take

    def _read(self, number: int, start: int, length: int) -> bytes:
        """Bytes of shard file ``number``, checked against its chunk checksums where it has
        them (every shard ``prepare`` writes)."""
        key, descriptor = self.files[number].key, self._descriptor(number)

        def read(at: int, count: int) -> bytes:
            if descriptor is None:
                return self.storage.read_range(key, at, count)
            return os.pread(descriptor, count, at)

        digests = self._checksums(number)
        if digests is not None:
            return self._verified.read(key, digests, read, start, length)
        data = read(start, length)
        if len(data) != length:
            raise NotFoundError(f"{key}: shorter than its index says")
        return data

    def _checksums(self, number: int) -> ChunkDigests | None:
        shard = self.files[number]
        if shard.checksums is None:
            return None
        if number not in self._digests:
            with self._lock:
                if number not in self._digests:
                    self._digests[number] = _load_checksums(
                        shard, self.dtype.itemsize, self.storage
                    )
        return self._digests[number]

    def _descriptor(self, number: int) -> int | None:
        if number not in self._descriptors:
            with self._lock:
                if number not in self._descriptors:
                    path = self.storage.local_path(self.files[number].key) if self.local else None
                    self._descriptors[number] = None if path is None else os.open(path, os.O_RDONLY)
        return self._descriptors[number]

    def __del__(self) -> None:
        for descriptor in getattr(self, "_descriptors", {}).values():
            if descriptor is not None:
                os.close(descriptor)


def _load_checksums(shard: ShardFile, itemsize: int, storage: Storage) -> ChunkDigests:
    assert shard.checksums is not None
    raw = storage.read_bytes(shard.checksums)
    if shard.checksums_sha256 is not None and sha256_bytes(raw) != shard.checksums_sha256:
        raise IntegrityError(f"{shard.checksums}: does not match its commit marker; {REPAIR}")
    digests = ChunkDigests.model_validate_json(raw)
    if digests.file_bytes != shard.tokens * itemsize:
        raise IntegrityError(f"{shard.key}: its checksums cover {digests.file_bytes} bytes, its "
                             f"index {shard.tokens} tokens; {REPAIR}")  # fmt: skip
    return digests


class TokenSequences:
    """Non-overlapping ``seq_len`` windows of a token stream, as a lazy [N, seq_len] tensor:
    ``len``, ``shape`` and indexing (an int, a slice, a list or a tensor of indices) read only
    the windows asked for."""

    def __init__(self, stream: TokenStream, seq_len: int, where: str) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.count = len(stream) // seq_len
        if self.count == 0:
            raise BadInputError(
                f"{where}: {len(stream)} tokens are fewer than one sequence of {seq_len}"
            )

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.seq_len)

    def rows(self, indices: Iterable[int]) -> torch.Tensor:
        chosen = [int(i) for i in indices]
        if any(not 0 <= i < self.count for i in chosen):
            raise IndexError(f"sequence index out of range (0..{self.count - 1})")
        # Each window straight into its row of one array, widened to int64 once.
        out = np.empty((len(chosen), self.seq_len), dtype=self.stream.dtype)

        def read(row: int) -> None:
            self.stream.read_into(chosen[row] * self.seq_len, out[row])

        if self.stream.local or len(chosen) < 2:
            for row in range(len(chosen)):
                read(row)
        else:
            with ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="read-range") as pool:
                list(pool.map(read, range(len(chosen))))
        return torch.from_numpy(out.astype(np.int64))

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            return self.rows(range(*index.indices(self.count)))
        if isinstance(index, int):
            return self.rows([index])[0]
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        return self.rows(index)
