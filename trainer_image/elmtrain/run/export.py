"""The trained model as a Hugging Face folder, from whole weights or from fsdp shards (issue 27,
point 4).

Under fsdp no rank ever holds the whole model, nor one whole tensor: the weights are streamed
tensor by tensor, each rank sending its rows of a parameter to rank 0 a slice at a time
(``run/shard_rows.py``), which writes them into safetensors files of at most
``max_shard_bytes`` (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``,
as ``save_pretrained`` shards; one ``model.safetensors`` when it fits). A rank's peak is its
own shards plus one slice.
Whole models (ddp, one process) are saved by ``save_pretrained`` on rank 0, as before. Either
way the folder is then committed like every artifact (``commit_dir``: each file's sha256, the
marker last).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog
import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from elmtrain.model.families import save_model
from elmtrain.model.files import WEIGHTS_FILE, write_index
from elmtrain.model.safetensors_io import SafetensorsWriter
from elmtrain.run.shard_rows import row_slices
from elmtrain.runtime import Runtime

log = structlog.get_logger(__name__)
MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's default shard size ("5GB")
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def is_sharded(model: PreTrainedModel) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def export_model(
    model: PreTrainedModel,
    folder: Path,
    runtime: Runtime,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write ``model`` (whole, or this rank's fsdp shards) as an HF folder (``config.json``
    and the weights) into ``folder`` on rank 0. Every rank must call it."""
    if not is_sharded(model):
        if runtime.is_main:
            save_model(model.to("cpu"), folder)
        return
    tensors = _tensors(model)
    files = _layout(tensors, max_shard_bytes)
    if runtime.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
    written = 0
    for file, names in files.items():
        writer = None
        if runtime.is_main:
            shapes = {n: (_dtype(tensors[n]), list(tensors[n].shape)) for n in names}
            writer = SafetensorsWriter(folder / file, shapes, {"format": "pt"})
        for name in names:
            tensor = tensors[name]
            # Every rank gathers (a collective); only rank 0 keeps and writes the result.
            # Every rank sends its rows (run/shard_rows.py); only rank 0 receives and writes.
            for piece in row_slices(tensor):
                if writer is not None:
                    values = piece.contiguous()
                    writer.write(name, _raw(values))
                    written += values.numel() * values.element_size()
        if writer is not None:
            writer.close()
    if runtime.is_main and len(files) > 1:
        write_index(folder, files, written)
    log.info("export.streamed", files=len(files), tensors=len(tensors), bytes=written)


def _tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state to save, each tensor once (tied embeddings under their first name, as
    ``save_pretrained`` keeps them), in the model's order."""
    seen: set[int] = set()
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kept[name] = tensor
    return kept


def _layout(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> its tensors, filled in order up to ``max_shard_bytes`` each."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {WEIGHTS_FILE: groups[0]}
    count = len(groups)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": g for i, g in enumerate(groups)}


def _dtype(tensor: torch.Tensor) -> str:
    return _SAFETENSORS_DTYPES[tensor.dtype]


def _raw(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as numpy (bfloat16 through its 16 bits)."""
    flat = values.reshape(-1)
    if values.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().view(np.uint8)
