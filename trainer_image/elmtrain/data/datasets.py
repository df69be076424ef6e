"""Dataset records: which text files, of which size and entity tag, made up a list of locations,
and where each file's shards are (``tokens/sets/<key>.json``).

Its own module, apart from the store that writes the records: a rerun of ``elmtrain prepare``
whose records still describe its files finds that out here, with one listing and a few small
reads, and stops before torch, transformers or the tokenizer is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from elmcore import layout
from elmcore.errors import BadInputError
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import read_marker
from elmtrain.data.documents import TEXT_SUFFIXES

log = structlog.get_logger(__name__)


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    location: str
    key: str  # within the location ("" when the location is the file)
    size: int
    etag: str
    shards: str  # the key of its shard folder
    tokens: int


class DatasetRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    locations: list[str]
    tokenizer: str
    dtype: str
    files: list[FileRecord]
    prepared_at: str = ""

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)


Listing = list[tuple[str, Storage, FileRecord]]  # (location, its storage, the file's record)


def list_files(locations: Sequence[str], endpoint: str | None) -> Listing:
    """Every text file of the locations, in order, with its size and entity tag."""
    files = []
    for location in locations:
        source = open_storage(location, endpoint=endpoint)
        infos = source.list_info("")
        if len(infos) == 1 and infos[0].key == "":
            if not location.endswith(TEXT_SUFFIXES):
                raise BadInputError(f"{location}: not a text file ({', '.join(TEXT_SUFFIXES)})")
        else:
            infos = [i for i in infos if i.key.endswith(TEXT_SUFFIXES)]
            if not infos:
                raise BadInputError(f"no text files ({', '.join(TEXT_SUFFIXES)}) at {location}")
        for info in infos:
            record = FileRecord(
                location=location, key=info.key, size=info.size, etag=info.etag, shards="", tokens=0
            )
            files.append((location, source, record))
    return files


def recorded_dataset(storage: Storage, key: str, files: list[FileRecord]) -> DatasetRecord | None:
    """The record at ``key`` if it describes exactly these files and its shards are there."""
    found = storage.read_versioned(key)
    if found is None:
        return None
    try:
        record = DatasetRecord.model_validate_json(found[0])
    except ValidationError:
        return None
    same = [(f.location, f.key, f.size, f.etag) for f in record.files] == [
        (f.location, f.key, f.size, f.etag) for f in files
    ]
    if not same:
        log.warning("tokens.data_changed", record=key)
        return None
    if any(read_marker(storage, f.shards) is None for f in record.files):
        return None
    return record


def prepared_dataset(
    storage: Storage, tokenizer_id: str, locations: Sequence[str], endpoint: str | None
) -> DatasetRecord | None:
    """The locations' record, if they were prepared for this tokenizer and have not changed."""
    listing = list_files(locations, endpoint)
    key = layout.dataset_record(tokenizer_id, locations)
    return recorded_dataset(storage, key, [record for _, _, record in listing])
