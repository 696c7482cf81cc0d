"""Peak resident memory of this process during a block (sampled), for tests and benchmarks.

``ru_maxrss`` only ever grows, so comparing two runs in one process needs sampling.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    baseline: int = 0
    peak: int = 0

    @property
    def growth_mb(self) -> float:
        """Peak above the memory in use when the block started."""
        return max(0, self.peak - self.baseline) / 2**20


@contextmanager
def peak_rss(interval_s: float = 0.002) -> Iterator[PeakRss]:
    result = PeakRss()
    result.baseline = result.peak = rss_bytes()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result.peak = max(result.peak, rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.peak = max(result.peak, rss_bytes())
