"""Storage in S3 or an S3-compatible server (MinIO, Ceph, R2), through boto3.

Credentials come from boto3's default chain: environment, shared config, web identity (IRSA) or
EKS pod identity. botocore's "standard" retry mode backs off on throttling and 5xx; what still
fails after that becomes a ``TransientError`` (exit 75), a missing object ``NotFoundError``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from elmcore.errors import (
    BadInputError,
    ConflictError,
    ElmError,
    NotFoundError,
    TransientError,
)
from elmcore.storage.base import ObjectInfo, S3Credentials, Storage
from elmcore.uris import StorageURI, check_key

T = TypeVar("T")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_CONFLICT = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# Multipart above 64 MiB; s3transfer aborts the multipart upload when a part fails for good.
_TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    def __init__(
        self,
        root: StorageURI,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        max_attempts: int | None = None,
        credentials: S3Credentials | None = None,
        client: Any = None,
    ) -> None:
        super().__init__(root)
        endpoint = endpoint or os.environ.get("ELMFOREST_S3_ENDPOINT") or None
        max_attempts = max_attempts or int(os.environ.get("ELMFOREST_S3_MAX_ATTEMPTS", "6"))
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10,
            # A stalled response is retried like an error once this passes.
            read_timeout=float(os.environ.get("ELMFOREST_S3_READ_TIMEOUT", "60")),
            # Path-style addressing works with every S3-compatible server; AWS accepts it too.
            s3={"addressing_style": "path"} if endpoint else {},
        )
        keys = (
            {
                "aws_access_key_id": credentials.access_key_id,
                "aws_secret_access_key": credentials.secret_access_key,
                "aws_session_token": credentials.session_token,
            }
            if credentials
            else {}
        )
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint, region_name=region or None, config=config, **keys
        )

    def _key(self, key: str) -> str:
        key = check_key(key.strip("/"))
        if not key:
            return self.root.prefix
        return f"{self.root.prefix}/{key}" if self.root.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except boto3.exceptions.S3UploadFailedError as error:
            # s3transfer wraps the failed PutObject's ClientError: judge that one instead.
            cause = error.__cause__
            if isinstance(cause, botocore.exceptions.ClientError):
                raise self._client_error(what, key, cause) from cause
            raise TransientError(f"{what} {self.uri(key)} failed: {error}") from error
        except botocore.exceptions.ClientError as error:
            raise self._client_error(what, key, error) from error
        except (
            botocore.exceptions.BotoCoreError,
            ConnectionError,
            TimeoutError,
        ) as error:
            if isinstance(error, botocore.exceptions.NoCredentialsError):
                raise BadInputError(f"{what} {self.uri(key)}: no S3 credentials found") from None
            raise TransientError(f"{what} {self.uri(key)} failed: {error}") from error

    def _client_error(
        self, what: str, key: str, error: botocore.exceptions.ClientError
    ) -> ElmError:
        code = _code(error)
        if code in _NOT_FOUND:
            return NotFoundError(f"{self.uri(key)} does not exist")
        if code in _CONFLICT:
            return ConflictError(f"{what} {self.uri(key)}: precondition failed")
        if code in _DENIED:
            return BadInputError(f"{what} {self.uri(key)}: access denied ({code})")
        return TransientError(f"{what} {self.uri(key)} failed: {code or error}")

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            body = self.client.get_object(Bucket=self.root.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())

        return self._call("read", key, get)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        def get() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.root.bucket, Key=self._key(key))
            return bytes(response["Body"].read()), str(response["ETag"])

        try:
            return self._call("read", key, get)
        except NotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(
            "write",
            key,
            lambda: self.client.put_object(Bucket=self.root.bucket, Key=self._key(key), Body=data),
        )

    def write_if(self, key: str, data: bytes, etag: str | None) -> str:
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        response = self._call(
            "conditional write",
            key,
            lambda: self.client.put_object(
                Bucket=self.root.bucket, Key=self._key(key), Body=data, **condition
            ),
        )
        return str(response["ETag"])

    def upload_file(self, key: str, path: Path) -> None:
        self._call(
            "upload",
            key,
            lambda: self.client.upload_file(
                str(path), self.root.bucket, self._key(key), Config=_TRANSFER
            ),
        )

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._call(
                "download",
                key,
                lambda: self.client.download_file(
                    self.root.bucket, self._key(key), tmp, Config=_TRANSFER
                ),
            )
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _head(self, key: str) -> dict[str, Any]:
        return dict(
            self._call(
                "head",
                key,
                lambda: self.client.head_object(Bucket=self.root.bucket, Key=self._key(key)),
            )
        )

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list_keys(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_info(prefix)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = prefix.strip("/")  # "experts/gamma/" names the folder, like the local adapter
        full = self._key(prefix)
        if full:  # the location may be one object, not a folder
            try:
                head = self._head(prefix)
            except NotFoundError:
                pass
            else:
                return [ObjectInfo(prefix, int(head["ContentLength"]), str(head["ETag"]))]

        def collect() -> list[ObjectInfo]:
            paginator = self.client.get_paginator("list_objects_v2")
            infos: list[ObjectInfo] = []
            listing_prefix = f"{full}/" if full else ""
            strip = len(self.root.prefix) + 1 if self.root.prefix else 0
            for page in paginator.paginate(Bucket=self.root.bucket, Prefix=listing_prefix):
                infos.extend(
                    ObjectInfo(item["Key"][strip:], int(item["Size"]), str(item["ETag"]))
                    for item in page.get("Contents", [])
                )
            return sorted(infos, key=lambda info: info.key)

        return self._call("list", prefix, collect)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        def get() -> bytes:
            response = self.client.get_object(
                Bucket=self.root.bucket,
                Key=self._key(key),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            return bytes(response["Body"].read())

        data = self._call("read", key, get)
        if len(data) != length:
            raise NotFoundError(f"{self.uri(key)}: {offset}+{length} is past its end")
        return data

    def delete(self, key: str) -> None:
        self._call(
            "delete",
            key,
            lambda: self.client.delete_object(Bucket=self.root.bucket, Key=self._key(key)),
        )
