"""Read and write safetensors files one tensor at a time, with plain reads (no mmap).

The library's own API builds whole state dicts when writing; merging many large checkpoints
must hold only one tensor per input, so the format (8-byte header length, JSON header, raw
little-endian data) is streamed here directly.
"""

from __future__ import annotations

import json
import struct
from io import BufferedReader
from pathlib import Path
from typing import IO, Any

import torch

from elmcore.errors import BadInputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorInfo:
    __slots__ = ("dtype", "end", "shape", "start")

    def __init__(self, dtype: str, shape: list[int], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end


class SafetensorsReader:
    """Random access to the tensors of one file; memory holds only what ``get`` returns."""

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

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise BadInputError(f"{self.path}: unsupported dtype {info.dtype} of {name}")
        buffer = bytearray(info.end - info.start)
        self._handle.seek(self._data_start + info.start)
        self._handle.readinto(buffer)
        if not buffer:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class SafetensorsWriter:
    """Writes tensors in a declared order; the header is known before any data is written."""

    def __init__(
        self, path: Path, layout: dict[str, tuple[str, list[int]]], metadata: dict[str, str]
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self._order = list(layout)
        for name, (dtype, shape) in layout.items():
            size = DTYPES[dtype].itemsize
            for dim in shape:
                size *= dim
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns data to 8 bytes
        self._handle: IO[bytes] = path.open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._header = header
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise ValueError(f"tensor {name} written out of order (expected {expected})")
        spec = self._header[name]
        if _NAMES[tensor.dtype] != spec["dtype"] or list(tensor.shape) != spec["shape"]:
            raise ValueError(f"tensor {name} does not match its declared dtype/shape")
        self._handle.write(
            tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._handle.close()
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        self._handle.flush()
        self._handle.close()
