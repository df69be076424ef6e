"""Both storage adapters: atomic writes, compare-and-swap, commit markers, verification.

S3 runs against moto's real server on loopback, so the wire protocol is exercised.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from elmcore.errors import ConflictError, IntegrityError, NotFoundError
from elmcore.manifest import merge_result
from elmcore.records import Result
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import commit_dir, committed_steps, fetch_committed, verify_committed
from elmcore.storage.manifest_store import load_manifest, update_manifest


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "forest"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/forest", endpoint=endpoint)


def test_read_write_list_delete(storage: Storage) -> None:
    storage.write_bytes("a/b.txt", b"hello")
    storage.write_bytes("a/c/d.txt", b"x")
    assert storage.read_bytes("a/b.txt") == b"hello"
    assert storage.list_keys("a") == ["a/b.txt", "a/c/d.txt"]
    assert storage.list_children("a") == ["b.txt", "c"]
    assert storage.size("a/b.txt") == 5
    assert storage.list_keys("a/") == storage.list_keys("a")  # a folder, with or without "/"
    storage.write_bytes("ab.txt", b"not below a/")
    assert storage.delete_prefix("a/") == 2
    assert storage.list_keys("") == ["ab.txt"]
    with pytest.raises(NotFoundError):
        storage.read_bytes("a/b.txt")


def test_compare_and_swap(storage: Storage) -> None:
    tag = storage.write_if("m.json", b"1", None)
    with pytest.raises(ConflictError):
        storage.write_if("m.json", b"2", None)  # If-None-Match: exists already
    new_tag = storage.write_if("m.json", b"2", tag)
    with pytest.raises(ConflictError):
        storage.write_if("m.json", b"3", tag)  # If-Match on a stale tag
    assert storage.read_versioned("m.json") == (b"2", new_tag)


def test_commit_marker_guards_reads(storage: Storage, tmp_path: Path) -> None:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "config.json").write_text("{}")
    sha = commit_dir(storage, folder, "runs/r/checkpoints/step-00000005", step=5)
    # A folder with files but no marker (a write cut short) is invisible.
    storage.write_bytes("runs/r/checkpoints/step-00000009/model.safetensors", b"half")
    assert committed_steps(storage, "runs/r/checkpoints") == [5]
    verify_committed(storage, "runs/r/checkpoints/step-00000005", sha)
    with pytest.raises(IntegrityError, match="not committed"):
        fetch_committed(storage, "runs/r/checkpoints/step-00000009", tmp_path / "x")
    # Tampered bytes of the same size are caught by the checksum.
    storage.write_bytes("runs/r/checkpoints/step-00000005/model.safetensors", b"v" * 1000)
    with pytest.raises(IntegrityError, match="sha256"):
        fetch_committed(storage, "runs/r/checkpoints/step-00000005", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_concurrent_merges_lose_nothing(storage: Storage) -> None:
    domains = [f"d{i}" for i in range(8)]

    def merge(domain: str) -> None:
        result = Result(
            run_id=f"branch.{domain}.v1",
            kind="expert",
            path=f"experts/{domain}/v1",
            sha256="a" * 64,
            domain=domain,
            version=1,
        )
        update_manifest(storage, lambda m: merge_result(m, result))

    threads = [threading.Thread(target=merge, args=(d,)) for d in domains * 2]  # each twice
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    manifest, _ = load_manifest(storage)
    assert sorted(manifest.experts) == domains
    assert manifest.revision == len(domains)  # the duplicate merges changed nothing
