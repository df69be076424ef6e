"""Two-process DDP (gloo, CPU): matches one process with the same global batch, and a SIGTERM
to any rank, at any moment, checkpoints once and exits 75 (through ``elmtrain-torchrun``)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from elmtrain.config import ModelConfig
from elmtrain.model.families import build_model
from tests.conftest import elmtrain
from tests.trainer.conftest import TINY_MODEL, ForestFactory, training


def seed_args(forest: Path, corpus: Path) -> list[str]:
    return [
        "seed",
        "--forest",
        str(forest),
        "--data",
        str(corpus / "sailing" / "train.txt"),
        "--model",
        TINY_MODEL,
        "--training",
        training(steps=12, batch_size=8),
    ]


def two_rank_command(*args: str) -> list[str]:
    """``elmtrain.run.launch`` of two CPU processes with ``args`` (``-m module ...``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "elmtrain.run.launch", "--nproc-per-node=2",
            "--master-addr=127.0.0.1", f"--master-port={port}", *args]  # fmt: skip


def two_ranks(args: list[str]) -> list[str]:
    """The command a multi-GPU Job runs (planner/jobs.py), on two CPU processes."""
    return two_rank_command("-m", "elmtrain", *args)


def test_two_rank_ddp_matches_single_process(
    tokenizer_forest: Path, corpus: Path, forest_copy: ForestFactory
) -> None:
    single = forest_copy(tokenizer_forest, "single")
    elmtrain(*seed_args(single, corpus))

    ddp = forest_copy(tokenizer_forest, "ddp")
    completed = subprocess.run(
        two_ranks(seed_args(ddp, corpus)), capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    one = load_file(single / "seed" / "model.safetensors")
    two = load_file(ddp / "seed" / "model.safetensors")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=1e-4), name
    # And training moved the weights: the match is not two untouched initialisations.
    tokenizer = AutoTokenizer.from_pretrained(single / "tokenizer")
    initial = build_model(
        ModelConfig.model_validate_json(TINY_MODEL), len(tokenizer), tokenizer.eos_token_id, seed=0
    ).state_dict()
    moved = max(float((one[n] - initial[n]).abs().max()) for n in one)
    assert moved > 1e-3


def worker_ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's training processes by their RANK."""
    ranks = {}
    for child in launcher.children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None and "elmtrain" in " ".join(child.cmdline()):
            ranks[int(rank)] = child
    return ranks


def training_started(
    args: list[str], progress: Path
) -> tuple[subprocess.Popen[str], dict[int, psutil.Process]]:
    """The two-rank run, once it reports a training step, and its ranks' processes."""
    progress.unlink(missing_ok=True)
    process = subprocess.Popen(
        two_ranks(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    phase = None
    while phase != "training" and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            phase = json.loads(progress.read_text())["phase"]
        except (OSError, ValueError):
            continue  # not written yet, or being replaced
    assert phase == "training"
    ranks: dict[int, psutil.Process] = {}
    while len(ranks) < 2 and time.monotonic() < deadline:
        ranks = worker_ranks(psutil.Process(process.pid))
    return process, ranks


def stopped_at(process: subprocess.Popen[str]) -> int:
    """The one step every rank said it stopped at, after exit 75 within a grace period."""
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "not within a pod's default grace period"
    assert process.returncode == 75, stderr[-3000:]
    steps = {int(s) for s in re.findall(r"preempted \(SIGTERM\) at step (\d+)", stderr)}
    assert len(steps) == 1, stderr[-3000:]  # both ranks stopped at the same step
    return steps.pop()


@pytest.mark.parametrize("signalled", ["rank 1 only", "both, at different steps"])
def test_sigterm_to_some_ranks_checkpoints_once_and_exits_75(
    tokenizer_forest: Path, corpus: Path, forest_copy: ForestFactory, signalled: str
) -> None:
    forest = forest_copy(tokenizer_forest, "preempted")
    args = seed_args(forest, corpus)
    # Long enough never to finish first; no periodic checkpoint: the only ones are preemption's.
    args[-1] = training(
        steps=100_000, batch_size=8, checkpoint_interval=100_000, progress_interval_seconds=0.2
    )
    run = forest / "runs" / "seed"
    process, ranks = training_started(args, run / "progress.json")
    os.kill(ranks[1].pid, signal.SIGTERM)
    if signalled.startswith("both"):
        time.sleep(0.5)  # rank 0 hears it later (the ranks may have stopped already)
        if ranks[0].is_running():
            os.kill(ranks[0].pid, signal.SIGTERM)
    first = stopped_at(process)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{first:08d}"]

    # The retry resumes there; the pod's own SIGTERM (to the launcher, which passes it on)
    # stops it the same way, one checkpoint later.
    process, _ = training_started(args, run / "progress.json")
    process.send_signal(signal.SIGTERM)
    second = stopped_at(process)
    assert second > first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step-{first:08d}",
        f"step-{second:08d}",
    ]


def test_the_launcher_exits_with_what_the_ranks_said() -> None:
    from elmtrain.run.launch import exit_code

    sigterm, sigkill = -signal.SIGTERM, -signal.SIGKILL
    assert exit_code([65, sigterm]) == 65  # bad input on one rank: never retried
    assert exit_code([2]) == 2
    assert exit_code([75, sigterm]) == 75  # preempted; torchrun stopped the other rank
    assert exit_code([sigterm, sigterm]) == 75  # the pod's SIGTERM, passed on
    assert exit_code([1, sigterm]) == 1  # a bug on one rank
    assert exit_code([sigkill]) == 1  # killed outright (OOM): not a preemption it saved from
