"""What the operator wrote that its watch has not shown yet (client-go's "expectations").

A reconcile that reads its branch from the index before its own last write has come back
acts on stale state: it sends the same status patch again, or looks for a Job it just created
and, not finding it, reads storage for nothing. So each write's resourceVersion and each
created Job is remembered until the watch shows it; meanwhile the branch waits, and the echo
itself queues nothing. Entries expire: a watch that restarts may skip an echo.
"""

from __future__ import annotations

import time

Key = tuple[str, str]  # (namespace, name)
EXPIRY_SECONDS = 10.0


class Expectations:
    def __init__(self, expiry: float = EXPIRY_SECONDS) -> None:
        self.expiry = expiry
        self._writes: dict[Key, tuple[float, list[str]]] = {}
        self._jobs: dict[Key, float] = {}

    def wrote(self, key: Key, resource_version: str | None) -> None:
        if resource_version:
            versions = self._writes.get(key, (0.0, []))[1]
            self._writes[key] = (time.monotonic(), [*versions, resource_version])

    def echo(self, key: Key, resource_version: str) -> bool:
        """True if this event is one of our own writes coming back (it is news to no one)."""
        entry = self._writes.get(key)
        if entry is None or resource_version not in entry[1]:
            return False
        rest = entry[1][entry[1].index(resource_version) + 1 :]
        if rest:
            self._writes[key] = (entry[0], rest)
        else:
            del self._writes[key]
        return True

    def behind(self, key: Key, current: str) -> bool:
        """True while the index (at resourceVersion ``current``) has not caught up with our
        last write to ``key``. A write the server found to be a no-op keeps the version we
        read: that one is caught up at once."""
        self.echo(key, current)  # the index may show some of our writes already
        entry = self._writes.get(key)
        if entry is None:
            return False
        if time.monotonic() - entry[0] > self.expiry:
            del self._writes[key]
            return False
        return True

    def forget(self, key: Key) -> None:
        self._writes.pop(key, None)

    def created_job(self, key: Key) -> None:
        self._jobs[key] = time.monotonic()

    def job_seen(self, key: Key) -> None:
        self._jobs.pop(key, None)

    def job_pending(self, key: Key) -> bool:
        """True if we created this Job moments ago and the watch has not shown it yet."""
        created = self._jobs.get(key)  # read from observation's I/O threads: no check-then-del
        if created is None:
            return False
        if time.monotonic() - created > self.expiry:
            self._jobs.pop(key, None)
            return False
        return True
