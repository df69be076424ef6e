"""Open the right storage adapter for a location."""

from __future__ import annotations

from elmcore.storage.base import S3Credentials, Storage
from elmcore.uris import StorageURI


def open_storage(
    location: str | StorageURI,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    credentials: S3Credentials | None = None,
) -> Storage:
    """``credentials`` default to boto3's chain (environment, pod identity)."""
    uri = location if isinstance(location, StorageURI) else StorageURI.parse(location)
    if uri.scheme == "file":
        from elmcore.storage.local import LocalStorage

        return LocalStorage(uri)
    # boto3 is imported only when S3 is used, so local mode and pure code never need it.
    from elmcore.storage.s3 import S3Storage

    return S3Storage(uri, endpoint=endpoint, region=region, credentials=credentials)
