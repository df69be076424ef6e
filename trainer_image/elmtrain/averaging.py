"""Weighted parameter averaging of HF model folders, streamed tensor by tensor.

Peak memory is about one tensor per input plus one accumulator, whatever the number of inputs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from elmcore.btm import normalize
from elmcore.errors import BadInputError
from elmtrain.safetensors_io import DTYPES, SafetensorsReader, SafetensorsWriter

WEIGHTS_FILE = "model.safetensors"
# Config keys that may differ between experts of one architecture (bookkeeping, not shape).
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def _architecture(directory: Path) -> dict[str, object]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{directory}: unreadable config.json ({error})") from None
    return {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}


def average_files(paths: Sequence[Path], weights: Sequence[float], out: Path) -> None:
    """``out = sum_j weights[j] * paths[j]`` tensor by tensor (weights used as given)."""
    if len(paths) != len(weights) or not paths:
        raise BadInputError(f"{len(paths)} inputs but {len(weights)} weights")
    readers = [SafetensorsReader(p) for p in paths]
    try:
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
        # Write in file order so the output reads sequentially like the inputs.
        order = sorted(first.tensors, key=lambda n: first.tensors[n].start)
        layout = {n: (first.tensors[n].dtype, first.tensors[n].shape) for n in order}
        writer = SafetensorsWriter(out, layout, {**first.metadata, "format": "pt"})
        for name in order:
            template = first.get(name)
            if not template.is_floating_point():
                writer.write(name, template)  # integer buffers are copied, not averaged
                continue
            accumulator = template.to(torch.float32).mul_(weights[0])
            del template
            for reader, weight in zip(readers[1:], weights[1:], strict=True):
                accumulator.add_(reader.get(name).to(torch.float32), alpha=weight)
            writer.write(name, accumulator.to(DTYPES[first.tensors[name].dtype]))
            del accumulator
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
