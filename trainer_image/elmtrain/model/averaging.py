"""Weighted parameter averaging of HF model folders, streamed slice by slice with numpy.

Peak memory is a few fixed-size slices (``SLICE`` elements) per worker thread, whatever the
number of inputs or the size of the largest tensor; no torch import, so a merge Job starts in
well under a second. Inputs may be single files or sharded; the output takes the first
input's shard layout, and its tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from elmcore.btm import normalize
from elmcore.errors import BadInputError
from elmtrain.model.files import WEIGHTS_FILE, copy_tokenizer, weight_shards, write_index
from elmtrain.model.safetensors_io import (
    FLOATS,
    SafetensorsReader,
    SafetensorsWriter,
    TensorInfo,
    from_float,
    to_float,
)

# Each input as tensor name -> the reader of the file holding it (one file, or its shards).
Source = Mapping[str, SafetensorsReader]
SLICE = 1 << 18  # elements per slice: 1 MB of float32
# Config keys that may differ between experts of one architecture (bookkeeping, not shape).
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def _architecture(directory: Path) -> dict[str, object]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{directory}: unreadable config.json ({error})") from None
    return {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}


def _info(source: Source, name: str) -> TensorInfo:
    return source[name].tensors[name]


def _check_same_tensors(sources: Sequence[Source]) -> None:
    first = sources[0]
    for source in sources[1:]:
        mismatch = {
            n
            for n in first
            if n not in source
            or (_info(source, n).dtype, _info(source, n).shape)
            != (_info(first, n).dtype, _info(first, n).shape)
        } | (source.keys() - first.keys())
        if mismatch:
            where = next(iter(source.values())).path.parent
            raise BadInputError(
                f"{where} and {next(iter(first.values())).path.parent} differ in tensors "
                f"{sorted(mismatch)[:5]}"
            )


class _Buffers(threading.local):
    """Each worker thread's own read buffer and float scratch space."""

    def __init__(self) -> None:
        self.raw = np.empty(SLICE * 8, np.uint8)  # pages are touched only as far as used
        self.sums = {np.dtype(t): np.empty(SLICE, t) for t in (np.float32, np.float64)}
        self.terms = {np.dtype(t): np.empty(SLICE, t) for t in (np.float32, np.float64)}


def _average_slice(
    sources: Sequence[Source],
    weights: Sequence[float],
    name: str,
    start: int,
    buffers: _Buffers,
) -> np.ndarray:
    """One slice of the output, as raw values of the tensor's own dtype (a fresh array)."""
    info = _info(sources[0], name)
    count = min(SLICE, info.numel - start)
    if info.dtype not in FLOATS:  # integer buffers are copied from the first input
        return sources[0][name].read(name, start, count, buffers.raw).copy()
    accumulate = np.dtype(np.float64 if info.dtype == "F64" else np.float32)
    total, term = buffers.sums[accumulate][:count], buffers.terms[accumulate][:count]
    for i, (source, weight) in enumerate(zip(sources, weights, strict=True)):
        values = to_float(source[name].read(name, start, count, buffers.raw), info.dtype, term)
        if i == 0:
            np.multiply(values, weight, out=total)
        else:
            np.multiply(values, weight, out=term)
            np.add(total, term, out=total)
    result = from_float(total, info.dtype)
    return result.copy() if np.shares_memory(result, total) else result


def _average_into(
    sources: Sequence[Source],
    weights: Sequence[float],
    names: Sequence[str],
    out: Path,
    metadata: dict[str, str],
    workers: int,
) -> int:
    """The weighted sum of tensors ``names`` as one safetensors file; its data bytes."""
    first = sources[0]
    # Write in file order so the output reads sequentially like the inputs.
    order = sorted(names, key=lambda n: (str(first[n].path), _info(first, n).start))
    layout = {n: (_info(first, n).dtype, _info(first, n).shape) for n in order}
    writer = SafetensorsWriter(out, layout, {**metadata, "format": "pt"})
    slices = [(n, s) for n in order for s in range(0, _info(first, n).numel, SLICE)]
    buffers = _Buffers()
    with ThreadPoolExecutor(workers, thread_name_prefix="average") as pool:
        pending: deque[tuple[str, Future[np.ndarray]]] = deque()
        for name, start in slices:
            pending.append(
                (name, pool.submit(_average_slice, sources, weights, name, start, buffers))
            )
            if len(pending) > 2 * workers:  # bounded: memory stays a few slices
                done_name, done = pending.popleft()
                writer.write(done_name, done.result())
        for done_name, done in pending:
            writer.write(done_name, done.result())
    writer.close()
    return sum(_info(first, n).end - _info(first, n).start for n in order)


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
    readers = [SafetensorsReader(p) for p in paths]
    try:
        sources = [dict.fromkeys(r.tensors, r) for r in readers]
        _check_same_tensors(sources)
        names = list(readers[0].tensors)
        _average_into(sources, weights, names, out, readers[0].metadata, _workers(workers))
    finally:
        for reader in readers:
            reader.close()


def _workers(chosen: int | None) -> int:
    return chosen or min(4, os.cpu_count() or 1)


def open_weights(directory: Path, readers: list[SafetensorsReader]) -> dict[str, SafetensorsReader]:
    """Tensor name -> reader over the folder's weights files (``readers`` collects them)."""
    source: dict[str, SafetensorsReader] = {}
    for file, names in weight_shards(directory).items():
        reader = SafetensorsReader(directory / file)
        readers.append(reader)
        for name in names if names is not None else reader.tensors:
            if name not in reader.tensors:
                raise BadInputError(f"{directory}: the index puts {name} in {file}, which lacks it")
            source[name] = reader
    return source


def check_same_architecture(dirs: Sequence[Path]) -> None:
    """The folders' configs agree on everything but bookkeeping (at least one folder)."""
    if not dirs:
        raise BadInputError("nothing to average")
    reference = _architecture(dirs[0])
    for directory in dirs[1:]:
        if _architecture(directory) != reference:
            raise BadInputError(f"{directory} has another architecture than {dirs[0]}")


def average_tensors(
    dirs: Sequence[Path],
    weights: Sequence[float],
    names: Sequence[str],
    out: Path,
    workers: int | None = None,
) -> int:
    """The average (weights normalised) of tensors ``names`` of the folders ``dirs``, written
    as one safetensors file ``out``, streamed as ``average_models`` does; its data bytes."""
    readers: list[SafetensorsReader] = []
    try:
        sources = [open_weights(d, readers) for d in dirs]
        _check_same_tensors(sources)
        return _average_into(sources, normalize(weights), names, out, {}, _workers(workers))
    finally:
        for reader in readers:
            reader.close()


def average_models(
    dirs: Sequence[Path], weights: Sequence[float], out_dir: Path, workers: int | None = None
) -> None:
    """Average HF model folders of one architecture into ``out_dir`` (weights normalised),
    sharded as the first is; the first folder's tokenizer files come along."""
    check_same_architecture(dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dirs[0] / "config.json", out_dir / "config.json")
    copy_tokenizer(dirs[0], out_dir)
    readers: list[SafetensorsReader] = []
    try:
        sources = [open_weights(d, readers) for d in dirs]
        _check_same_tensors(sources)
        shards = weight_shards(dirs[0])
        normalised = normalize(weights)
        if list(shards) == [WEIGHTS_FILE]:
            metadata = sources[0][next(iter(sources[0]))].metadata if sources[0] else {}
            names = list(sources[0])
            _average_into(
                sources, normalised, names, out_dir / WEIGHTS_FILE, metadata, _workers(workers)
            )
            return
        layout: dict[str, list[str]] = {}
        total = 0
        for file, names_in_file in shards.items():
            assert names_in_file is not None
            layout[file] = names_in_file
            total += _average_into(
                sources, normalised, names_in_file, out_dir / file, {}, _workers(workers)
            )
        write_index(out_dir, layout, total)
    finally:
        for reader in readers:
            reader.close()
