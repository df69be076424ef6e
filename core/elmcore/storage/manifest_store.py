"""Read and change the forest manifest by compare-and-swap (If-Match / If-None-Match)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import structlog

from elmcore import layout
from elmcore.errors import ConflictError, TransientError
from elmcore.manifest import Manifest, merge_result
from elmcore.records import Result
from elmcore.storage.base import Storage
from elmcore.storage.commit import verify_committed

log = structlog.get_logger(__name__)


def load_manifest(storage: Storage) -> tuple[Manifest, str | None]:
    """The manifest and its entity tag; an empty manifest (tag None) if none exists yet."""
    found = storage.read_versioned(layout.MANIFEST)
    if found is None:
        return Manifest(), None
    data, etag = found
    return Manifest.model_validate_json(data), etag


def update_manifest(
    storage: Storage, change: Callable[[Manifest], Manifest], attempts: int = 30
) -> Manifest:
    """Apply ``change`` atomically. A change that returns its input unchanged writes nothing,
    which is what makes a repeated merge a no-op."""
    for attempt in range(attempts):
        current, etag = load_manifest(storage)
        updated = change(current)
        if updated is current or updated == current:
            return current
        try:
            storage.write_if(layout.MANIFEST, updated.model_dump_json(indent=1).encode(), etag)
        except ConflictError:
            # Another writer won the race: back off with jitter, re-read, re-apply.
            delay = min(2.0, 0.02 * 2**attempt) * (0.5 + random.random())
            log.info("manifest.conflict", attempt=attempt + 1, retry_in=round(delay, 3))
            time.sleep(delay)
            continue
        log.info("manifest.updated", revision=updated.revision)
        return updated
    raise TransientError(f"manifest update lost {attempts} races in a row; try again later")


def merge_verified(storage: Storage, result: Result) -> Manifest:
    """Verify a run's committed artifact, then merge it into the manifest exactly once."""
    verify_committed(storage, result.path, result.sha256)
    return update_manifest(storage, lambda manifest: merge_result(manifest, result))
