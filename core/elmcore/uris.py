"""Storage locations: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path.

Keys below a location are joined only through :meth:`StorageURI.join`, which refuses anything
that could climb out of the prefix.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from elmcore.errors import BadInputError

Scheme = Literal["s3", "file"]
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")


def check_key(key: str) -> str:
    """Validate a relative key: plain segments only, no '..', no empty parts, no escapes."""
    if not key:
        return key
    if len(key) > 900:
        raise BadInputError(f"storage key is too long ({len(key)} characters)")
    for segment in key.split("/"):
        if segment in {"", ".", ".."} or not _SEGMENT_RE.fullmatch(segment):
            raise BadInputError(f"unsafe storage key {key[:120]!r} (segment {segment[:40]!r})")
    return key


class StorageURI(BaseModel):
    """A parsed storage location. ``prefix`` never starts or ends with '/'."""

    model_config = ConfigDict(frozen=True)

    scheme: Scheme
    bucket: str = ""  # s3 only
    prefix: str = ""  # s3: key prefix; file: absolute path without the leading '/'

    @classmethod
    def parse(cls, text: str) -> StorageURI:
        if not text or any(ord(c) < 32 for c in text):
            raise BadInputError(f"invalid storage location {text!r}")
        if "://" not in text:
            path = PurePosixPath(text)
            if not path.is_absolute():
                from pathlib import Path

                path = PurePosixPath(Path(text).absolute().as_posix())
            return cls._file(str(path))
        parts = urlsplit(text)
        if parts.query or parts.fragment:
            raise BadInputError(f"storage location {text!r} must not carry '?' or '#'")
        if parts.scheme == "file":
            if parts.netloc not in {"", "localhost"}:
                raise BadInputError(f"file URI {text!r} must be file:///absolute/path")
            return cls._file(unquote(parts.path))
        if parts.scheme == "s3":
            bucket = parts.netloc
            if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
                raise BadInputError(f"invalid S3 bucket name {bucket!r} in {text!r}")
            prefix = parts.path.strip("/")
            if "%" in prefix:
                raise BadInputError(f"S3 prefix in {text!r} must not be percent-encoded")
            check_key(prefix)
            return cls(scheme="s3", bucket=bucket, prefix=prefix)
        raise BadInputError(f"unsupported storage scheme in {text!r} (use s3:// or file://)")

    @classmethod
    def _file(cls, path: str) -> StorageURI:
        if not path.startswith("/"):
            raise BadInputError(f"file path {path!r} must be absolute")
        parts = [p for p in path.split("/") if p]
        if any(p in {".", ".."} for p in parts):
            raise BadInputError(f"file path {path!r} must not contain '.' or '..' segments")
        return cls(scheme="file", prefix="/".join(parts))

    def join(self, key: str) -> StorageURI:
        """The location of ``key`` below this one (``key`` is checked, never trusted)."""
        check_key(key.strip("/") if key else "")
        key = key.strip("/")
        if not key:
            return self
        prefix = f"{self.prefix}/{key}" if self.prefix else key
        return StorageURI(scheme=self.scheme, bucket=self.bucket, prefix=prefix)

    def relative_to(self, root: StorageURI) -> str:
        """The key of this location below ``root``; raises if it is not below it."""
        if (self.scheme, self.bucket) != (root.scheme, root.bucket):
            raise BadInputError(f"{self} is not below {root}")
        if not root.prefix:
            return self.prefix
        if self.prefix == root.prefix:
            return ""
        if not self.prefix.startswith(root.prefix + "/"):
            raise BadInputError(f"{self} is not below {root}")
        return self.prefix[len(root.prefix) + 1 :]

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"file:///{self.prefix}"
