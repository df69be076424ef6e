"""A run killed with SIGKILL resumes from its last committed step and ends bit-identical,
learning curve included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elmcore import layout
from elmcore.storage import open_storage
from elmcore.storage.commit import commit_dir, committed_steps
from elmtrain.run.checkpoint import STATE_FILE
from tests.conftest import elmtrain
from tests.trainer.conftest import ForestFactory, training

STEPS, INTERVAL = 80, 10


def branch_args(forest: Path, corpus: Path) -> list[str]:
    return [
        "branch",
        "--forest",
        str(forest),
        "--domain",
        "cooking",
        "--data",
        str(corpus / "cooking" / "train.txt"),
        "--val-data",
        str(corpus / "cooking" / "valid.txt"),
        "--training",
        training(steps=STEPS, checkpoint_interval=INTERVAL, eval_interval=INTERVAL),
        "--merge",
    ]


def as_before_shards(forest: Path, run: str) -> None:
    """Make a killed run look like one from before token shards: no shards or dataset records
    in storage, checkpoints whose training state records neither data nor learning curve."""
    shutil.rmtree(forest / "tokens")
    storage = open_storage(str(forest))
    for step in committed_steps(storage, layout.run_checkpoints(run)):
        key = layout.run_checkpoint(run, step)
        folder = forest / key
        state = torch.load(folder / STATE_FILE, weights_only=True)
        for new_key in ("data", "curve"):
            state.pop(new_key)
        (folder / layout.COMMIT_MARKER).unlink()
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "checkpoint"
            shutil.copytree(folder, copy)
            torch.save(state, copy / STATE_FILE)
            commit_dir(storage, copy, key, step)


@pytest.mark.parametrize("made", ["now", "before-shards"])
def test_sigkill_mid_training_resumes_to_identical_weights(
    seeded_forest: Path, corpus: Path, forest_copy: ForestFactory, made: str
) -> None:
    reference = forest_copy(seeded_forest, "reference")
    elmtrain(*branch_args(reference, corpus))

    killed = forest_copy(seeded_forest, "killed")
    run_dir = killed / "runs" / "branch.cooking.v1"
    process = subprocess.Popen(
        [sys.executable, "-m", "elmtrain", *branch_args(killed, corpus)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = run_dir / "checkpoints" / f"step-{INTERVAL:08d}" / "COMMITTED.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "result.json").exists(), "the kill came after the run had finished"
    assert not (killed / "experts").exists()
    if made == "before-shards":
        as_before_shards(killed, "branch.cooking.v1")

    resumed = elmtrain(*branch_args(killed, corpus))
    assert '"checkpoint.resumed"' in resumed.stderr

    expected = load_file(reference / "experts/cooking/v1/model.safetensors")
    actual = load_file(killed / "experts/cooking/v1/model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # The "before" perplexity is the init's, also for the attempt that resumed.
    metrics = [
        json.loads((f / "experts/cooking/v1/metrics.json").read_text()) for f in (reference, killed)
    ]
    assert metrics[0]["val_ppl_before"] == metrics[1]["val_ppl_before"]
    assert metrics[1]["val_ppl_after"] < metrics[1]["val_ppl_before"]
    # The learning curve: before, every INTERVAL steps, after. The point at the step the killed
    # attempt committed came back with its checkpoint; the rest match the uninterrupted run.
    curve = metrics[1]["curve"]
    if made == "before-shards":  # the points up to the resume were never recorded then
        line = next(x for x in resumed.stderr.splitlines() if '"checkpoint.resumed"' in x)
        step = json.loads(line[line.index("{") :])["step"]
        assert curve[1:] == [p for p in metrics[0]["curve"] if p["step"] > step]
        curve = metrics[0]["curve"]
    assert [p["step"] for p in curve] == list(range(0, STEPS + 1, INTERVAL))
    assert curve == metrics[0]["curve"]
    assert curve[0]["perplexity"] == metrics[1]["val_ppl_before"]
    assert curve[-1]["perplexity"] == metrics[1]["val_ppl_after"]
    assert curve[-1]["loss"] < curve[1]["loss"] < curve[0]["loss"]
    # The checkpoints were only for resuming: cleaned up once the expert is committed.
    assert not (run_dir / "checkpoints").exists()


def test_rerunning_a_finished_run_changes_nothing(
    seeded_forest: Path, corpus: Path, forest_copy: ForestFactory
) -> None:
    forest = forest_copy(seeded_forest, "twice")
    elmtrain(*branch_args(forest, corpus))
    manifest = (forest / "manifest.json").read_text()
    again = elmtrain(*branch_args(forest, corpus))
    assert '"job.already_finished"' in again.stderr
    assert (forest / "manifest.json").read_text() == manifest
