"""Pretrained weights into a sharded model without a whole copy per rank (issue 27, point 2).

``lazy_model`` builds a Hugging Face folder's model with its parameters on the meta device (no
memory) and remembers the folder; ``run/parallel.py`` shards it (``fully_shard``), gives each
rank empty storage for its own shards and calls ``fill_shards``, which reads every rank's rows
of every tensor straight from the safetensors files (a byte range per slice of rows: an FSDP2
shard of a parameter is a contiguous run of its first dimension), a few MB at a time. So a rank
holds its shards and one slice, a node about one copy of the weights whatever its rank count.
Under ddp (every rank holds everything anyway) the folder is loaded whole, as before.

Only folders whose tensor names map onto the model's parameters are loaded this way (all that
elmtrain writes, and Hugging Face's own ``save_pretrained`` layout); any other is loaded whole
by ``transformers`` (``lazy_model`` returns None), which knows the legacy renamings.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from elmcore.errors import BadInputError
from elmtrain.model.files import INDEX_FILE, WEIGHTS_FILE
from elmtrain.model.safetensors_io import SafetensorsReader

log = structlog.get_logger(__name__)

# The folder each lazily built model's weights are still to be read from.
_PENDING: weakref.WeakKeyDictionary[nn.Module, Path] = weakref.WeakKeyDictionary()
SLICE_BYTES = 4 << 20  # read at most this much of one tensor at a time
_TORCH_DTYPES = {
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


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters go to the meta device as modules register them; buffers (rotary
    frequencies, masks: computed in ``__init__``, often not in the files) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def lazy_model(directory: Path) -> PreTrainedModel | None:
    """The folder's causal LM with its parameters on the meta device, its weights read when
    ``run/parallel.py`` places it; None when the files' names do not map onto it (load it
    with ``families.load_model`` then)."""
    from elmtrain.model.averaging import open_weights

    if not (directory / "config.json").is_file():
        raise BadInputError(f"{directory} holds no config.json: not a Hugging Face model")
    if not any((directory / name).is_file() for name in (WEIGHTS_FILE, INDEX_FILE)):
        return None  # not safetensors (PyTorch's pickles): transformers reads those
    try:
        config = AutoConfig.from_pretrained(directory)
        with no_init_weights(), _parameters_on_meta():
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise BadInputError(f"cannot load the model in {directory}: {first_line}") from None
    model.tie_weights()
    readers: list[SafetensorsReader] = []
    try:
        source = open_weights(directory, readers)
        shapes = {name: reader.tensors[name].shape for name, reader in source.items()}
    finally:
        for reader in readers:
            reader.close()
    for name, param in model.named_parameters():
        found = _file_name(model, name, param, shapes)
        if found is None or shapes[found] != list(param.shape):
            log.info(
                "load.whole", folder=str(directory), reason=f"no tensor of its shape for {name}"
            )
            return None
    model.eval()
    _PENDING[model] = directory
    return model


def _aliases(model: nn.Module, param: nn.Parameter) -> list[str]:
    """Every name ``param`` has in ``model`` (tied embeddings have two)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


def _file_name(
    model: PreTrainedModel, name: str, param: nn.Parameter, names: Mapping[str, object]
) -> str | None:
    prefix = f"{model.base_model_prefix}."
    for alias in [name, *_aliases(model, param)]:
        for candidate in (alias, alias.removeprefix(prefix)):
            if candidate in names:
                return candidate
    return None


def pending(model: nn.Module) -> Path | None:
    """The folder a lazily built ``model``'s weights are still to be read from, if any."""
    return _PENDING.get(model)


def fill_shards(model: PreTrainedModel, directory: Path) -> int:
    """Read each of this rank's parameter shards (DTensors sharded on dim 0, or whole
    tensors) from the folder's safetensors files, in slices of rows; the bytes read."""
    from elmtrain.model.averaging import open_weights

    readers: list[SafetensorsReader] = []
    total = 0
    buffer = np.empty(SLICE_BYTES, dtype=np.uint8)  # one read buffer for every slice
    try:
        source = open_weights(directory, readers)
        with torch.no_grad():
            for name, param in model.named_parameters():
                found = _file_name(model, name, param, source)
                assert found is not None, name  # lazy_model checked
                buffer, read = _fill(param, source[found], found, buffer)
                total += read
    finally:
        for reader in readers:
            reader.close()
    _PENDING.pop(model, None)
    return total


def _fill(
    param: torch.Tensor, reader: SafetensorsReader, name: str, buffer: np.ndarray
) -> tuple[np.ndarray, int]:
    """Copy this rank's rows of tensor ``name`` into ``param``'s local storage, a slice of
    rows at a time through ``buffer`` (grown if one row is larger); the buffer, bytes read."""
    info = reader.tensors[name]
    dtype = _TORCH_DTYPES[info.dtype]
    shape = list(param.shape)
    if isinstance(param, DTensor):
        local = param.to_local()
        if not all(isinstance(p, Shard) and p.dim == 0 for p in param.placements):
            raise ValueError(f"{name}: only shards of the first dimension are read")
        # torch.chunk's split, as FSDP2 shards: ceil(rows / ranks) rows each, the last fewer.
        ranks, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
        first_row = min(rank * math.ceil(shape[0] / ranks), shape[0])
    else:
        local, first_row = param.data, 0
    if local.numel() == 0:
        return buffer, 0
    flat = local.view(local.shape[0], -1) if local.dim() else local.view(1, 1)
    row = flat.shape[1]  # elements per row of the first dimension
    itemsize = torch.empty((), dtype=dtype).element_size()
    if row * itemsize > buffer.nbytes:
        buffer = np.empty(row * itemsize, dtype=np.uint8)
    rows_per_slice = buffer.nbytes // (row * itemsize)
    for start in range(0, flat.shape[0], rows_per_slice):
        count = min(rows_per_slice, flat.shape[0] - start)
        raw = reader.read(name, (first_row + start) * row, count * row, buffer)
        values = torch.from_numpy(raw.view(np.uint8)).view(dtype)
        flat[start : start + count].copy_(values.view(count, row))
    return buffer, flat.numel() * itemsize


def open_model(directory: Path) -> PreTrainedModel:
    """The folder's model to train: built lazily where it can be (its weights read when it is
    placed on its ranks), else loaded whole by ``transformers``."""
    from elmtrain.model.families import load_model

    return lazy_model(directory) or load_model(directory)
