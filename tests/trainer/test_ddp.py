"""Two-process DDP (gloo, CPU) matches one process with the same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from elmtrain.config import ModelConfig
from elmtrain.models import build_model
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


def test_two_rank_ddp_matches_single_process(
    tokenizer_forest: Path, corpus: Path, forest_copy: ForestFactory
) -> None:
    single = forest_copy(tokenizer_forest, "single")
    elmtrain(*seed_args(single, corpus))

    ddp = forest_copy(tokenizer_forest, "ddp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "elmtrain",
            *seed_args(ddp, corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
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
