"""Text locations as token shards in a forest's storage: prepared once, read by every run.

``prepare`` lists the locations, and for each text file whose content (sha256) has no shards
under this tokenizer yet, tokenizes it on every core and commits its shards (a marker written
last, as for every artifact). A dataset record (``tokens/sets/<key>.json``) remembers which
files, of which size and entity tag, made up the locations; a later run whose listing matches
it reads the shards without hashing a byte of text (``elmtrain.data.datasets``).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from elmcore import layout
from elmcore.errors import BadInputError, IntegrityError, NotFoundError
from elmcore.records import FileDigest, SourceFile, utc_now
from elmcore.storage import Storage, open_storage
from elmcore.storage.base import sha256_bytes, sha256_file
from elmcore.storage.commit import commit_dir, read_marker
from elmcore.uris import StorageURI
from elmtrain.cache import cache_dir
from elmtrain.data.datasets import (
    DatasetRecord,
    FileRecord,
    Listing,
    list_files,
    recorded_dataset,
)
from elmtrain.data.documents import file_documents
from elmtrain.data.encode import encode_documents
from elmtrain.data.shards import (
    INDEX,
    ShardFile,
    ShardIndex,
    ShardWriter,
    TokenSequences,
    TokenStream,
    checksums_name,
    shard_name,
    token_dtype,
)

if TYPE_CHECKING:  # the store is handed a loaded tokenizer; it never imports transformers
    import torch
    from transformers import PreTrainedTokenizerFast

log = structlog.get_logger(__name__)
Progress = Callable[[int, int], None]  # (source bytes done, source bytes in all)


def workers() -> int:
    """Tokenizer processes: the cores this process may use (``ELMTRAIN_PREPARE_WORKERS``)."""
    chosen = os.environ.get("ELMTRAIN_PREPARE_WORKERS")
    return int(chosen) if chosen else max(1, len(os.sched_getaffinity(0)))


def slice_files(sizes: Sequence[int], workers: int, index: int) -> list[int]:
    """The positions (in listing order) of the files that worker ``index`` of ``workers``
    tokenizes: largest file first, each to the worker with the fewest bytes so far (ties: the
    lowest index). A pure function of the listing, so every worker computes the same split:
    slices are disjoint, cover every file and hold about equal bytes. A file is never split."""
    loads = [(0, worker) for worker in range(workers)]
    owner = [0] * len(sizes)
    for position in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, worker = heapq.heappop(loads)
        owner[position] = worker
        heapq.heappush(loads, (load + sizes[position], worker))
    return [position for position, worker in enumerate(owner) if worker == index]


class TokenStore:
    """Shards and dataset records in ``storage`` (a forest's, or this machine's cache)."""

    def __init__(
        self,
        storage: Storage,
        tokenizer: PreTrainedTokenizerFast,
        tokenizer_id: str,
        endpoint: str | None = None,
    ) -> None:
        self.storage, self.tokenizer, self.tokenizer_id = storage, tokenizer, tokenizer_id
        self.endpoint = endpoint
        self.dtype = token_dtype(len(tokenizer))
        # Shard indexes are content-addressed (they never change): read once per store,
        # though streaming and lineage both ask.
        self._indexes: dict[str, ShardIndex] = {}
        self._files: dict[str, dict[str, FileDigest]] = {}  # each folder's marker: name -> digest

    def prepare(self, locations: Sequence[str], progress: Progress | None = None) -> DatasetRecord:
        """The locations' shards, made where missing; the dataset record written."""
        key = layout.dataset_record(self.tokenizer_id, locations)
        listing = list_files(locations, self.endpoint)
        recorded = recorded_dataset(self.storage, key, [r for _, _, r in listing])
        if recorded is not None:
            return recorded
        return self._record(key, locations, self._tokenize(listing, progress))

    def prepare_slice(
        self,
        locations: Sequence[str],
        workers: int,
        index: int,
        progress: Progress | None = None,
    ) -> DatasetRecord | None:
        """Slice ``index`` of ``workers`` (``slice_files``): its files' shards, made where
        missing, and its slice record (``tokens/slices/<key>/<workers>-<index>.json``); then
        the dataset record, written as ``prepare`` writes it by whichever worker finds every
        slice recorded (the last to finish). None while other slices are still to finish.

        A rerun of a recorded slice whose files are unchanged hashes nothing."""
        key = layout.dataset_record(self.tokenizer_id, locations)
        listing = list_files(locations, self.endpoint)
        recorded = recorded_dataset(self.storage, key, [r for _, _, r in listing])
        if recorded is not None:
            return recorded
        mine = [listing[i] for i in slice_files([r.size for _, _, r in listing], workers, index)]
        part = layout.dataset_slice(self.tokenizer_id, locations, workers, index)
        if recorded_dataset(self.storage, part, [r for _, _, r in mine]) is None:
            files = self._tokenize(mine, progress)
            record = self._dataset(locations, files)
            self.storage.write_bytes(part, record.model_dump_json().encode())
            log.info("tokens.slice", slice=index, workers=workers, files=len(files), record=part)
        return self._combine(key, locations, workers, listing)

    def _combine(
        self, key: str, locations: Sequence[str], workers: int, listing: Listing
    ) -> DatasetRecord | None:
        """The dataset record from every slice's record, in the listing's order; None while a
        slice is unrecorded. A file that no slice record describes as listed now (changed since
        its slice read it) is tokenized here, so the record always matches the listing."""
        found: dict[tuple[str, str, int, str], FileRecord] = {}
        for index in range(workers):
            raw = self.storage.read_versioned(
                layout.dataset_slice(self.tokenizer_id, locations, workers, index)
            )
            if raw is None:
                return None
            try:
                part = DatasetRecord.model_validate_json(raw[0])
            except ValidationError:
                return None  # being rewritten by its worker's retry, which combines after
            found.update({(f.location, f.key, f.size, f.etag): f for f in part.files})
        files = []
        for entry in listing:
            record = entry[2]
            done = found.get((record.location, record.key, record.size, record.etag))
            if done is None or read_marker(self.storage, done.shards) is None:
                done = self._tokenize([entry], None)[0]
            files.append(done)
        return self._record(key, locations, files)

    def _dataset(self, locations: Sequence[str], files: list[FileRecord]) -> DatasetRecord:
        return DatasetRecord(
            locations=list(locations),
            tokenizer=self.tokenizer_id,
            dtype=self.dtype,
            files=files,
            prepared_at=utc_now(),
        )

    def _record(self, key: str, locations: Sequence[str], files: list[FileRecord]) -> DatasetRecord:
        dataset = self._dataset(locations, files)
        self.storage.write_bytes(key, dataset.model_dump_json(indent=1).encode())
        log.info("tokens.prepared", files=len(files), tokens=dataset.tokens, record=key)
        return dataset

    def _tokenize(self, listing: Listing, progress: Progress | None) -> list[FileRecord]:
        """Each listed file's record with its shards (tokenized and committed where new)."""
        total = sum(r.size for _, _, r in listing) or 1
        done = 0
        files = []
        for location, source, record in listing:
            name = record.key or StorageURI.parse(location).name

            def report(part: int, done: int = done) -> None:
                if progress is not None:
                    progress(done + part, total)

            shards, tokens = self._shards(source, record.key, name, report)
            files.append(record.model_copy(update={"shards": shards, "tokens": tokens}))
            done += record.size
            report(0, done)
        return files

    def _shards(
        self, source: Storage, key: str, name: str, report: Callable[[int], None]
    ) -> tuple[str, int]:
        """The file's shard folder (tokenized and committed if new) and its token count."""
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            local = source.local_path(key)
            if local is None:
                local = Path(tmp) / "source"
                source.download_file(key, local)
            sha = sha256_file(local)
            shards = layout.token_shards(self.tokenizer_id, sha)
            if read_marker(self.storage, shards) is not None:
                index = self._index(shards)
                return shards, index.tokens
            folder = Path(tmp) / "shards"
            folder.mkdir()
            writer = ShardWriter(folder, self.dtype)
            documents, read = 0, 0

            def counted() -> object:
                nonlocal documents
                for doc in file_documents(local, name):
                    documents += 1
                    yield doc

            for tokens, chars in encode_documents(
                counted(),  # type: ignore[arg-type]
                self.tokenizer.backend_tokenizer.to_str(),
                int(self.tokenizer.eos_token_id),
                self.dtype,
                workers(),
            ):
                writer.write(tokens)
                read += chars
                report(min(read, local.stat().st_size))
            index = ShardIndex(
                source=name,
                source_sha256=sha,
                source_bytes=local.stat().st_size,
                documents=documents,
                dtype=self.dtype,
                shards=writer.close(),
            )
            (folder / INDEX).write_text(index.model_dump_json(indent=1))
            commit_dir(self.storage, folder, shards)
            log.info("tokens.file", file=name, tokens=index.tokens, shards=len(index.shards))
            return shards, index.tokens

    def _index(self, shards: str) -> ShardIndex:
        """The folder's index, checked against its commit marker (kept for the checksums)."""
        if shards not in self._indexes:
            found = read_marker(self.storage, shards)
            if found is None:
                raise BadInputError(f"{shards}: not committed (no marker); prepare it again")
            try:
                raw = self.storage.read_bytes(f"{shards}/{INDEX}")
                index = ShardIndex.model_validate_json(raw)
            except (NotFoundError, ValidationError) as error:
                raise BadInputError(f"{shards}: unreadable shard index ({error})") from None
            listed = found[0].files.get(INDEX)
            if listed is not None and sha256_bytes(raw) != listed.sha256:
                raise IntegrityError(f"{shards}/{INDEX}: does not match its commit marker")
            self._indexes[shards], self._files[shards] = index, found[0].files
        return self._indexes[shards]

    def _shard_files(self, shards: str) -> list[ShardFile]:
        """The folder's shard files, each with its chunk checksums where it has them."""
        index, committed = self._index(shards), self._files[shards]
        files = []
        for number, count in enumerate(index.shards):
            checksums = committed.get(checksums_name(number))
            files.append(
                ShardFile(
                    f"{shards}/{shard_name(number)}",
                    count,
                    None if checksums is None else f"{shards}/{checksums_name(number)}",
                    None if checksums is None else checksums.sha256,
                )
            )
        if index.shards and checksums_name(0) not in committed:
            # Shards prepared before chunk checksums (before issue 27): still read, not checked.
            log.warning("tokens.unchecked", shards=shards, reason="made before chunk checksums")
        return [f for f in files if f.tokens]

    def sources(self, locations: Sequence[str]) -> list[SourceFile]:
        """Each text file of the locations with the sha256 of the content tokenized (lineage)."""
        return [
            SourceFile(
                location=f.location,
                key=f.key,
                size=f.size,
                sha256=self._index(f.shards).source_sha256,
            )
            for f in self.prepare(locations).files
        ]

    def stream(self, dataset: DatasetRecord) -> TokenStream:
        files = []
        for record in dataset.files:
            files += self._shard_files(record.shards)
        return TokenStream(self.storage, files, dataset.dtype)

    def sequences(self, locations: Sequence[str], seq_len: int) -> TokenSequences:
        """The locations' windows of ``seq_len`` tokens, prepared first where needed."""
        dataset = self.prepare(locations)
        return TokenSequences(self.stream(dataset), seq_len, ", ".join(locations))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cache_store(tokenizer: PreTrainedTokenizerFast, endpoint: str | None = None) -> TokenStore:
    """Shards in this machine's cache, for text read without a forest (benchmarks, tests)."""
    storage = open_storage(str(cache_dir() / "tokens"))
    return TokenStore(storage, tokenizer, tokenizer_fingerprint(tokenizer), endpoint)


def load_sequences(
    locations: Sequence[str], store: TokenStore, seq_len: int, limit: int | None = None
) -> torch.Tensor:
    """The first ``limit`` (all, if None) windows of the locations, read into memory: for
    evaluation sets; training reads ``store.sequences`` lazily."""
    sequences = store.sequences(locations, seq_len)
    return sequences[: len(sequences) if limit is None else limit]
