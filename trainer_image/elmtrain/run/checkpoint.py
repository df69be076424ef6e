"""Resumable step checkpoints under ``runs/<id>/checkpoints/step-N``, committed by marker."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import PreTrainedModel

from elmcore import layout
from elmcore.storage import Storage
from elmcore.storage.commit import commit_dir, committed_steps, fetch_committed
from elmtrain.cache import cache_dir
from elmtrain.model.families import load_model, save_model

log = structlog.get_logger(__name__)
STATE_FILE = "training_state.pt"


@dataclass
class Resumed:
    step: int
    model: PreTrainedModel
    state: dict[str, Any]


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
        # Prune only after the new one is committed: there is always one to resume from.
        for old in committed_steps(self.storage, self.prefix)[: -self.keep]:
            self.storage.delete_prefix(layout.run_checkpoint(self.run_id, old))

    def latest(self, device: torch.device) -> Resumed | None:
        steps = committed_steps(self.storage, self.prefix)
        if not steps:
            return None
        step = steps[-1]
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            folder = Path(tmp) / "checkpoint"
            fetch_committed(self.storage, layout.run_checkpoint(self.run_id, step), folder)
            model = load_model(folder, device)
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        log.info("checkpoint.resumed", run_id=self.run_id, step=step)
        return Resumed(step=step, model=model, state=state)

    def clear(self) -> None:
        self.storage.delete_prefix(self.prefix)
