"""Reads shared by one pass over many branches (a worker batch, a local step).

One manifest read and one listing of used versions per forest storage, and one look at each
forest's branches, for the whole pass. A pass is formed after the changes that dirtied its
branches, so what it reads is as fresh as a read per branch would be; merges do not use it
(they read, verify and swap the manifest themselves). Thread-safe: the operator observes a
batch's branches concurrently in I/O threads, and the first thread to need a read does it
while the others wait for its answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar

from elmcore.manifest import Manifest
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.planner.siblings import ForestBranches, Sibling

T = TypeVar("T")


class PassReads:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: dict[Hashable, Future[Any]] = {}

    def manifest(self, storage: ForestStorage) -> Manifest | None:
        return self._once(("manifest", storage), lambda: storage.view().manifest)

    def used_versions(self, storage: ForestStorage) -> dict[str, int]:
        return self._once(("used", storage), storage.used_versions)

    def branches(self, forest: Hashable, read: Callable[[], list[Sibling]]) -> ForestBranches:
        return self._once(("branches", forest), lambda: ForestBranches(read()))

    def _once(self, key: Hashable, read: Callable[[], T]) -> T:
        with self._lock:
            future = self._reads.get(key)
            mine = future is None
            if future is None:
                future = self._reads[key] = Future()
        if mine:
            try:
                future.set_result(read())
            except BaseException as error:
                future.set_exception(error)  # the waiting threads see the same failure
        result: T = future.result()
        return result
