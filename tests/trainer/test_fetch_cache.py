"""The artifact cache shared by the ranks of one pod: one download, never a folder replaced
under a reader (two ranks fetching into a cold cache used to race, and one failed with 65)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from elmcore.manifest import ArtifactEntry
from elmcore.storage import open_storage
from elmcore.storage.commit import commit_dir
from elmcore.storage.local import LocalStorage
from elmtrain.forest import Forest

RANKS = 4


class SlowStorage(LocalStorage):
    """Local storage whose downloads take a while and are counted, so fetches overlap."""

    downloads = 0  # per instance once counted (``self.downloads += 1`` rebinds it there)

    def download_file(self, key: str, path: Path) -> None:
        self.downloads += 1
        time.sleep(0.05)
        super().download_file(key, path)


def test_ranks_fetching_one_artifact_download_it_once_and_all_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELMTRAIN_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tokenizer"
    source.mkdir()
    for name in ("tokenizer.json", "config.json", "special.txt"):
        (source / name).write_text(name * 1000)
    storage = open_storage(str(tmp_path / "forest"))
    entry = ArtifactEntry(path="tokenizer", sha256=commit_dir(storage, source, "tokenizer"))
    slow = SlowStorage(storage.root)

    start, seen, errors = threading.Barrier(RANKS), [], []

    def rank() -> None:
        start.wait()
        try:
            folder = Forest(slow).fetch(entry)
            seen.append({p.name: p.read_text() for p in folder.iterdir()})
        except Exception as error:  # a failed rank is the failure this test looks for
            errors.append(error)

    threads = [threading.Thread(target=rank) for _ in range(RANKS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert slow.downloads == 3  # each file once, by whichever rank came first
    expected = {name: name * 1000 for name in ("tokenizer.json", "config.json", "special.txt")}
    for files in seen:
        assert {k: v for k, v in files.items() if k in expected} == expected
    assert len(seen) == RANKS
