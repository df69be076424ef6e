"""Text formats, the token cache, and the deterministic sampling that resume and DDP rely on."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from elmcore.errors import BadInputError
from elmcore.storage import open_storage
from elmtrain.checkpoint import Checkpointer
from elmtrain.config import ModelConfig, TrainingConfig
from elmtrain.data import batch_indices, iter_documents, load_sequences, load_tokens
from elmtrain.models import build_model
from elmtrain.progress import ProgressReporter
from elmtrain.runtime import Runtime
from elmtrain.train import train
from tests.textgen import domain_text


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [domain_text("cooking", 50)],
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def test_txt_jsonl_and_gzip_give_the_same_documents(tmp_path: Path) -> None:
    docs = ["first doc\nline two", "second doc", "third"]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n\n\n".join(docs))
    (tmp_path / "jsonl").mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "jsonl" / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "jsonl" / "ignored.bin").write_bytes(b"\x00")
    assert list(iter_documents([str(tmp_path / "txt")])) == docs
    assert list(iter_documents([str(tmp_path / "jsonl")])) == docs
    assert list(iter_documents([str(tmp_path / "txt" / "a.txt")])) == docs


def test_bad_records_are_bad_input(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(BadInputError, match=r"x\.jsonl:1"):
        list(iter_documents([str(tmp_path / "x.jsonl")]))


def test_tokens_are_cached_by_content(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELMTRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.txt").write_text(domain_text("cooking", 20))
    first = load_tokens([str(tmp_path / "d.txt")], tokenizer)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
    assert (load_tokens([str(tmp_path / "d.txt")], tokenizer) == first).all()
    assert first[-1] == tokenizer.eos_token_id  # documents end with end-of-text


def test_batches_are_a_pure_function_of_step_and_seed() -> None:
    n = 37
    steps = [batch_indices(s, 8, n, seed=3) for s in range(20)]
    assert steps == [batch_indices(s, 8, n, seed=3) for s in range(20)]
    assert steps != [batch_indices(s, 8, n, seed=4) for s in range(20)]
    # Every epoch visits every sequence exactly once.
    flat = [i for step in steps for i in step]
    assert sorted(flat[:n]) == list(range(n))


def test_gradient_accumulation_matches_one_big_batch(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    (tmp_path / "d.txt").write_text(domain_text("sailing", 40))
    sequences = load_sequences([str(tmp_path / "d.txt")], tokenizer, 32)
    runtime = Runtime(device=torch.device("cpu"))
    results = []
    for name, micro in (("whole", None), ("accum", 2)):
        storage = open_storage(str(tmp_path / name))
        cfg = TrainingConfig(
            steps=6, batch_size=8, micro_batch_size=micro, seq_len=32, checkpoint_interval=100
        )
        model = build_model(
            ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=32),
            len(tokenizer),
            int(tokenizer.eos_token_id),
            seed=0,
        )
        outcome = train(
            model,
            sequences,
            cfg,
            runtime,
            Checkpointer(storage, name),
            ProgressReporter(storage, name),
        )
        results.append(outcome.model.state_dict())
    for key, value in results[0].items():
        assert torch.allclose(value, results[1][key], atol=1e-5), key
