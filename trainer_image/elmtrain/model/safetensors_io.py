"""Read and write safetensors files piece by piece, with numpy and plain reads (no mmap, no torch).

The library's own API builds whole state dicts when writing; merging many large checkpoints
must hold only a bounded slice of each input, so the format (8-byte header length, JSON header,
raw little-endian data) is streamed here directly. Without torch, a merge process starts in a
fraction of a second and stays small.
"""

from __future__ import annotations

import json
import os
import struct
from io import BufferedReader
from pathlib import Path
from typing import IO, Any

import numpy as np

from elmcore.errors import BadInputError

# bfloat16 has no numpy type: its raw bits travel as uint16 (see ``to_float``/``from_float``).
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOATS = frozenset({"F64", "F32", "F16", "BF16"})


class TensorInfo:
    __slots__ = ("dtype", "end", "shape", "start")

    def __init__(self, dtype: str, shape: list[int], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end

    @property
    def numel(self) -> int:
        return (self.end - self.start) // DTYPES[self.dtype].itemsize


def to_float(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Raw values of safetensors type ``dtype`` as floats in ``out``'s dtype (``raw`` itself
    when no conversion is needed)."""
    if dtype == "BF16":  # the high half of a float32
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    if raw.dtype == out.dtype:
        return raw  # no copy: the caller uses it before the next read
    out[...] = raw
    return out


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """Floats back to raw values of ``dtype`` (bfloat16: round to nearest even, like torch)."""
    if dtype != "BF16":
        return values.astype(DTYPES[dtype], copy=False)
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(values), 0x7FC0, rounded).astype(np.uint16)


class SafetensorsReader:
    """Random access to slices of the tensors of one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: BufferedReader = path.open("rb")
        try:
            (length,) = struct.unpack("<Q", self._handle.read(8))
            header: dict[str, Any] = json.loads(self._handle.read(length))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
            self._handle.close()
            raise BadInputError(f"{path} is not a safetensors file") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + length
        self.tensors = {
            name: TensorInfo(v["dtype"], list(v["shape"]), *v["data_offsets"])
            for name, v in header.items()
        }
        for name, info in self.tensors.items():
            if info.dtype not in DTYPES:
                raise BadInputError(f"{path}: unsupported dtype {info.dtype} of {name}")

    def read(self, name: str, first: int, count: int, buffer: np.ndarray) -> np.ndarray:
        """Elements ``first .. first+count`` of tensor ``name``, read into ``buffer`` (bytes);
        safe to call from several threads at once."""
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        size = count * dtype.itemsize
        # pread: no shared file position, so threads may read slices of one file at once.
        offset = self._data_start + info.start + first * dtype.itemsize
        if os.preadv(self._handle.fileno(), [buffer[:size].data], offset) != size:
            raise BadInputError(f"{self.path}: truncated data in tensor {name}")
        return buffer[:size].view(dtype)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class SafetensorsWriter:
    """Writes tensors in a declared order, each in as many pieces as the caller likes; the
    header is known before any data is written."""

    def __init__(
        self, path: Path, layout: dict[str, tuple[str, list[int]]], metadata: dict[str, str]
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, (dtype, shape) in layout.items():
            size = DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            self._sizes.append((name, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns data to 8 bytes
        self._handle: IO[bytes] = path.open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._index, self._written, self._total_written, self._total = 0, 0, 0, offset

    def write(self, name: str, piece: np.ndarray) -> None:
        """Append the next raw bytes of tensor ``name``."""
        sizes = self._sizes
        while self._index < len(sizes) and sizes[self._index][0] != name:
            if self._written != sizes[self._index][1]:
                raise ValueError(
                    f"tensor {name} written before {sizes[self._index][0]} is complete"
                )
            self._index, self._written = self._index + 1, 0
        if self._index == len(sizes):
            raise ValueError(f"tensor {name} written out of order")
        self._written += piece.nbytes
        self._total_written += piece.nbytes
        if self._written > sizes[self._index][1]:
            raise ValueError(f"tensor {name}: more bytes than its dtype and shape hold")
        self._handle.write(np.ascontiguousarray(piece).data)

    def close(self) -> None:
        self._handle.close()
        if self._total_written != self._total:
            raise ValueError(f"{self._total_written} of {self._total} data bytes were written")
