"""Weighted parameter averaging of HF model folders, streamed slice by slice with numpy.

Peak memory is a few fixed-size slices (``SLICE`` elements) per worker thread, whatever the
number of inputs or the size of the largest tensor; no torch import, so a merge Job starts in
well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from elmcore.btm import normalize
from elmcore.errors import BadInputError
from elmtrain.safetensors_io import (
    FLOATS,
    SafetensorsReader,
    SafetensorsWriter,
    from_float,
    to_float,
)

WEIGHTS_FILE = "model.safetensors"
SLICE = 1 << 18  # elements per slice: 1 MB of float32
# Config keys that may differ between experts of one architecture (bookkeeping, not shape).
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def _architecture(directory: Path) -> dict[str, object]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{directory}: unreadable config.json ({error})") from None
    return {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}


def _check_same_tensors(readers: Sequence[SafetensorsReader]) -> None:
    first = readers[0]
    for reader in readers[1:]:
        mismatch = {
            n
            for n, i in first.tensors.items()
            if n not in reader.tensors
            or (reader.tensors[n].dtype, reader.tensors[n].shape) != (i.dtype, i.shape)
        } | (reader.tensors.keys() - first.tensors.keys())
        if mismatch:
            raise BadInputError(
                f"{reader.path} and {first.path} differ in tensors {sorted(mismatch)[:5]}"
            )


class _Buffers(threading.local):
    """Each worker thread's own read buffer and float scratch space."""

    def __init__(self) -> None:
        self.raw = np.empty(SLICE * 8, np.uint8)  # pages are touched only as far as used
        self.sums = {np.dtype(t): np.empty(SLICE, t) for t in (np.float32, np.float64)}
        self.terms = {np.dtype(t): np.empty(SLICE, t) for t in (np.float32, np.float64)}


def _average_slice(
    readers: Sequence[SafetensorsReader],
    weights: Sequence[float],
    name: str,
    start: int,
    buffers: _Buffers,
) -> np.ndarray:
    """One slice of the output, as raw values of the tensor's own dtype (a fresh array)."""
    info = readers[0].tensors[name]
    count = min(SLICE, info.numel - start)
    if info.dtype not in FLOATS:  # integer buffers are copied from the first input
        return readers[0].read(name, start, count, buffers.raw).copy()
    accumulate = np.dtype(np.float64 if info.dtype == "F64" else np.float32)
    total, term = buffers.sums[accumulate][:count], buffers.terms[accumulate][:count]
    for i, (reader, weight) in enumerate(zip(readers, weights, strict=True)):
        values = to_float(reader.read(name, start, count, buffers.raw), info.dtype, term)
        if i == 0:
            np.multiply(values, weight, out=total)
        else:
            np.multiply(values, weight, out=term)
            np.add(total, term, out=total)
    result = from_float(total, info.dtype)
    return result.copy() if np.shares_memory(result, total) else result


def average_files(
    paths: Sequence[Path], weights: Sequence[float], out: Path, workers: int | None = None
) -> None:
    """``out = sum_j weights[j] * paths[j]`` slice by slice (weights used as given).

    Floating tensors are summed in float32 (float64 for F64) and written in their own dtype;
    integer buffers are copied from the first input. Slices are computed by ``workers``
    threads (numpy and ``pread`` release the GIL) and written in order.
    """
    if len(paths) != len(weights) or not paths:
        raise BadInputError(f"{len(paths)} inputs but {len(weights)} weights")
    workers = workers or min(4, os.cpu_count() or 1)
    readers = [SafetensorsReader(p) for p in paths]
    try:
        _check_same_tensors(readers)
        first = readers[0]
        # Write in file order so the output reads sequentially like the inputs.
        order = sorted(first.tensors, key=lambda n: first.tensors[n].start)
        layout = {n: (first.tensors[n].dtype, first.tensors[n].shape) for n in order}
        writer = SafetensorsWriter(out, layout, {**first.metadata, "format": "pt"})
        slices = [(n, s) for n in order for s in range(0, first.tensors[n].numel, SLICE)]
        buffers = _Buffers()
        with ThreadPoolExecutor(workers, thread_name_prefix="average") as pool:
            pending: deque[tuple[str, Future[np.ndarray]]] = deque()
            for name, start in slices:
                job = pool.submit(_average_slice, readers, weights, name, start, buffers)
                pending.append((name, job))
                if len(pending) > 2 * workers:  # bounded: memory stays a few slices
                    done_name, done = pending.popleft()
                    writer.write(done_name, done.result())
            for done_name, done in pending:
                writer.write(done_name, done.result())
        writer.close()
    finally:
        for reader in readers:
            reader.close()


def average_models(dirs: Sequence[Path], weights: Sequence[float], out_dir: Path) -> None:
    """Average HF model folders of one architecture into ``out_dir`` (weights normalised)."""
    if not dirs:
        raise BadInputError("nothing to average")
    reference = _architecture(dirs[0])
    for directory in dirs[1:]:
        if _architecture(directory) != reference:
            raise BadInputError(f"{directory} has another architecture than {dirs[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dirs[0] / "config.json", out_dir / "config.json")
    for directory in dirs:
        if not (directory / WEIGHTS_FILE).is_file():
            raise BadInputError(
                f"{directory} has no {WEIGHTS_FILE} (sharded checkpoints are not supported)"
            )
    average_files([d / WEIGHTS_FILE for d in dirs], normalize(weights), out_dir / WEIGHTS_FILE)
