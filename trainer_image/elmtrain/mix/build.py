"""Stream a forest's dense experts into a Mixtral folder, one safetensors shard per part.

Shard 1 holds the shared tensors (attention, embeddings, norms, output layer), averaged slice
by slice over all experts; shard ``2 + i`` holds expert ``i``'s feed-forward projections,
copied slice by slice under their Mixtral names; the last shard holds the routers. No step
holds more than a few fixed-size slices, whatever the experts' size or number, and no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elmcore.errors import BadInputError
from elmtrain.mix.plan import (
    check_mixable,
    expert_names,
    layers_prefix,
    mixtral_config,
    router_name,
    shared_names,
)
from elmtrain.model.averaging import (
    SLICE,
    average_tensors,
    check_same_architecture,
    open_weights,
)
from elmtrain.model.files import write_index
from elmtrain.model.safetensors_io import FLOATS, SafetensorsReader, SafetensorsWriter, from_float


def read_config(directory: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise BadInputError(f"{directory}: unreadable config.json ({error})") from None
    return config


def _shard(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _copy_expert(directory: Path, index: int, out: Path) -> tuple[list[str], int]:
    """Expert ``index``'s MLP tensors of folder ``directory``, renamed, into ``out``."""
    readers: list[SafetensorsReader] = []
    try:
        source = open_weights(directory, readers)
        renamed = expert_names(source, index)
        layout = {
            renamed[n]: (source[n].tensors[n].dtype, source[n].tensors[n].shape) for n in renamed
        }
        writer = SafetensorsWriter(out, layout, {"format": "pt"})
        buffer = np.empty(SLICE * 8, np.uint8)
        for name, target in renamed.items():
            numel = source[name].tensors[name].numel
            for start in range(0, numel, SLICE):
                writer.write(
                    target, source[name].read(name, start, min(SLICE, numel - start), buffer)
                )
        writer.close()
        return list(layout), sum(
            source[n].tensors[n].end - source[n].tensors[n].start for n in renamed
        )
    finally:
        for reader in readers:
            reader.close()


def _write_routers(rows: np.ndarray, prefix: str, dtype: str, out: Path) -> tuple[list[str], int]:
    names = [router_name(prefix, layer) for layer in range(rows.shape[0])]
    layout = {name: (dtype, list(rows.shape[1:])) for name in names}
    writer = SafetensorsWriter(out, layout, {"format": "pt"})
    total = 0
    for name, layer_rows in zip(names, rows, strict=True):
        raw = from_float(np.ascontiguousarray(layer_rows, dtype=np.float32), dtype)
        writer.write(name, raw)
        total += raw.nbytes
    writer.close()
    return names, total


def write_mix(
    expert_dirs: Sequence[Path],
    weights: Sequence[float],
    routers: np.ndarray,
    top_k: int,
    out_dir: Path,
) -> dict[str, Any]:
    """Write the Mixtral folder (config, sharded weights, index) of the experts in slot order,
    shared tensors averaged with ``weights``, ``routers`` of shape (layers, experts, hidden);
    returns its config. The caller adds the tokenizer and the lineage."""
    if not expert_dirs or len(expert_dirs) != len(weights):
        raise BadInputError(f"{len(expert_dirs)} experts but {len(weights)} weights")
    dense = read_config(expert_dirs[0])
    for directory in expert_dirs:
        check_mixable(read_config(directory), str(directory))
    check_same_architecture(expert_dirs)
    config = mixtral_config(dense, len(expert_dirs), top_k)
    readers: list[SafetensorsReader] = []
    try:  # the headers only: names, dtypes and shapes stay readable once the files are closed
        source = open_weights(expert_dirs[0], readers)
    finally:
        for reader in readers:
            reader.close()
    names = list(source)
    expected = (config["num_hidden_layers"], len(expert_dirs), config["hidden_size"])
    if routers.shape != expected:
        raise BadInputError(f"router rows of shape {routers.shape}, the mix needs {expected}")
    shared = shared_names(names)
    floats = [source[n].tensors[n].dtype for n in shared]
    dtype = next((d for d in floats if d in FLOATS), "F32")
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(expert_dirs) + 2
    layout: dict[str, list[str]] = {_shard(1, count): shared}
    total = average_tensors(expert_dirs, weights, shared, out_dir / _shard(1, count))
    for index, directory in enumerate(expert_dirs):
        file = _shard(index + 2, count)
        layout[file], size = _copy_expert(directory, index, out_dir / file)
        total += size
    file = _shard(count, count)
    layout[file], size = _write_routers(routers, layers_prefix(names), dtype, out_dir / file)
    write_index(out_dir, layout, total + size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
