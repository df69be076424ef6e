"""Storage in a local directory (``file://``): atomic renames, CAS under a file lock."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from elmcore.errors import ConflictError, NotFoundError
from elmcore.storage.base import ObjectInfo, Storage, sha256_bytes
from elmcore.uris import StorageURI, check_key


def _atomic_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStorage(Storage):
    def __init__(self, root: StorageURI) -> None:
        super().__init__(root)
        self.base = Path("/" + root.prefix)

    def _path(self, key: str) -> Path:
        key = check_key(key.strip("/"))
        return self.base / key if key else self.base

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"{self.uri(key)} does not exist") from None

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return data, sha256_bytes(data)

    def write_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), data)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.with_name(f".{path.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write_if(self, key: str, data: bytes, etag: str | None) -> str:
        path = self._path(key)
        with self._locked(path):
            current = self.read_versioned(key)
            current_tag = None if current is None else current[1]
            if current_tag != etag:
                raise ConflictError(f"{self.uri(key)} changed (expected {etag}, is {current_tag})")
            _atomic_write(path, data)
        return sha256_bytes(data)

    def upload_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            Path(tmp).replace(target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFoundError(f"{self.uri(key)} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        shutil.copyfile(source, tmp)
        tmp.replace(path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"{self.uri(key)} does not exist")
        return path.stat().st_size

    def list_keys(self, prefix: str = "") -> list[str]:
        top = self._path(prefix)
        if top.is_file():
            return [prefix.strip("/")]
        if not top.is_dir():
            return []
        keys = []
        for path in top.rglob("*"):
            name = path.name
            # Temporary and lock files are our own write machinery, never content.
            if path.is_file() and not (
                name.startswith(".") and name.endswith((".tmp", ".lock", ".part"))
            ):
                keys.append(path.relative_to(self.base).as_posix())
        return sorted(keys)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as handle:
                data = os.pread(handle.fileno(), length, offset)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"{self.uri(key)} does not exist") from None
        if len(data) != length:
            raise NotFoundError(f"{self.uri(key)}: {offset}+{length} is past its end")
        return data

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        infos = []
        for key in self.list_keys(prefix):
            stat = self._path(key).stat()
            infos.append(ObjectInfo(key, stat.st_size, f"{stat.st_size}-{stat.st_mtime_ns}"))
        return infos

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Folders are implicit in object storage; drop the ones this delete left empty.
        for parent in path.parents:
            if parent == self.base or not parent.is_relative_to(self.base):
                break
            try:
                parent.rmdir()
            except OSError:
                break
