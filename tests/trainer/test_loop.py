"""The training loop's hot path: progress written by a thread (in order, failures surfacing),
the loss kept on the device and read when reported, shards read without a file open per window.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elmcore.errors import TransientError
from elmcore.records import Progress
from elmcore.storage import Storage, open_storage
from elmtrain.config import ModelConfig, TrainingConfig
from elmtrain.data import batch_indices
from elmtrain.data.shards import ShardFile, TokenSequences, TokenStream
from elmtrain.model.families import build_model
from elmtrain.model.fused_loss import CausalLMLoss
from elmtrain.run.checkpoint import Checkpointer
from elmtrain.run.progress import ProgressReporter
from elmtrain.run.train import train
from elmtrain.runtime import Runtime


class SlowStorage:
    """Records each progress write after a delay (a slow store), or fails as told."""

    def __init__(self, delay: float = 0.0, failure: BaseException | None = None) -> None:
        self.delay, self.failure = delay, failure
        self.written: list[Progress] = []
        self.threads: set[str] = set()

    def write_bytes(self, key: str, data: bytes) -> None:
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        if self.failure is not None:
            raise self.failure
        self.written.append(Progress.model_validate_json(data))


def reporter(storage: SlowStorage) -> ProgressReporter:
    return ProgressReporter(storage, "run", interval=0.0)  # type: ignore[arg-type]


def progress(step: int) -> Progress:
    return Progress(run_id="run", phase="training", step=step, total_steps=100)


def test_background_writes_keep_order_and_end_with_the_newest() -> None:
    storage = SlowStorage(delay=0.01)
    reports = reporter(storage)
    with reports.in_background():
        for step in range(1, 101):
            reports.report(progress(step))  # far faster than the store writes
    steps = [p.step for p in storage.written]
    assert steps == sorted(set(steps)) and steps[-1] == 100
    assert len(steps) < 100  # records that waited behind a slow write gave way to newer ones
    assert storage.threads == {"progress"}
    # Outside the block, writes are the caller's own again (jobs.py's later phases).
    reports.report(Progress(run_id="run", phase="evaluating"), force=True)
    assert storage.written[-1].phase == "evaluating"
    assert storage.threads == {"progress", threading.current_thread().name}


def test_a_failing_writer_surfaces_in_the_caller() -> None:
    storage = SlowStorage(failure=ValueError("a bug in the writer"))
    reports = reporter(storage)
    with pytest.raises(ValueError, match="a bug in the writer"), reports.in_background():
        reports.report(progress(1))
    # Or at the next report, before leaving the block.
    with pytest.raises(ValueError, match="a bug in the writer"), reports.in_background():
        reports.report(progress(1))
        deadline = time.monotonic() + 10
        while not reports._failure and time.monotonic() < deadline:
            time.sleep(0.01)
        reports.report(progress(2))


def test_storage_errors_stay_advisory_and_the_bodys_error_wins() -> None:
    storage = SlowStorage(failure=TransientError("throttled"))
    reports = reporter(storage)
    with reports.in_background():
        reports.report(progress(1))  # logged, as in the foreground
    failing = reporter(SlowStorage(failure=ValueError("writer bug")))
    with pytest.raises(KeyError), failing.in_background():
        failing.report(progress(1))
        time.sleep(0.05)
        raise KeyError("the training's own error")


def test_the_reported_loss_is_the_mean_of_the_micro_batch_losses(tmp_path: Path) -> None:
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=16)
    sequences = torch.randint(0, 97, (40, 16), generator=torch.Generator().manual_seed(1))
    cfg = TrainingConfig(
        steps=1, batch_size=8, micro_batch_size=2, seq_len=16, checkpoint_interval=100
    )
    model = build_model(config, 97, 0, seed=0)
    rows = sequences[batch_indices(0, 8, len(sequences), cfg.seed)]
    with torch.no_grad():
        expected = [float(CausalLMLoss(model)(rows[i : i + 2])) for i in range(0, 8, 2)]
    storage = open_storage(str(tmp_path))
    outcome = train(
        model,
        sequences,
        cfg,
        Runtime(device=torch.device("cpu")),
        Checkpointer(storage, "r"),
        ProgressReporter(storage, "r"),
    )
    record = Progress.model_validate_json(storage.read_bytes("runs/r/progress.json"))
    assert record.step == 1
    assert outcome.final_loss == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert record.loss == pytest.approx(sum(expected) / 4, abs=1e-5)


class Remote:
    """Local storage that does not say so: reads go through ``read_range``, as on S3."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.threads: set[str] = set()

    def local_path(self, key: str) -> None:
        return None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self.threads.add(threading.current_thread().name)
        return self.storage.read_range(key, offset, length)


def test_windows_read_the_same_locally_and_remotely(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    tokens = np.arange(1000, dtype=np.uint16)
    files = []
    for i, (start, stop) in enumerate([(0, 130), (130, 600), (600, 1000)]):
        storage.write_bytes(f"x/tokens-{i:05d}.bin", tokens[start:stop].tobytes())
        files.append(ShardFile(f"x/tokens-{i:05d}.bin", stop - start))
    local = TokenSequences(TokenStream(storage, files, "uint16"), 48, "x")
    remote_storage = Remote(storage)
    remote = TokenSequences(TokenStream(remote_storage, files, "uint16"), 48, "x")  # type: ignore[arg-type]
    packed = torch.from_numpy(tokens[: 1000 // 48 * 48].astype(np.int64)).view(-1, 48)
    assert local.stream.local and not remote.stream.local
    order = [19, 2, 2, 7, 12, 0, 5]
    assert torch.equal(local[order], packed[order])
    assert torch.equal(remote[order], packed[order])
    assert torch.equal(local[:], remote[:])
    assert all(name.startswith("read-range") for name in remote_storage.threads)
    assert local[[]].shape == (0, 48) and local[[]].dtype == torch.long
