"""Token shards read by byte range are checked against their chunks' sha256 (issue 27.3,
docs/reliability.md): a flipped byte, a short object or a tampered checksum list fails the read
with the file named (exit 65: bad input, never retried), and never becomes training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs
from transformers import PreTrainedTokenizerFast

from elmcore.errors import BadInputError, ExitCode, IntegrityError
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import commit_dir, read_marker
from elmtrain.data import TokenStore, tokenizer_fingerprint
from elmtrain.data.shards import (
    ShardFile,
    ShardWriter,
    TokenSequences,
    TokenStream,
    checksums_name,
    shard_name,
)
from tests.textgen import domain_text

TOKENS = np.arange(1000, dtype=np.uint16)
WINDOW = 48  # 96 bytes: windows cross the 64-byte chunks and the 256-byte shard files


def committed_shards(storage: Storage, stage: Path) -> list[ShardFile]:
    """TOKENS in shard files of 128 tokens, chunks of 64 bytes, committed under ``x``."""
    stage.mkdir()
    writer = ShardWriter(stage, "uint16", cap=128, chunk_bytes=64)
    writer.write(TOKENS)
    counts = writer.close()
    commit_dir(storage, stage, "x")
    found = read_marker(storage, "x")
    assert found is not None
    listed = found[0].files
    return [
        ShardFile(
            f"x/{shard_name(i)}", count, f"x/{checksums_name(i)}", listed[checksums_name(i)].sha256
        )
        for i, count in enumerate(counts)
    ]


def windows(storage: Storage, files: list[ShardFile]) -> TokenSequences:
    return TokenSequences(TokenStream(storage, files, "uint16"), WINDOW, "x")


def flip_byte(storage: Storage, key: str, at: int) -> None:
    data = bytearray(storage.read_bytes(key))
    data[at] ^= 0x01
    storage.write_bytes(key, bytes(data))


def check_reads_and_corruption(storage: Storage, files: list[ShardFile]) -> None:
    packed = torch.from_numpy(TOKENS[: 1000 // WINDOW * WINDOW].astype(np.int64)).view(-1, WINDOW)
    assert torch.equal(windows(storage, files)[:], packed)
    assert torch.equal(windows(storage, files)[[19, 2, 2, 7]], packed[[19, 2, 2, 7]])

    # One bit of shard 2's second chunk (its tokens 32..63, stream tokens 288..319).
    flip_byte(storage, "x/tokens-00002.bin", 70)
    damaged = windows(storage, files)
    assert torch.equal(damaged[0], packed[0])  # other chunks still read, and still right
    assert torch.equal(damaged[7], packed[7])  # tokens 336..383: shard 2's third chunk on
    with pytest.raises(IntegrityError, match=r"x/tokens-00002\.bin: bytes 64\.\.128 do not match"):
        damaged[6]  # tokens 288..335
    flip_byte(storage, "x/tokens-00002.bin", 70)  # repaired

    # A short object (an upload cut off), and a checksum list that is not the committed one.
    storage.write_bytes("x/tokens-00003.bin", storage.read_bytes("x/tokens-00003.bin")[:200])
    short = r"x/tokens-00003\.bin: (8 bytes at 192, not 64|192\+64 is past its end)"
    with pytest.raises(IntegrityError, match=short):
        windows(storage, files)[10]  # tokens 480..527: shard 3's last chunk, then shard 4
    flip_byte(storage, "x/tokens-00004.sha256", 30)
    with pytest.raises(IntegrityError, match=r"x/tokens-00004\.sha256: does not match its commit"):
        windows(storage, files)[11]
    assert issubclass(IntegrityError, BadInputError)
    assert IntegrityError("").exit_code == ExitCode.BAD_INPUT  # 65: the Job does not retry it


def test_local_windows_are_checked_chunk_by_chunk(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "s"))
    files = committed_shards(storage, tmp_path / "stage")
    assert windows(storage, files).stream.local  # pread, not a ranged read
    check_reads_and_corruption(storage, files)


def test_s3_ranged_reads_are_checked_chunk_by_chunk(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    storage = open_storage(f"s3://{s3_bucket}/tokens", endpoint=s3_endpoint)
    files = committed_shards(storage, tmp_path / "stage")
    assert not windows(storage, files).stream.local
    check_reads_and_corruption(storage, files)


def test_prepared_shards_carry_checksums_and_older_ones_still_read(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    forest = open_storage(str(tmp_path / "forest"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(domain_text("cooking", 40))
    record = TokenStore(forest, tokenizer, tokenizer_fingerprint(tokenizer)).prepare([str(data)])
    folder = record.files[0].shards
    expected = TokenStore(forest, tokenizer, "x").stream(record).read(0, record.tokens)
    fresh = TokenStore(forest, tokenizer, "x").stream(record)
    assert fresh.files and all(f.checksums is not None for f in fresh.files)

    flip_byte(forest, f"{folder}/{shard_name(0)}", 11)
    stream = TokenStore(forest, tokenizer, "x").stream(record)
    with pytest.raises(IntegrityError, match=rf"{folder}/tokens-00000\.bin: bytes 0\.\."):
        stream.read(0, 8)
    flip_byte(forest, f"{folder}/{shard_name(0)}", 11)

    # Shards committed before chunk checksums existed: read as before, with a warning.
    stage = tmp_path / "legacy"
    stage.mkdir()
    for name in (shard_name(0), "index.json"):
        (stage / name).write_bytes(forest.read_bytes(f"{folder}/{name}"))
    commit_dir(forest, stage, folder)
    forest.delete(f"{folder}/{checksums_name(0)}")
    with capture_logs() as logs:
        legacy = TokenStore(forest, tokenizer, "x").stream(record)
    assert [f.checksums for f in legacy.files] == [None]
    assert np.array_equal(legacy.read(0, record.tokens), expected)
    assert [e["event"] for e in logs] == ["tokens.unchecked"]
