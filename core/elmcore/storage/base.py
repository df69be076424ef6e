"""The storage interface both the trainer and the operator program against.

Keys are relative to the storage's root location and are checked by ``elmcore.uris.check_key``;
the empty key names the root itself (a location may be a single object, e.g. a data file).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from elmcore.uris import StorageURI, check_key


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says of an object: enough to tell that it changed."""

    key: str
    size: int
    etag: str  # S3's ETag; locally, size and modification time


@dataclass(frozen=True, repr=False)
class S3Credentials:
    """Static S3 keys (from a Secret); repr hides them so logs never carry a key."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return "S3Credentials(***)"


class Storage(ABC):
    """Blob storage below one root location."""

    def __init__(self, root: StorageURI) -> None:
        self.root = root

    def uri(self, key: str = "") -> StorageURI:
        return self.root.join(check_key(key))

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; raises ``NotFoundError`` when it does not exist."""

    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its entity tag, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old bytes or the new, never a mix."""

    @abstractmethod
    def write_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Compare-and-swap: write only if the current entity tag is ``etag`` (None: only if
        absent). Returns the new tag; raises ``ConflictError`` when the condition fails."""

    @abstractmethod
    def upload_file(self, key: str, path: Path) -> None:
        """Upload a local file (multipart for large ones; a failed upload leaves nothing)."""

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None:
        """Download to ``path`` (written to a temporary name and renamed into place)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises ``NotFoundError`` when it does not exist."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every object key below ``prefix`` (recursively), sorted, relative to the root."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (a ranged GET on S3)."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Like ``list_keys``, with each object's size and entity tag (one listing on S3)."""

    def local_path(self, key: str) -> Path | None:
        """The object as a file on this machine, where it is one (local storage)."""
        return None

    def list_children(self, prefix: str) -> list[str]:
        """Names of the immediate children (objects or folders) below ``prefix``."""
        start = len(prefix.strip("/")) + 1 if prefix.strip("/") else 0
        names = {key[start:].split("/", 1)[0] for key in self.list_keys(prefix)}
        return sorted(n for n in names if n)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)
