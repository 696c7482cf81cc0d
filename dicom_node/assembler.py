"""Series completeness: when has a series finished arriving?

A series is complete when no association that carried it is still open and no instance
arrived for ``quiet_period_s``. The open-association bookkeeping lives in memory (an
association cannot outlive the process); everything else is in the database, so after a
restart every series still ``receiving`` completes once it has been quiet long enough.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from datetime import timedelta

from sqlalchemy import select

from db.models import Series, utcnow
from db.session import Database
from dicom_node.records import mark_complete
from kernel.events import add_event
from kernel.vocabulary import EventKind, EventLevel, SeriesState

log = logging.getLogger("dicom_node.assembler")


class AssociationTracker:
    """Which series are still being carried by an open association (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: dict[Hashable, set[str]] = {}
        self._open_count: Counter[str] = Counter()

    def touch(self, assoc_id: Hashable, series_uid: str, study_uid: str | None = None) -> None:
        """``assoc_id`` (an association, a retrieval) carries ``series_uid`` until it is
        released. ``study_uid`` is for trackers that forward (``dicom_node.receivers``)."""
        with self._lock:
            carried = self._by_assoc.setdefault(assoc_id, set())
            if series_uid not in carried:
                carried.add(series_uid)
                self._open_count[series_uid] += 1

    def release(self, assoc_id: Hashable) -> None:
        with self._lock:
            for series_uid in self._by_assoc.pop(assoc_id, ()):
                self._open_count[series_uid] -= 1
                if self._open_count[series_uid] <= 0:
                    del self._open_count[series_uid]

    def open_series(self) -> set[str]:
        with self._lock:
            return set(self._open_count)


class Assembler:
    """Marks quiet, released series complete and hands them to ``on_complete``."""

    def __init__(
        self,
        db: Database,
        tracker: AssociationTracker,
        quiet_period_s: float,
        on_complete: Callable[[str], None],
    ) -> None:
        self.db = db
        self.tracker = tracker
        self.quiet_period_s = quiet_period_s
        self.on_complete = on_complete

    def poll(self) -> list[str]:
        """Complete every series that is due; returns their UIDs."""
        cutoff = utcnow() - timedelta(seconds=self.quiet_period_s)
        still_open = self.tracker.open_series()
        completed: list[str] = []
        with self.db.session() as s:
            due = s.scalars(
                select(Series)
                .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
                .with_for_update()
            ).all()
            for series in due:
                if series.series_uid in still_open:
                    continue
                mark_complete(s, series, self.quiet_period_s)
                completed.append(series.series_uid)
        for series_uid in completed:
            try:
                self.on_complete(series_uid)
            except Exception:  # one bad series must not stop the others
                log.exception("routing failed for series %s", series_uid)
                with self.db.session() as s:
                    add_event(
                        s,
                        EventKind.ROUTING_ERROR,
                        "routing raised an error; see the node log",
                        level=EventLevel.ERROR,
                        series_uid=series_uid,
                    )
        return completed
