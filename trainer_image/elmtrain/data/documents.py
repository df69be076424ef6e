"""Text in, documents out: the locations a run reads, and their documents, streamed.

A location is a file, a folder or an S3 prefix of ``.txt`` (documents separated by two blank
lines), ``.jsonl`` (one ``{"text": ...}`` per line), each optionally gzip-compressed. Files are
read in chunks, so memory stays bounded whatever a file's size.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from elmcore.errors import BadInputError
from elmcore.storage import Storage, open_storage
from elmcore.uris import StorageURI

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
DOC_SEPARATOR = "\n\n\n"  # two blank lines
CHUNK_CHARS = 1 << 22  # characters read at a time from a .txt file


def text_keys(storage: Storage, location: str) -> list[str]:
    """The text files of a location, sorted; ``[""]`` when it is a single file."""
    keys = storage.list_keys("")
    if keys == [""]:  # the location is a single object
        if not location.endswith(TEXT_SUFFIXES):
            raise BadInputError(f"{location}: not a text file ({', '.join(TEXT_SUFFIXES)})")
        return keys
    usable = [k for k in keys if k.endswith(TEXT_SUFFIXES)]
    if not usable:
        raise BadInputError(f"no text files ({', '.join(TEXT_SUFFIXES)}) at {location}")
    return usable


def _text_documents(handle: TextIO) -> Iterator[str]:
    """Documents of a text stream split on DOC_SEPARATOR, chunk by chunk (the same pieces as
    splitting the whole text: the scan restarts where the last separator ended)."""
    rest = ""
    while chunk := handle.read(CHUNK_CHARS):
        parts = (rest + chunk).split(DOC_SEPARATOR)
        rest = parts.pop()
        yield from parts
    yield rest


def file_documents(path: Path, name: str) -> Iterator[str]:
    """The non-blank documents of one file; a file that holds none is bad input (exit 65), as
    is one that is not UTF-8, not gzip, or not JSON lines of ``{"text": ...}``."""
    opener = gzip.open if name.endswith(".gz") else open
    found = False
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if ".jsonl" in name:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise BadInputError(f"{name}:{number}: not JSON ({error.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise BadInputError(f"{name}:{number}: expected {{'text': ...}}")
                    if record["text"].strip():
                        found = True
                        yield record["text"]
            else:
                for doc in _text_documents(handle):
                    if doc.strip():
                        found = True
                        yield doc.strip("\n")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise BadInputError(f"{name}: unreadable text ({error})") from None
    if not found:
        raise BadInputError(f"{name}: no text (the file is empty or holds only blank documents)")


def local_files(locations: Sequence[str], endpoint: str | None) -> Iterator[tuple[str, Path]]:
    """(name, local copy) of every text file, in order; each copy lives until the next one
    (a local file is read where it is)."""
    for location in locations:
        storage = open_storage(location, endpoint=endpoint)
        for key in text_keys(storage, location):
            name = key or StorageURI.parse(location).name
            local = storage.local_path(key)
            if local is not None:
                yield name, local
                continue
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "data"
                storage.download_file(key, copy)
                yield name, copy


def iter_documents(locations: Sequence[str], endpoint: str | None = None) -> Iterator[str]:
    """Every document of every location, in a fixed order (sorted keys)."""
    for name, local in local_files(locations, endpoint):
        yield from file_documents(local, name)
