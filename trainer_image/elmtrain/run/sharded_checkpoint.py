"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards, in parallel, and a checkpoint loads into any world size (DCP reshards on load).

A checkpoint folder (``runs/<id>/checkpoints/step-N``) holds DCP's index (``.metadata``,
written by rank 0; stored as ``metadata.dcp``: storage keys never start with a dot), each
rank's shards (``__<rank>_0.distcp``), the small training state (``training_state.pt``:
scheduler, RNG, curve) and, written last by rank 0, the commit marker listing every rank's
files with their sha256 and size, as ``commit_dir`` does for one writer.
So nothing is read before its marker exists, and every file is verified when fetched.

fsdp runs checkpoint this way (``Checkpointer.save_shards``). Not yet (issue 27, point 3):
each reader fetches the whole folder (every rank's shards), not only the shards it needs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save

from elmcore import layout
from elmcore.records import CommitMarker, FileDigest
from elmcore.storage import Storage
from elmcore.storage.base import sha256_file
from elmcore.storage.commit import fetch_committed
from elmtrain.cache import cache_dir

log = structlog.get_logger(__name__)
STATE_FILE = "training_state.pt"
METADATA, STORED_METADATA = ".metadata", "metadata.dcp"


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    # Each rank's own shards (DTensors under fsdp, whole tensors otherwise), keyed by name.
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def save_sharded(
    storage: Storage,
    key: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Commit this rank's shards (and, on rank 0, ``state``) under ``key``; every rank calls it."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    marker_key = f"{key}/{layout.COMMIT_MARKER}"
    if rank == 0:
        storage.delete(marker_key)  # un-commit first: never a mix of two checkpoints
    if distributed:
        dist.barrier()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp)
        save(_sharded_state(model, optimizer), storage_writer=FileSystemWriter(folder))
        if rank == 0:
            (folder / METADATA).rename(folder / STORED_METADATA)
            torch.save(state, folder / STATE_FILE)
        digests: dict[str, FileDigest] = {}
        for path in sorted(folder.iterdir()):
            digests[path.name] = FileDigest(sha256=sha256_file(path), size=path.stat().st_size)
            storage.upload_file(f"{key}/{path.name}", path)
    every: list[dict[str, FileDigest]] = [digests]
    if distributed:
        every = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, digests)  # also: every rank's files are uploaded
    if rank == 0:
        files = {name: digest for ranks in every for name, digest in ranks.items()}
        marker = CommitMarker(files=files, step=step).model_dump_json(indent=1)
        storage.write_bytes(marker_key, marker.encode())
        log.info("checkpoint.committed", key=key, step=step, files=len(files), sharded=True)
    if distributed:
        dist.barrier()  # committed before any rank goes on (and, say, prunes or exits)


def load_sharded(
    storage: Storage, key: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load the committed checkpoint ``key`` into this rank's ``model`` and ``optimizer``
    (of any world size and strategy; the optimizer before its first step); its ``state``.
    Raises ``IntegrityError`` if it is uncommitted or a file does not match its sha256."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        folder = Path(tmp) / "checkpoint"
        fetch_committed(storage, key, folder)
        (folder / STORED_METADATA).rename(folder / METADATA)
        sharded = _sharded_state(model, optimizer)
        load(sharded, storage_reader=FileSystemReader(folder))
        state: dict[str, Any] = torch.load(
            folder / STATE_FILE, map_location="cpu", weights_only=True
        )
    set_model_state_dict(model, sharded["model"])
    set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
    return state
