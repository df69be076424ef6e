"""Text formats, token shards (prepared once, read by range), and the deterministic sampling
that resume and DDP rely on."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from elmcore.errors import BadInputError
from elmcore.storage import open_storage
from elmtrain.config import ModelConfig, TrainingConfig
from elmtrain.data import (
    DOC_SEPARATOR,
    TokenStore,
    batch_indices,
    cache_store,
    iter_documents,
    load_sequences,
    tokenizer_fingerprint,
)
from elmtrain.data import documents as documents_module
from elmtrain.data.shards import ShardFile, ShardWriter, TokenSequences, TokenStream
from elmtrain.model.families import build_model
from elmtrain.run.checkpoint import Checkpointer
from elmtrain.run.progress import ProgressReporter
from elmtrain.run.train import train
from elmtrain.runtime import Runtime
from tests.textgen import domain_text


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


def reference_tokens(path: Path, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """What the trainer's first, in-memory path produced: each document's ids, then EOS."""
    ids: list[int] = []
    for doc in path.read_text().split(DOC_SEPARATOR):
        if doc.strip():
            ids += tokenizer(doc.strip("\n"), add_special_tokens=False)["input_ids"]
            ids.append(int(tokenizer.eos_token_id))
    return ids


def test_large_text_streams_in_chunks_with_the_same_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked reading splits exactly as the whole text would, even with a separator (or
    a longer run of newlines) across a chunk boundary."""
    docs = [f"doc {i}\n" + "x" * (i % 7) for i in range(200)]
    text = DOC_SEPARATOR.join(docs) + "\n\n\n\n\n" + "tail"
    (tmp_path / "a.txt").write_text(text)
    monkeypatch.setattr(documents_module, "CHUNK_CHARS", 5)
    expected = [d.strip("\n") for d in text.split(DOC_SEPARATOR) if d.strip()]
    assert list(iter_documents([str(tmp_path / "a.txt")])) == expected


def test_shards_are_prepared_once_and_match_the_in_memory_tokens(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELMTRAIN_PREPARE_WORKERS", "2")  # the worker processes' path
    forest = open_storage(str(tmp_path / "forest"))
    store = TokenStore(forest, tokenizer, tokenizer_fingerprint(tokenizer))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(domain_text("cooking", 30))
    (data / "b.txt").write_text(domain_text("sailing", 30))
    record = store.prepare([str(data)])
    assert [f.key for f in record.files] == ["a.txt", "b.txt"]
    expected = reference_tokens(data / "a.txt", tokenizer) + reference_tokens(
        data / "b.txt", tokenizer
    )
    assert record.tokens == len(expected)
    stream = store.stream(record)
    assert stream.read(0, len(stream)).tolist() == expected
    # The same file under another location list (the seed's mixture) reuses its shards.
    shard_folders = {k.rsplit("/", 1)[0] for k in forest.list_keys("tokens") if "/sets/" not in k}
    again = store.prepare([str(data / "b.txt")])
    assert again.files[0].shards == record.files[1].shards
    assert {k.rsplit("/", 1)[0] for k in forest.list_keys("tokens") if "/sets/" not in k} == (
        shard_folders
    )
    # A second prepare of the same list reads the record, hashes nothing.
    monkeypatch.setattr("elmtrain.data.store.sha256_file", _never)
    assert store.prepare([str(data)]) == record
    # A file changed in place: its listing differs, so it is tokenized anew.
    monkeypatch.undo()
    (data / "b.txt").write_text(domain_text("finance", 10))
    changed = store.prepare([str(data)])
    assert changed.files[1].shards != record.files[1].shards
    assert changed.files[0].shards == record.files[0].shards


def _never(path: Path) -> str:
    raise AssertionError(f"hashed {path} again")


def test_windows_span_shards_and_files(tmp_path: Path) -> None:
    """Reading by range gives the same windows as packing one concatenated array."""
    storage = open_storage(str(tmp_path / "s"))
    tokens = np.arange(1000, dtype=np.uint16)
    (tmp_path / "stage").mkdir()
    writer = ShardWriter(tmp_path / "stage", "uint16", cap=128)
    writer.write(tokens[:300])
    writer.write(tokens[300:])
    counts = writer.close()
    assert counts == [128] * 7 + [104]
    files = []
    for i, count in enumerate(counts):
        storage.upload_file(f"x/tokens-{i:05d}.bin", tmp_path / "stage" / f"tokens-{i:05d}.bin")
        files.append(ShardFile(f"x/tokens-{i:05d}.bin", count))
    sequences = TokenSequences(TokenStream(storage, files, "uint16"), 48, "x")
    packed = torch.from_numpy(tokens[: 1000 // 48 * 48].astype(np.int64)).view(-1, 48)
    assert len(sequences) == len(packed) == 20
    assert torch.equal(sequences[:], packed)
    assert torch.equal(sequences[[19, 2, 2]], packed[[19, 2, 2]])
    assert torch.equal(sequences[torch.tensor([5])], packed[[5]])
    assert torch.equal(sequences[3], packed[3])
    with pytest.raises(IndexError):
        sequences[[20]]


def test_too_little_text_names_the_files(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    (tmp_path / "tiny.txt").write_text("salt")
    with pytest.raises(BadInputError, match=r"tiny\.txt.*fewer than one sequence"):
        load_sequences([str(tmp_path / "tiny.txt")], cache_store(tokenizer), 64)


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
    sequences = cache_store(tokenizer).sequences([str(tmp_path / "d.txt")], 32)
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


def test_tokenizing_workers_exit_with_a_killed_parent(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """A prepare killed outright (SIGKILL) leaves no worker processes behind."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "encode.py"
    script.write_text(
        "import sys, time\n"
        "from elmtrain.data.encode import encode_documents\n"
        "docs = iter(lambda: 'text ' * 200, None)\n"  # endless: killed while it works
        "for _ in encode_documents(docs, open(sys.argv[1]).read(), 0, 'uint16', 2):\n"
        "    pass\n"
    )
    (tmp_path / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "tokenizer.json")])
    try:
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = [
                p
                for p in psutil.Process(parent.pid).children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())
            ]
            time.sleep(0.2)
        assert len(workers) == 2, "the pool's workers never started"
        time.sleep(1.0)  # at work
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert alive == [], f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        parent.kill()
