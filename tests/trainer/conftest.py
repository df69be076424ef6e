"""Per-test copies of the session's forest templates (see tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, training

__all__ = ["TINY_MODEL", "ForestFactory", "training"]


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
