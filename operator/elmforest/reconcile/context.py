"""What the reconcilers share in one operator process: clients, caches, locks, settings."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from elmcore.storage import S3Credentials
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.adapters.kube import Kube
from elmforest.api.forest import StorageSpec
from elmforest.metrics import Metrics
from elmforest.planner.defaults import Defaults
from elmforest.planner.policy import Policy
from elmforest.scheduling.expectations import Expectations
from elmforest.scheduling.wakeups import Wakeups

T = TypeVar("T")
STORAGE_TTL = 60.0  # seconds a forest's storage client (and its Secret's keys) is reused
RESERVATION_TTL = 30.0  # seconds a just-started branch holds its slot before the index shows it


@dataclass
class Settings:
    resync_seconds: float = 15.0  # the level-triggered safety net
    error_backoff_seconds: float = 5.0
    workers: int = 16  # threads for blocking I/O (kubernetes client, boto3)
    defaults: Defaults = field(default_factory=Defaults)  # the chart's trainer/storage values
    policy: Policy = field(default_factory=Policy)  # the chart's guardrails


@dataclass
class OperatorContext:
    kube: Kube
    settings: Settings = field(default_factory=Settings)
    wakeups: Wakeups = field(default_factory=Wakeups)
    metrics: Metrics = field(default_factory=Metrics)
    expectations: Expectations = field(default_factory=Expectations)
    # Each branch Job's (phase, started) as last seen, so only a change wakes its branch.
    job_states: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict)
    # Each forest's (exists, generation, phase, deleting) as last seen, for the same reason.
    forest_states: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None
    _storages: dict[tuple[Any, ...], tuple[float, ForestStorage]] = field(default_factory=dict)
    # Filled from I/O threads (observation runs there): one lock per key, and one for the map.
    _storage_locks: defaultdict[tuple[Any, ...], threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock)
    )
    _storages_lock: threading.Lock = field(default_factory=threading.Lock)
    _locks: defaultdict[tuple[str, str], asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    _reserved: defaultdict[tuple[str, str], dict[str, float]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    _reserved_lock: threading.Lock = field(default_factory=threading.Lock)  # read from threads

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the I/O pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="elmforest")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def forest_lock(self, namespace: str, forest: str) -> asyncio.Lock:
        return self._locks[namespace, forest]

    def reserve(self, namespace: str, forest: str, branch: str) -> None:
        with self._reserved_lock:
            self._reserved[namespace, forest][branch] = time.monotonic()

    def reserved(self, namespace: str, forest: str) -> set[str]:
        now = time.monotonic()
        with self._reserved_lock:
            slots = self._reserved[namespace, forest]
            for name in [n for n, at in slots.items() if now - at > RESERVATION_TTL]:
                del slots[name]
            return set(slots)

    def release(self, namespace: str, forest: str, branch: str) -> None:
        with self._reserved_lock:
            self._reserved[namespace, forest].pop(branch, None)

    def storage(self, namespace: str, spec: StorageSpec) -> ForestStorage:
        """The forest's storage client, with keys from its Secret (cached for a minute).
        Blocking: called from I/O threads."""
        key = (namespace, spec.uri, spec.endpoint, spec.region, spec.credentials_secret)
        # One fill per key: a thousand branches waking at once read the Secret and build the
        # (costly) S3 client once, not a thousand times.
        with self._storages_lock:
            lock = self._storage_locks[key]
        with lock:
            cached = self._storages.get(key)
            if cached is not None and time.monotonic() - cached[0] < STORAGE_TTL:
                return cached[1]
            credentials: S3Credentials | None = None
            if spec.credentials_secret and spec.uri.startswith("s3://"):
                credentials = self.kube.read_credentials(namespace, spec.credentials_secret)
            storage = ForestStorage(spec, credentials)
            self._storages[key] = (time.monotonic(), storage)
            return storage

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
