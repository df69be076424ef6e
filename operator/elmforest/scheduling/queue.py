"""A work queue of keys to reconcile, with client-go's workqueue guarantees.

A key added many times before it is taken is reconciled once; a key is never reconciled twice
at the same time (added while in flight, it runs again after); ``add_after`` keeps the earliest
pending retry of a key. ``take`` hands out every ready key at once: the reconciler works on a
batch and can share reads (one manifest per forest) across it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._dirty: dict[K, None] = {}  # ready to take; ordered: first added, first taken
        self._again: set[K] = set()  # added while in flight: dirty again once done
        self._processing: set[K] = set()
        self._ready = asyncio.Event()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}

    def __len__(self) -> int:
        """The queue's depth: keys ready to take and keys in flight (delayed ones not)."""
        return len(self._dirty) + len(self._processing)

    def add(self, key: K) -> None:
        if key in self._processing:
            self._again.add(key)
        else:
            self._dirty[key] = None
            self._ready.set()

    def add_after(self, key: K, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def take(self, window: float = 0.0) -> list[K]:
        """Every key that is dirty and not in flight, once there is one and ``window`` more
        seconds have passed (so a burst comes as one batch); each must be handed back with
        ``done``."""
        while not self._dirty:
            self._ready.clear()
            await self._ready.wait()
        if window > 0:
            await asyncio.sleep(window)
        batch = list(self._dirty)
        self._dirty.clear()
        self._processing.update(batch)
        return batch

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def close(self) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
