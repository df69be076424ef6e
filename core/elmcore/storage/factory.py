"""Open the right storage adapter for a location."""

from __future__ import annotations

from elmcore.storage.base import Storage
from elmcore.uris import StorageURI


def open_storage(
    location: str | StorageURI, *, endpoint: str | None = None, region: str | None = None
) -> Storage:
    uri = location if isinstance(location, StorageURI) else StorageURI.parse(location)
    if uri.scheme == "file":
        from elmcore.storage.local import LocalStorage

        return LocalStorage(uri)
    # boto3 is imported only when S3 is used, so local mode and pure code never need it.
    from elmcore.storage.s3 import S3Storage

    return S3Storage(uri, endpoint=endpoint, region=region)
