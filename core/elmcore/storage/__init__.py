"""Storage adapters: one small interface, a local-directory and an S3 implementation."""

from elmcore.storage.base import S3Credentials, Storage
from elmcore.storage.factory import open_storage

__all__ = ["S3Credentials", "Storage", "open_storage"]
