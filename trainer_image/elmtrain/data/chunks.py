"""Checksums for token shards read by byte range: one sha256 per fixed-size chunk of a file.

A shard file's sha256 (in its folder's commit marker) can only be checked by reading the whole
file, but training reads windows of a few KiB at random positions. So ``prepare`` also writes,
beside each ``tokens-NNNNN.bin``, a ``tokens-NNNNN.sha256`` that lists the sha256 of each
``CHUNK_BYTES`` chunk (HDFS checks its blocks the same way, with CRCs per 512 bytes). A read
fetches the whole chunks that cover its window and checks each before a byte is used; the list
itself is checked against the commit marker when first loaded. So a flipped bit in storage or
a short or stale object fails the read, naming the file, instead of training on it.

The last few verified chunks are kept, so sequential readers (evaluation's windows in order)
hash each chunk once, not once per window.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from elmcore.errors import IntegrityError, NotFoundError

# 1 MiB: a 4-8 KiB training window reads its chunk (one ranged GET: latency, not bandwidth, is
# the cost) and hashes it in about 0.75 ms; the lists of the shards read hold one 64-character
# hex digest per MiB, about 110 MiB of Python strings per TiB of tokens.
CHUNK_BYTES = 1 << 20
KEPT_CHUNKS = 16  # verified chunks kept per stream (16 MiB)
REPAIR = "delete its shard folder to have prepare tokenize the file again"


class ChunkDigests(BaseModel):
    """``tokens-NNNNN.sha256``: the sha256 (hex) of each chunk of one shard file, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_bytes: int = Field(gt=0)
    file_bytes: int = Field(ge=0)
    sha256: list[str]


def digest_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> ChunkDigests:
    digests = []
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digests.append(hashlib.sha256(chunk).hexdigest())
    return ChunkDigests(chunk_bytes=chunk_bytes, file_bytes=path.stat().st_size, sha256=digests)


Reader = Callable[[int, int], bytes]  # (byte offset, length) of one shard file -> its bytes


class VerifiedChunks:
    """Byte ranges of shard files, served from whole chunks whose sha256 matched."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, key: str, digests: ChunkDigests, read: Reader, start: int, length: int) -> bytes:
        size = digests.chunk_bytes
        first, last = start // size, (start + length - 1) // size
        data = b"".join(
            self._chunk(key, digests, read, number) for number in range(first, last + 1)
        )
        begin = start - first * size
        return data[begin : begin + length]

    def _chunk(self, key: str, digests: ChunkDigests, read: Reader, number: int) -> bytes:
        with self._lock:
            kept = self._kept.get((key, number))
            if kept is not None:
                self._kept.move_to_end((key, number))
                return kept
        if number >= len(digests.sha256):
            raise IntegrityError(f"{key}: no checksum for chunk {number}; {REPAIR}")
        start = number * digests.chunk_bytes
        expected = min(digests.chunk_bytes, digests.file_bytes - start)
        try:
            data = read(start, expected)
        except NotFoundError as error:  # S3: a range past the object's end, or no object at all
            raise IntegrityError(f"{error}; {REPAIR}") from None
        if len(data) != expected:
            raise IntegrityError(f"{key}: {len(data)} bytes at {start}, not {expected}; {REPAIR}")
        if hashlib.sha256(data).hexdigest() != digests.sha256[number]:
            raise IntegrityError(
                f"{key}: bytes {start}..{start + expected} do not match their sha256; {REPAIR}"
            )
        with self._lock:
            self._kept[(key, number)] = data
            while len(self._kept) > KEPT_CHUNKS:
                self._kept.popitem(last=False)
        return data
