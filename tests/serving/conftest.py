"""A forest with three experts, trained once per session by the real CLI, and servers of it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import elmtrain, training
from tests.harness.serve import Served, serving

EXPERTS = ("cooking", "sailing", "finance")
NAME = "forest"


def train_expert(forest: Path, corpus: Path, domain: str, steps: int = 25) -> None:
    elmtrain("branch", "--forest", str(forest), "--domain", domain,
             "--data", str(corpus / domain / "train.txt"),
             "--val-data", str(corpus / domain / "valid.txt"),
             "--init", "seed", "--training", training(steps=steps), "--merge")  # fmt: skip


@pytest.fixture(scope="session")
def expert_forest(
    tmp_path_factory: pytest.TempPathFactory, seeded_forest: Path, corpus: Path
) -> Path:
    forest = tmp_path_factory.mktemp("served") / "forest"
    shutil.copytree(seeded_forest, forest)
    for domain in EXPERTS:
        train_expert(forest, corpus, domain)
    return forest


@pytest.fixture(scope="module")
def server(expert_forest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(
        str(expert_forest), tmp_path_factory.mktemp("serve-log"), "--name", NAME
    ) as served:
        yield served
