"""Per-test copies of the session's forest templates (see tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import TINY_MODEL, training
from tests.textgen import domain_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

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


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on one domain, for the data path's tests (tokenizers and
    transformers imported here, not at collection: the pure tests never pay for them)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [domain_text("cooking", 50)],
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
