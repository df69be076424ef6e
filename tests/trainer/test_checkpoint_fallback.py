"""A corrupt newest checkpoint falls back to the older one kept beside it (issue 27, point 3):
the run resumes a few steps earlier and ends where an uninterrupted run ends; when every kept
checkpoint is corrupt the run fails, saying so, and never starts over silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elmcore.errors import IntegrityError
from elmcore.storage import open_storage
from elmtrain.config import ModelConfig, TrainingConfig
from elmtrain.model.families import build_model
from elmtrain.run.checkpoint import Checkpointer
from elmtrain.run.progress import ProgressReporter
from elmtrain.run.train import train
from elmtrain.runtime import Runtime
from tests.trainer.test_sharded_checkpoint import setup, step

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=16)
SEQUENCES = torch.randint(0, 97, (40, 16), generator=torch.Generator().manual_seed(1))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def run(root: Path, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` of training with a checkpoint every 4 (the last step has none), resuming from
    what ``root`` holds. A constant learning rate: a step's rate does not depend on the total,
    so a shorter run is the start of a longer one."""
    cfg = TrainingConfig(
        steps=steps, batch_size=4, seq_len=16, checkpoint_interval=4, warmup_steps=0,
        schedule="constant",
    )  # fmt: skip
    storage = open_storage(str(root))
    outcome = train(
        build_model(MODEL, 97, 0, seed=0),
        SEQUENCES,
        cfg,
        Runtime(device=torch.device("cpu")),
        Checkpointer(storage, "r", keep=2),
        ProgressReporter(storage, "r"),
    )
    return {k: v.clone() for k, v in outcome.model.state_dict().items()}


def test_a_corrupt_newest_checkpoint_resumes_from_the_older_one(tmp_path: Path) -> None:
    uninterrupted = run(tmp_path / "straight", 12)
    run(tmp_path / "interrupted", 9)  # checkpoints at steps 4 and 8, both kept
    checkpoints = tmp_path / "interrupted" / "runs" / "r" / "checkpoints"
    flip_a_byte(checkpoints / "step-00000008" / "model.safetensors")
    # Resumed at step 4 (the data of a step is a function of the step), it ends as the
    # uninterrupted run does.
    resumed = run(tmp_path / "interrupted", 12)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_every_kept_checkpoint_corrupt_fails_the_run(tmp_path: Path) -> None:
    run(tmp_path, 9)
    for folder in (tmp_path / "runs" / "r" / "checkpoints").iterdir():
        flip_a_byte(folder / "model.safetensors")
    with pytest.raises(IntegrityError, match="sha256"):
        Checkpointer(open_storage(str(tmp_path)), "r").latest(torch.device("cpu"))


def test_a_corrupt_newest_sharded_checkpoint_loads_the_older_one(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    checkpointer = Checkpointer(storage, "s", keep=2)
    parallel, optimizer, engine = setup("ddp")
    saved = []
    for at in (1, 2):
        step(engine, optimizer)
        checkpointer.save_shards(at, parallel.model, optimizer, {"step": at})
        saved.append({k: v.clone() for k, v in parallel.model.state_dict().items()})
    newest = tmp_path / "runs" / "s" / "checkpoints" / "step-00000002"
    flip_a_byte(next(newest.glob("*.distcp")))

    fresh, fresh_optimizer, _ = setup("ddp")
    assert checkpointer.load_shards(2, fresh.model, fresh_optimizer) == (1, {"step": 1})
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(tensor, saved[0][name]), name
    flip_a_byte(next((newest.parent / "step-00000001").glob("*.distcp")))
    with pytest.raises(IntegrityError, match="sha256"):
        checkpointer.load_shards(2, fresh.model, fresh_optimizer)
