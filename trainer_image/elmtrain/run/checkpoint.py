"""Resumable step checkpoints under ``runs/<id>/checkpoints/step-N``, committed by marker.

Two formats: the whole model (a Hugging Face folder) and the training state, written by rank 0;
or sharded (``sharded_checkpoint.py``), every rank writing its shards. Either resumes a run of
any strategy and world size.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from elmcore import layout
from elmcore.errors import IntegrityError
from elmcore.storage import Storage
from elmcore.storage.commit import commit_dir, committed_steps, fetch_committed, read_marker
from elmtrain.cache import cache_dir
from elmtrain.model.families import load_model, save_model
from elmtrain.run.sharded_checkpoint import STORED_METADATA, load_sharded, save_sharded

log = structlog.get_logger(__name__)
STATE_FILE = "training_state.pt"


@dataclass
class Resumed:
    step: int
    # A whole-model checkpoint's model and state; None for a sharded one, which loads into
    # the sharded model and its optimizer (``load_shards``).
    model: PreTrainedModel | None
    state: dict[str, Any] | None


class Checkpointer:
    def __init__(self, storage: Storage, run_id: str, keep: int = 2) -> None:
        self.storage, self.run_id, self.keep = storage, run_id, keep
        self.prefix = layout.run_checkpoints(run_id)

    def save(self, step: int, model: PreTrainedModel, state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            folder = Path(tmp)
            save_model(model, folder)
            torch.save(state, folder / STATE_FILE)
            commit_dir(self.storage, folder, layout.run_checkpoint(self.run_id, step), step)
        log.info("checkpoint.committed", run_id=self.run_id, step=step)
        self._prune()

    def save_shards(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """A sharded checkpoint: every rank calls it, and writes its own shards."""
        save_sharded(
            self.storage, layout.run_checkpoint(self.run_id, step), step, model, optimizer, state
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            self._prune()

    def _prune(self) -> None:
        # Only after the new one is committed: there is always one to resume from.
        for old in committed_steps(self.storage, self.prefix)[: -self.keep]:
            self.storage.delete_prefix(layout.run_checkpoint(self.run_id, old))

    def latest(self, device: torch.device) -> Resumed | None:
        """The newest committed checkpoint that reads back whole: one whose files do not match
        their sha256 is skipped for the older one kept beside it (``keep`` >= 2), since a run
        resumed a few steps earlier loses less than a run that cannot resume at all. A sharded
        one is verified when ``load_shards`` reads it, with the same fallback."""
        corrupt: IntegrityError | None = None
        for step in reversed(committed_steps(self.storage, self.prefix)):
            key = layout.run_checkpoint(self.run_id, step)
            found = read_marker(self.storage, key)
            if found is not None and STORED_METADATA in found[0].files:
                return Resumed(step=step, model=None, state=None)
            try:
                with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                    folder = Path(tmp) / "checkpoint"
                    fetch_committed(self.storage, key, folder)
                    model = load_model(folder, device)
                    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            except IntegrityError as error:
                log.warning("checkpoint.corrupt", run_id=self.run_id, step=step, error=str(error))
                corrupt = error
                continue
            log.info("checkpoint.resumed", run_id=self.run_id, step=step)
            return Resumed(step=step, model=model, state=state)
        if corrupt is not None:  # every kept checkpoint is corrupt: say so, never start over
            raise corrupt
        return None

    def load_shards(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[int, dict[str, Any]]:
        """Load the sharded checkpoint of ``step`` into this rank's ``model`` and ``optimizer``,
        or, if its files do not match their sha256, the newest older sharded one; that step and
        its state. Every rank downloads and checks every file, so all ranks see the same bytes
        and fall back alike (a fetch fails before anything is loaded into the model)."""
        older = [s for s in committed_steps(self.storage, self.prefix) if s < step]
        corrupt = IntegrityError(f"run {self.run_id}: no sharded checkpoint at step {step}")
        for candidate in [step, *reversed(older)]:
            key = layout.run_checkpoint(self.run_id, candidate)
            found = read_marker(self.storage, key)
            if found is None or STORED_METADATA not in found[0].files:
                continue  # pruned meanwhile, or a whole-model checkpoint of an earlier strategy
            try:
                state = load_sharded(self.storage, key, model, optimizer)
            except IntegrityError as error:
                log.warning(
                    "checkpoint.corrupt", run_id=self.run_id, step=candidate, error=str(error)
                )
                corrupt = error
                continue
            log.info("checkpoint.resumed", run_id=self.run_id, step=candidate, sharded=True)
            return candidate, state
        raise corrupt  # every kept one is corrupt: say so, never start over

    def clear(self) -> None:
        self.storage.delete_prefix(self.prefix)
