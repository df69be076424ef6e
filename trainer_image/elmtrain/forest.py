"""A forest as the trainer sees it: its storage, its manifest and local copies of artifacts."""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from elmcore import layout
from elmcore.errors import BadInputError, NotFoundError
from elmcore.manifest import ArtifactEntry, Manifest
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import fetch_committed
from elmcore.storage.manifest_store import load_manifest
from elmtrain.cache import cache_dir
from elmtrain.data.datasets import DatasetRecord, prepared_dataset

if TYPE_CHECKING:  # transformers and torch: imported only when a tokenizer or store is opened
    from transformers import PreTrainedTokenizerFast

    from elmtrain.data.store import TokenStore


@dataclass
class Forest:
    storage: Storage
    endpoint: str | None = None

    @classmethod
    def open(cls, location: str, endpoint: str | None = None, region: str | None = None) -> Forest:
        return cls(open_storage(location, endpoint=endpoint, region=region), endpoint)

    def manifest(self) -> Manifest:
        return load_manifest(self.storage)[0]

    def fetch(self, entry: ArtifactEntry) -> Path:
        """A verified local copy of a committed artifact, cached by its marker's sha256."""
        target = cache_dir() / "artifacts" / entry.sha256
        if (target / layout.COMMIT_MARKER).is_file():
            return target
        # The ranks of one pod share the cache. One downloads while the others wait and then
        # reuse its copy: a second download would replace the folder under a rank reading it.
        target.parent.mkdir(parents=True, exist_ok=True)
        with (target.parent / f".{entry.sha256}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (target / layout.COMMIT_MARKER).is_file():
                fetch_committed(self.storage, entry.path, target, entry.sha256)
        return target

    def _tokenizer_entry(self) -> ArtifactEntry:
        entry = self.manifest().tokenizer
        if entry is None:
            raise BadInputError(f"forest {self.storage.root} has no tokenizer yet")
        return entry

    def tokenizer_dir(self) -> Path:
        return self.fetch(self._tokenizer_entry())

    def tokenizer(self) -> PreTrainedTokenizerFast:
        from elmtrain.model.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir())

    def token_store(self) -> TokenStore:
        """Token shards of text read with this forest's tokenizer, in the forest's storage
        (``tokens/``), keyed by the tokenizer's commit sha256 (what the operator sees)."""
        from elmtrain.data.store import TokenStore

        entry = self._tokenizer_entry()
        return TokenStore(self.storage, self.tokenizer(), entry.sha256, self.endpoint)

    def prepared(self, locations: Sequence[str]) -> DatasetRecord | None:
        """The record of the locations' token shards if they are prepared and unchanged: one
        listing and a few small reads, without loading the tokenizer (``token_store`` does)."""
        tokenizer_id = self._tokenizer_entry().sha256
        return prepared_dataset(self.storage, tokenizer_id, locations, self.endpoint)

    def seed_dir(self) -> Path:
        entry = self.manifest().seed
        if entry is None:
            raise BadInputError(f"forest {self.storage.root} has no seed model yet")
        return self.fetch(entry)

    def model_dir(self, ref: str) -> Path:
        """``seed``, ``expert:<domain>``, or the location of any HF model folder."""
        if ref == "seed":
            return self.seed_dir()
        if ref.startswith("expert:"):
            return self.fetch(self.manifest().expert(ref.removeprefix("expert:")))
        return download_folder(ref, self.endpoint, "config.json")


def download_folder(location: str, endpoint: str | None, required: str) -> Path:
    """Copy an HF folder that was not written by us (pretrained weights, a tokenizer)."""
    storage = open_storage(location, endpoint=endpoint)
    keys = [k for k in storage.list_keys("") if "/" not in k]
    if required not in keys:
        raise NotFoundError(f"{location} holds no {required}: not a Hugging Face folder")
    target = Path(tempfile.mkdtemp(prefix="elmtrain-download-", dir=cache_dir()))
    try:
        for key in keys:
            storage.download_file(key, target / key)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target
