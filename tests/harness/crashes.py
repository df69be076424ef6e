"""Kill the operator at a chosen side effect: the n-th write of a kind to the API server or S3.

The emulator and the S3 proxy report each write the operator sends (``effect``), labelled by
kind ("POST jobs", "PATCH elmbranches/status", "PUT s3:manifest.json", ...). A crash point is
(label, occurrence, when): the switch kills the operator either *before* that write takes
effect (the process died with the request unsent) or *after* it took effect but before the
operator read the answer. Points name a kind of write rather than a global number, so a point
means the same thing in every run although concurrent reconciles interleave differently.
Both servers run in other threads than the test, hence the lock.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

When = Literal["before", "after"]


@dataclass(frozen=True, order=True)
class CrashPoint:
    label: str
    occurrence: int  # from 1
    when: When

    def __str__(self) -> str:
        return f"{self.when} {self.label} #{self.occurrence}"


@dataclass
class CrashSwitch:
    points: set[CrashPoint] = field(default_factory=set)
    kill: Callable[[], None] = lambda: None
    effects: list[str] = field(default_factory=list)  # every write's label, in order
    fired: list[CrashPoint] = field(default_factory=list)
    _counts: collections.Counter[str] = field(default_factory=collections.Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def effect(self, label: str) -> When | None:
        """Count one write; kill now if it is chosen ``before``. Returns when to kill, if at all."""
        when: When | None = None
        with self._lock:
            self.effects.append(label)
            self._counts[label] += 1
            for candidate in ("before", "after"):
                point = CrashPoint(label, self._counts[label], candidate)
                if point in self.points:
                    self.fired.append(point)
                    when = point.when
                    break
        if when == "before":
            self.kill()
        return when

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
