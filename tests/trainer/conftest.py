"""A tiny forest template (tokenizer + seed) built once per session with the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import elmtrain

TINY_MODEL = json.dumps({"d_model": 48, "n_layers": 2, "n_heads": 2, "context_length": 64})


def training(**overrides: object) -> str:
    base = {
        "steps": 30,
        "batch_size": 8,
        "seq_len": 64,
        "checkpoint_interval": 10,
        "warmup_steps": 5,
        "learning_rate": 3e-3,
        "eval_batches": 4,
    }
    return json.dumps({**base, **overrides})


@pytest.fixture(scope="session")
def tokenizer_forest(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    forest = tmp_path_factory.mktemp("template") / "tokenizer-only"
    elmtrain(
        "tokenizer",
        "--forest",
        str(forest),
        "--data",
        str(corpus),
        "--vocab-size",
        "320",
        "--merge",
    )
    return forest


@pytest.fixture(scope="session")
def seeded_forest(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_forest: Path, corpus: Path
) -> Path:
    forest = tmp_path_factory.mktemp("template") / "seeded"
    shutil.copytree(tokenizer_forest, forest)
    elmtrain(
        "seed",
        "--forest",
        str(forest),
        "--data",
        *[str(corpus / d / "train.txt") for d in ("cooking", "sailing", "finance", "poetry")],
        "--model",
        TINY_MODEL,
        "--training",
        training(steps=40),
        "--merge",
    )
    return forest


@pytest.fixture
def forest_copy(tmp_path: Path) -> ForestFactory:
    return ForestFactory(tmp_path)


class ForestFactory:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, template: Path, name: str) -> Path:
        target = self.root / name
        shutil.copytree(template, target)
        return target
