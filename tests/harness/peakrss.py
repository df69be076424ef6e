"""Peak resident memory of one piece of work, for scripts the memory tests run as processes of
their own (so nothing but what they measure is loaded). Imports the standard library only."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


def rss_kib() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_growth_kib(work: Callable[[], object]) -> int:
    """How far this process's resident memory rose above its level before ``work``, sampled
    every millisecond while it ran (and once after)."""
    baseline, peak, done = rss_kib(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_kib()) - baseline
