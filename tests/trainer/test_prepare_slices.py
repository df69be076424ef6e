"""Parallel prepare (issue 27, point 6): N workers, each tokenizing a slice of the files, whose
slice records combine into exactly the dataset record, token sequence and training windows
that one worker writes; a slice rerun changes nothing; bad ``--workers`` / ``--worker-index``
exit 65 naming the flag."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from elmcore import layout
from elmcore.errors import ExitCode
from elmcore.records import CommitMarker
from elmcore.storage import Storage, open_storage
from elmtrain.cli import main
from elmtrain.data import TokenStore, tokenizer_fingerprint
from elmtrain.data.datasets import DatasetRecord
from elmtrain.data.store import slice_files
from elmtrain.forest import Forest
from tests.conftest import elmtrain
from tests.textgen import domain_text
from tests.trainer.conftest import ForestFactory
from tests.trainer.test_cli_errors import assert_fails

DOMAINS = ("cooking", "sailing", "finance", "poetry", "weather")
SEQ_LEN = 32


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Seven files of unequal sizes in two folders, so the split by size is not trivial."""
    root = tmp_path / "data"
    for i, domain in enumerate(DOMAINS):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{domain}.txt").write_text(domain_text(domain, 4 + 7 * i, seed=i))
    (root / "a" / "tiny.txt").write_text("one short document")
    (root / "b" / "notes.txt").write_text(domain_text("poetry", 3, seed=9))
    return root


def _store(root: Path, tokenizer: PreTrainedTokenizerFast) -> TokenStore:
    return TokenStore(open_storage(str(root)), tokenizer, tokenizer_fingerprint(tokenizer))


def _files(record: DatasetRecord) -> list[tuple[str, str, int, str, str, int]]:
    return [(f.location, f.key, f.size, f.etag, f.shards, f.tokens) for f in record.files]


def _keys(storage: Storage) -> dict[str, bytes]:
    return {key: storage.read_bytes(key) for key in storage.list_keys("")}


def _content(key: str, data: bytes) -> object:
    """A stored file's bytes; of a commit marker, the files and digests it lists."""
    if key.endswith(f"/{layout.COMMIT_MARKER}"):
        return CommitMarker.model_validate_json(data).files
    return data


def _never(path: Path) -> str:
    raise AssertionError(f"hashed {path} again")


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 8])
def test_slices_are_disjoint_cover_every_file_and_balance_bytes(workers: int) -> None:
    rng = random.Random(workers)
    sizes = [rng.randrange(1, 10_000) for _ in range(23)]
    slices = [slice_files(sizes, workers, index) for index in range(workers)]
    assert sorted(itertools.chain(*slices)) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in slices)  # listing order within a slice
    loads = [sum(sizes[i] for i in s) for s in slices]
    assert max(loads) - min(loads) <= max(sizes)  # the greedy split's bound
    assert slices == [slice_files(sizes, workers, index) for index in range(workers)]


def test_three_slices_combine_into_what_one_worker_writes(
    tmp_path: Path, data: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELMTRAIN_PREPARE_WORKERS", "1")
    locations = [str(data / "b"), str(data / "a")]
    one = _store(tmp_path / "one", tokenizer)
    expected = one.prepare(locations)

    many = _store(tmp_path / "many", tokenizer)
    record_key = layout.dataset_record(many.tokenizer_id, locations)
    # Finished out of order: the last to finish (here slice 1) writes the dataset record.
    assert many.prepare_slice(locations, 3, 2) is None
    assert many.prepare_slice(locations, 3, 0) is None
    assert not many.storage.exists(record_key)  # the operator's "prepared" is still false
    # A slice rerun before the end hashes nothing and changes no stored byte.
    before = _keys(many.storage)
    monkeypatch.setattr("elmtrain.data.store.sha256_file", _never)
    assert many.prepare_slice(locations, 3, 0) is None
    assert _keys(many.storage) == before
    monkeypatch.undo()
    monkeypatch.setenv("ELMTRAIN_PREPARE_WORKERS", "1")
    combined = many.prepare_slice(locations, 3, 1)
    assert combined is not None

    # The same files, shards and token counts, in the same order, as one worker's record ...
    assert _files(combined) == _files(expected)
    assert combined.locations == expected.locations and combined.dtype == expected.dtype
    stored = DatasetRecord.model_validate_json(many.storage.read_bytes(record_key))
    assert _files(stored) == _files(expected)
    # ... the same shard files, byte for byte (content-keyed: the same keys), committed with
    # the same sha256 per file (the markers differ only in their commit time) ...
    shards = {k: _content(k, v) for k, v in _keys(one.storage).items() if "/sets/" not in k}
    assert {k: _content(k, v) for k, v in _keys(many.storage).items() if k in shards} == shards
    # ... and what training reads: the token stream and every window, in order.
    stream_one, stream_many = one.stream(expected), many.stream(combined)
    assert len(stream_many) == len(stream_one) == expected.tokens
    assert stream_many.read(0, len(stream_many)).tolist() == (
        stream_one.read(0, len(stream_one)).tolist()
    )
    windows_one = one.sequences(locations, SEQ_LEN)
    windows_many = many.sequences(locations, SEQ_LEN)
    assert len(windows_many) == len(windows_one) > 10
    assert windows_many[: len(windows_many)].equal(windows_one[: len(windows_one)])

    # Any slice rerun afterwards answers from the dataset record: no hashing, no writes.
    before = _keys(many.storage)
    monkeypatch.setattr("elmtrain.data.store.sha256_file", _never)
    for index in range(3):
        again = many.prepare_slice(locations, 3, index)
        assert again is not None and _files(again) == _files(expected)
    assert _keys(many.storage) == before


def test_more_workers_than_files_leaves_some_slices_empty(
    tmp_path: Path, data: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELMTRAIN_PREPARE_WORKERS", "1")
    locations = [str(data)]
    expected = _store(tmp_path / "one", tokenizer).prepare(locations)
    many = _store(tmp_path / "many", tokenizer)
    workers = len(expected.files) + 2
    results = [many.prepare_slice(locations, workers, index) for index in range(workers)]
    assert results[:-1] == [None] * (workers - 1)
    last = results[-1]
    assert last is not None and _files(last) == _files(expected)


def test_a_file_changed_after_its_slice_is_tokenized_by_the_combining_worker(
    tmp_path: Path, data: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELMTRAIN_PREPARE_WORKERS", "1")
    locations = [str(data)]
    many = _store(tmp_path / "many", tokenizer)
    sizes = [r.size for r in many.prepare(locations).files]  # the listing's sizes, as sliced
    many.storage.delete(layout.dataset_record(many.tokenizer_id, locations))
    first = slice_files(sizes, 2, 0)
    assert many.prepare_slice(locations, 2, 0) is None
    # One of slice 0's files changes (same size, so the split stays the same) before slice 1.
    changed = sorted(p for p in data.rglob("*.txt"))[first[0]]
    text = changed.read_text()
    changed.write_text(text[::-1])
    stat = changed.stat()  # a new entity tag, however coarse the file system's clock
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    combined = many.prepare_slice(locations, 2, 1)
    assert combined is not None
    expected = _store(tmp_path / "one", tokenizer).prepare(locations)
    assert _files(combined) == _files(expected)


def test_the_cli_splits_by_worker_index_or_job_completion_index(
    tokenizer_forest: Path, forest_copy: ForestFactory, corpus: Path
) -> None:
    one, many = forest_copy(tokenizer_forest, "one"), forest_copy(tokenizer_forest, "many")
    data = [str(corpus / d) for d in ("cooking", "sailing", "finance")]
    val = [str(corpus / "poetry")]
    store = Forest.open(str(one)).token_store()
    expected = [store.prepare(data), store.prepare(val)]
    base = ["prepare", "--forest", str(many), "--data", *data, "--val-data", *val]
    assert main([*base, "--workers", "2", "--worker-index", "1"]) == 0
    assert Forest.open(str(many)).prepared(data) is None
    assert Forest.open(str(many)).prepared(val) is None
    # As an Indexed Job's pod 0 runs: its index from the environment.
    elmtrain(*base, "--workers", "2", env={"JOB_COMPLETION_INDEX": "0"})
    combined = [Forest.open(str(many)).prepared(locations) for locations in (data, val)]
    assert [_files(c) if c else None for c in combined] == [_files(e) for e in expected]
    progress = (many / "runs" / "prepare" / "progress.json").read_text()
    assert '"done"' in progress


@pytest.mark.parametrize(
    ("flags", "env", "match"),
    [
        (["--workers", "0"], {}, "--workers must be at least 1"),
        (["--workers", "3", "--worker-index", "3"], {}, "--worker-index 3 is not in 0..2"),
        (["--workers", "3", "--worker-index", "-1"], {}, "--worker-index -1 is not in 0..2"),
        (["--workers", "2"], {}, "--workers 2 needs --worker-index"),
        (["--workers", "2"], {"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX"),
        (["--workers", "2"], {"JOB_COMPLETION_INDEX": "2"}, "(--worker-index) 2 is not in 0..1"),
    ],
)
def test_bad_workers_or_index_is_bad_input(
    tokenizer_forest: Path,
    forest_copy: ForestFactory,
    corpus: Path,
    flags: list[str],
    env: dict[str, str],
    match: str,
) -> None:
    forest = forest_copy(tokenizer_forest, "forest")
    data = str(corpus / "cooking")
    assert_fails(
        ExitCode.BAD_INPUT, match, "prepare", "--forest", str(forest), "--data", data, *flags, **env
    )
