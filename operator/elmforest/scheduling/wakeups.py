"""Wake a resource's reconcile loop early when something it depends on changed."""

from __future__ import annotations

import asyncio
from collections import defaultdict

Key = tuple[str, str, str]  # (kind, namespace, name)


class Wakeups:
    def __init__(self) -> None:
        self._events: defaultdict[Key, asyncio.Event] = defaultdict(asyncio.Event)

    def wake(self, key: Key) -> None:
        event = self._events.get(key)
        if event is not None:
            event.set()

    async def wait(self, key: Key, timeout: float) -> None:
        event = self._events[key]
        try:
            await asyncio.wait_for(event.wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            pass
        finally:
            event.clear()

    def forget(self, key: Key) -> None:
        self._events.pop(key, None)
