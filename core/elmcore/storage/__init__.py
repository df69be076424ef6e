"""Storage adapters: one small interface, a local-directory and an S3 implementation."""

from elmcore.storage.base import Storage
from elmcore.storage.factory import open_storage

__all__ = ["Storage", "open_storage"]
