"""Warm model runners kept between jobs, evicted least-recently-used over a memory budget.

Loading a predictor costs seconds (a large checkpoint onto a GPU); keeping every model of
a big registry loaded does not fit. Each model declares ``memory_mb`` in models.yaml.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("inference.model_cache")


class Runner(Protocol):
    def close(self) -> None: ...


class ModelCache:
    """LRU of loaded runners whose summed ``memory_mb`` stays within ``budget_mb``.

    The model just requested always stays, even alone over the budget: a job must run.
    """

    def __init__(self, budget_mb: int) -> None:
        self.budget_mb = budget_mb
        self._items: OrderedDict[str, tuple[Runner, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    def get(self, key: str, memory_mb: int, load: Callable[[], Runner]) -> Runner:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            self._evict(need_mb=memory_mb)
            runner = load()
            self.loads += 1
            self._items[key] = (runner, memory_mb)
            return runner

    def _evict(self, need_mb: int) -> None:
        while self._items and self.used_mb + need_mb > self.budget_mb:
            key, (runner, _) = self._items.popitem(last=False)
            self.evictions += 1
            log.info("model %s evicted (cache budget %d MB)", key, self.budget_mb)
            runner.close()

    @property
    def used_mb(self) -> int:
        return sum(mb for _, mb in self._items.values())

    def loaded(self) -> list[str]:
        return list(self._items)
