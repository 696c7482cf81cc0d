"""The record of what was received: the one writer of studies, series and instances.

The listener hands received instances to a ``RecordQueue`` (a thread that writes them
in batches, off the C-STORE acknowledgement path: the spool file is the record of truth,
the row follows within one batch); the start-up spool re-index and retrievals add
instances with ``InstanceRecorder`` directly; the assembler marks series complete
(``mark_complete``); the router stores each series' phase and matched rules
(``record_routing``) and a study's note (``set_study_note``); the path API keeps a study
row per set of input paths (``path_study``). Nothing else writes these tables, so every
state a series passes through is set here (see ``kernel.vocabulary.SeriesState``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, false, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.models import Instance, Series, Study, utcnow
from db.session import Database
from dicom_node.instance import CorruptDatasetError, InstanceHeader, parse_header
from dicom_node.spool import Spool
from kernel.events import add_event, add_event_on
from kernel.uids import derived_uid
from kernel.vocabulary import EventKind, EventLevel, SeriesState

log = logging.getLogger("dicom_node.records")


class SeriesConflictError(ValueError):
    """The series UID already belongs to another study: the instance is refused."""


@dataclass(frozen=True)
class Origin:
    """Where an instance came from (the association that carried it)."""

    calling_ae: str
    called_ae: str
    address: str


@dataclass(frozen=True)
class Received:
    """One instance that is durable in the spool and waits to be recorded."""

    header: InstanceHeader
    path: str
    size_bytes: int
    origin: Origin
    received_at: datetime = field(default_factory=utcnow)


@dataclass
class Recorded:
    """What one ``record_many`` call did: series re-opened by a late instance, and the
    items refused because their series belongs to another study (event recorded)."""

    reopened: set[str] = field(default_factory=set)
    conflicts: list[tuple[Received, str]] = field(default_factory=list)


class InstanceRecorder:
    """Records spooled instances, one at a time (``record``) or as a batch in one
    transaction (``record_many``: a few statements per series, not per instance).

    The first instance of a series creates the study / series rows through the ORM and
    caches their ids; later instances only insert (or bump) their instance rows and touch
    the series. Rows are never deleted while the node runs, so the cache cannot go stale.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        # (study_uid, series_uid) -> (study_id, series_id)
        self._ids: dict[tuple[str, str], tuple[int, int]] = {}
        # Warnings already recorded (one event per series, not per instance).
        self._warned: set[tuple[str, int, int]] = set()

    def record(self, header: InstanceHeader, path: str, size_bytes: int, origin: Origin) -> bool:
        """Record one instance; returns True when it re-opened a completed series.

        A re-sent SOP instance updates its row (the file was replaced), never duplicates.
        A SOP Instance UID already recorded in another series is kept apart (its own row
        and file) and reported once per pair of series. Raises ``SeriesConflictError`` when
        the series UID belongs to another study.
        """
        done = self.record_many([Received(header, path, size_bytes, origin)])
        if done.conflicts:
            raise SeriesConflictError(done.conflicts[0][1])
        return header.series_uid in done.reopened

    def record_many(self, items: Sequence[Received]) -> Recorded:
        """Record a batch of instances in one transaction (``record`` for each rule).

        Items of a series that belongs to another study are not recorded: they are listed
        in ``Recorded.conflicts`` with the reason (a ``series_uid_conflict`` event is
        written). The same SOP instance twice in one batch counts as a re-send.
        """
        done = Recorded()
        by_series: dict[tuple[str, str], list[Received]] = {}
        for item in items:
            by_series.setdefault((item.header.study_uid, item.header.series_uid), []).append(item)
        ids: dict[tuple[str, str], tuple[int, int]] = {}
        for key, group in by_series.items():
            known = self._ids.get(key)
            if known is None:
                try:
                    known = self._create_series(group[0].header, group[0].origin)
                except SeriesConflictError as exc:
                    done.conflicts.extend((item, str(exc)) for item in group)
                    continue
                self._ids[key] = known
            ids[key] = known
        if not ids:
            return done
        studies = Study.__table__
        # In arrival order: which series each SOP Instance UID came in.
        arrivals = [
            (item.header, ids[key][1])
            for item in items
            if (key := (item.header.study_uid, item.header.series_uid)) in ids
        ]
        # A plain connection, not an ORM session: this runs for every received instance.
        with self.db.engine.begin() as s:
            holders = self._holders(s, {header.sop_uid for header, _ in arrivals})
            for key, (study_id, series_id) in ids.items():
                group = by_series[key]
                if self._record_series(s, series_id, group):
                    done.reopened.add(key[1])
                latest = max(item.received_at for item in group)
                s.execute(
                    studies.update().where(studies.c.id == study_id).values(last_received_at=latest)
                )
            self._report_elsewhere(s, arrivals, holders)
        return done

    def _record_series(self, s: Any, series_id: int, group: list[Received]) -> bool:
        """Insert or bump the instance rows of one series and touch the series; True when
        the series was re-opened."""
        instances, series = Instance.__table__, Series.__table__
        # Per SOP instance: the last item (its file and header) and how often it came.
        latest: dict[str, Received] = {}
        times: dict[str, int] = {}
        for item in group:
            latest[item.header.sop_uid] = item
            times[item.header.sop_uid] = times.get(item.header.sop_uid, 0) + 1
        sop_uids = list(latest)
        existing: dict[str, int] = {}
        for chunk in _chunks(sop_uids, 500):
            existing.update(
                (sop, row_id)
                for row_id, sop in s.execute(
                    select(instances.c.id, instances.c.sop_uid).where(
                        instances.c.series_id == series_id, instances.c.sop_uid.in_(chunk)
                    )
                )
            )
        new_rows, updates = [], []
        for sop, item in latest.items():
            h = item.header
            values = dict(
                transfer_syntax_uid=h.transfer_syntax_uid,
                instance_number=h.instance_number,
                path=item.path,
                size_bytes=item.size_bytes,
                received_at=item.received_at,
                stack_key=h.stack_key,
                slice_position_mm=h.slice_position_mm,
                acquisition_number=h.acquisition_number,
            )
            if sop in existing:
                updates.append({"row_id": existing[sop], "times": times[sop], **values})
            else:
                new_rows.append(
                    dict(
                        series_id=series_id,
                        sop_uid=sop,
                        sop_class_uid=h.sop_class_uid,
                        receive_count=times[sop],
                        **values,
                    )
                )
        if new_rows:
            s.execute(instances.insert(), new_rows)
        if updates:
            s.execute(
                instances.update()
                .where(instances.c.id == bindparam("row_id"))
                .values(
                    receive_count=instances.c.receive_count + bindparam("times"),
                    **{k: bindparam(k) for k in updates[0] if k not in ("row_id", "times")},
                ),
                updates,
            )
        first = group[0].header
        problems = next((i.header.uid_problems for i in group if i.header.uid_problems), ())
        if problems and ("uid", series_id, 0) not in self._warned:
            self._warned.add(("uid", series_id, 0))
            add_event_on(
                s,
                EventKind.UID_NOT_CONFORMANT,
                f"{'; '.join(problems)} (PS3.5 9.1): accepted, stored and "
                "referenced exactly as received",
                level=EventLevel.WARNING,
                study_uid=first.study_uid,
                series_uid=first.series_uid,
            )
        reopened = s.execute(
            series.update()
            .where(series.c.id == series_id, series.c.state != SeriesState.RECEIVING)
            .values(state=SeriesState.RECEIVING)
        ).rowcount
        s.execute(
            series.update()
            .where(series.c.id == series_id)
            .values(
                last_received_at=max(item.received_at for item in group),
                instance_count=series.c.instance_count + len(new_rows),
            )
        )
        if reopened:
            late = next(i.header.sop_uid for i in group)
            add_event_on(
                s,
                EventKind.SERIES_REOPENED,
                f"late instance {late} re-opened the series",
                level=EventLevel.WARNING,
                study_uid=first.study_uid,
                series_uid=first.series_uid,
            )
        return bool(reopened)

    @staticmethod
    def _holders(conn: Any, sop_uids: set[str]) -> dict[str, list[tuple[int, str]]]:
        """The series (id, UID) each of ``sop_uids`` was recorded in before this batch."""
        instances, series = Instance.__table__, Series.__table__
        holders: dict[str, list[tuple[int, str]]] = {}
        for chunk in _chunks(sorted(sop_uids), 500):
            rows = conn.execute(
                select(instances.c.sop_uid, series.c.id, series.c.series_uid)
                .join(series, instances.c.series_id == series.c.id)
                .where(instances.c.sop_uid.in_(chunk))
                .order_by(series.c.id)
            )
            for sop, series_id, series_uid in rows:
                holders.setdefault(sop, []).append((series_id, series_uid))
        return holders

    def _report_elsewhere(
        self,
        conn: Any,
        arrivals: list[tuple[InstanceHeader, int]],
        holders: dict[str, list[tuple[int, str]]],
    ) -> None:
        """Report (once per pair of series) a SOP Instance UID that arrives in a series
        while another series already holds it: on the later series, naming the earlier."""
        seen = {sop: list(found) for sop, found in holders.items()}
        for header, series_id in arrivals:
            earlier = seen.setdefault(header.sop_uid, [])
            if any(other_id == series_id for other_id, _ in earlier):
                continue
            for other_id, other_uid in earlier:
                key = ("dup", min(series_id, other_id), max(series_id, other_id))
                if key in self._warned:
                    continue
                self._warned.add(key)
                add_event_on(
                    conn,
                    EventKind.DUPLICATE_SOP_UID,
                    f"SOP Instance UID {header.sop_uid} was already received in series "
                    f"{other_uid}; both instances are kept apart (a sender reuses SOP "
                    "Instance UIDs across series; a PACS keeps only the first object under "
                    "one UID)",
                    level=EventLevel.WARNING,
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                )
            earlier.append((series_id, header.series_uid))

    def series_owner(self, series_uid: str) -> str | None:
        """The Study Instance UID the database records ``series_uid`` under, or None."""
        with self.db.engine.connect() as conn:
            return conn.execute(
                select(Study.__table__.c.study_uid)
                .join(Series.__table__, Series.__table__.c.study_id == Study.__table__.c.id)
                .where(Series.__table__.c.series_uid == series_uid)
            ).scalar()

    def _create_series(self, header: InstanceHeader, origin: Origin) -> tuple[int, int]:
        now = utcnow()
        with self.db.session() as s:
            known = s.scalars(
                select(Series).where(Series.series_uid == header.series_uid)
            ).one_or_none()
            owner = known.study.study_uid if known is not None else header.study_uid
            if owner != header.study_uid:
                message = (
                    f"instance {header.sop_uid} refused: series {header.series_uid} already "
                    f"belongs to study {owner}, not to study {header.study_uid}"
                )
                add_event(
                    s,
                    EventKind.SERIES_UID_CONFLICT,
                    message,
                    level=EventLevel.ERROR,
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                )
        if owner != header.study_uid:  # the event is committed; the instance is refused
            raise SeriesConflictError(message)
        with self.db.session() as s:
            study = s.scalars(
                select(Study).where(Study.study_uid == header.study_uid)
            ).one_or_none()
            if study is None:
                study = Study(
                    study_uid=header.study_uid,
                    patient_id=header.patient_id,
                    patient_name=header.patient_name,
                    accession_number=header.accession_number,
                    study_date=header.study_date,
                    study_description=header.study_description,
                    first_received_at=now,
                    last_received_at=now,
                )
                s.add(study)
                s.flush()
                add_event(
                    s,
                    EventKind.STUDY_RECEIVED,
                    "first instance of the study",
                    study_uid=study.study_uid,
                )
            series = s.scalars(
                select(Series).where(Series.series_uid == header.series_uid)
            ).one_or_none()
            if series is None:
                series = Series(
                    study_id=study.id,
                    series_uid=header.series_uid,
                    modality=header.modality,
                    series_number=header.series_number,
                    series_description=header.series_description,
                    sop_class_uid=header.sop_class_uid,
                    calling_ae=origin.calling_ae,
                    called_ae=origin.called_ae,
                    source_address=origin.address,
                    first_received_at=now,
                    last_received_at=now,
                )
                s.add(series)
                s.flush()
            return study.id, series.id


def record_instance(
    db: Database, header: InstanceHeader, path: str, size_bytes: int, origin: Origin
) -> bool:
    """One-off recording (spool re-index, tests); the SCP keeps an InstanceRecorder."""
    return InstanceRecorder(db).record(header, path, size_bytes, origin)


def reindex_spool(
    db: Database, spool: Spool, folders: Iterable[Path] | None = None, batch: int = 500
) -> int:
    """Record every spooled file the database does not know; returns how many.

    Such files were acknowledged and then lost their row in a crash (the recorder writes
    rows after the acknowledgement). Every file is checked by its name against the paths
    the database holds, so none is missed however old; only unknown files are read
    (100,000 known files: ~1 s). ``folders``: only these series folders (a receiving
    process that ended: the series it was carrying). A file that cannot be read, or whose
    series belongs to another study, is left in place and logged.
    """
    instances = Instance.__table__
    query = select(instances.c.path)
    if folders is not None:
        folders = [Path(f) for f in folders]
        prefixes = [instances.c.path.startswith(f"{f}{os.sep}", autoescape=True) for f in folders]
        query = query.where(or_(*prefixes) if prefixes else false())
    with db.engine.connect() as conn:
        known = set(conn.execute(query).scalars())
    files = spool.iter_files() if folders is None else spool.iter_files_in(folders)
    recorder = InstanceRecorder(db)
    pending: list[Received] = []
    added = 0

    def flush() -> None:
        nonlocal added
        done = recorder.record_many(pending)
        added += len(pending) - len(done.conflicts)
        for item, why in done.conflicts:
            log.error("spooled file %s left in place, not indexed: %s", item.path, why)
        pending.clear()

    for path in files:
        name = str(path)
        if name in known:
            continue
        try:
            data = path.read_bytes()
            header = parse_header(data)
        except (OSError, CorruptDatasetError) as exc:
            log.error("spooled file %s left in place, not indexed: %s", path, exc)
            continue
        received_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        pending.append(Received(header, name, len(data), Origin("", "", ""), received_at))
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    if added:
        log.warning("indexed %d spooled instances the database did not know", added)
    return added


def _chunks(values: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class RecordQueue:
    """Records received instances in batches, in a thread of its own.

    ``submit`` returns at once: the instance is already durable in the spool (the file is
    the record of truth; the start-up re-index finds any file whose row was lost), so the
    C-STORE is answered without waiting for the database. The thread gathers instances
    for up to ``linger_s`` (or ``max_batch`` of them, or until someone waits in ``flush``)
    and writes them in one transaction (``InstanceRecorder.record_many``: a batch costs
    about as much as a single row, ~2 ms of CPU with SQLAlchemy), in order; callables
    queued with ``after_recorded`` run once everything submitted before them is written
    (completeness releases an association's series that way, never ahead of its rows).
    ``flush`` waits until everything submitted so far is written (an association's
    release waits for it, so a sender that sees "released" finds every instance recorded).

    The database being unavailable (busy, locked, down) delays rows, never drops them:
    the batch is retried with a growing pause (``retry_s`` up to 30 s). An instance that
    fails for another reason three times on its own is given up with an error in the log
    (its file stays; the next start's re-index records it). ``backlog`` lets the listener
    refuse new instances (0xA700) before the queue grows without bound.

    ``claim_series`` checks, before an instance is accepted, that its series is not
    another study's: answers from the database are cached per series, and the series of
    instances accepted but not yet written count too.
    """

    def __init__(
        self,
        db: Database,
        max_batch: int = 1000,
        retry_s: float = 0.5,
        recorder: InstanceRecorder | None = None,
        linger_s: float = 0.2,
    ) -> None:
        self.db = db
        self.recorder = recorder or InstanceRecorder(db)
        self.max_batch = max_batch
        self.retry_s = retry_s
        self.linger_s = linger_s
        self._flush_target = 0  # entries someone waits for: written without lingering
        self._queue: deque[Received | Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._submitted = 0  # items and callables queued so far
        self._done = 0  # of those, written (or given up) and run
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._owners: dict[str, str] = {}  # series_uid -> study_uid
        self._owners_lock = threading.Lock()
        self.recorded = 0
        self.given_up = 0
        self.batches = 0

    # -- the listener's side -------------------------------------------------------------
    def start(self) -> RecordQueue:
        self._thread = threading.Thread(target=self._run, name="instance-recorder", daemon=True)
        self._thread.start()
        return self

    def submit(self, item: Received) -> None:
        with self._owners_lock:
            self._owners.setdefault(item.header.series_uid, item.header.study_uid)
        self._put(item)

    def after_recorded(self, action: Callable[[], None]) -> None:
        """Run ``action`` (in the recorder's thread) once everything submitted before it is
        written; at once when the queue is not running."""
        if self._thread is None:
            action()
            return
        self._put(action)

    def _put(self, entry: Received | Callable[[], None]) -> None:
        with self._cond:
            self._queue.append(entry)
            self._submitted += 1
            self._cond.notify_all()

    def backlog(self) -> int:
        """Entries queued and not written yet."""
        with self._cond:
            return self._submitted - self._done

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._submitted
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def claim_series(self, study_uid: str, series_uid: str) -> str | None:
        """None when ``series_uid`` may take an instance of ``study_uid``; else the study
        it belongs to. Raises the database's error when it cannot be asked."""
        with self._owners_lock:
            owner = self._owners.get(series_uid)
        if owner is None:
            owner = self.recorder.series_owner(series_uid) or study_uid
            with self._owners_lock:
                owner = self._owners.setdefault(series_uid, owner)
        return None if owner == study_uid else owner

    def refuse_conflict(self, study_uid: str, series_uid: str, sop_uid: str, owner: str) -> str:
        """Record (event) and describe an instance refused because its series is ``owner``'s."""
        message = (
            f"instance {sop_uid} refused: series {series_uid} already belongs to study "
            f"{owner}, not to study {study_uid}"
        )
        with self.db.session() as s:
            add_event(
                s,
                EventKind.SERIES_UID_CONFLICT,
                message,
                level=EventLevel.ERROR,
                study_uid=study_uid,
                series_uid=series_uid,
            )
        return message

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then end the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, timeout_s))
            left = self.backlog()
            if left:
                log.error(
                    "%d received instances not recorded at stop; the next start's spool "
                    "re-index records them",
                    left,
                )

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                linger_until = time.monotonic() + self.linger_s
                while (
                    len(self._queue) < self.max_batch
                    and self._flush_target <= self._done
                    and not self._stopping
                ):
                    left = linger_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch: list[Received] = []
                action = None
                while self._queue and len(batch) < self.max_batch:
                    entry = self._queue[0]
                    if not isinstance(entry, Received):
                        if not batch:
                            action = self._queue.popleft()
                        break
                    batch.append(self._queue.popleft())
            if batch:
                self._write(batch)
                self._finished(len(batch))
            if action is not None:
                try:
                    action()
                except Exception:
                    log.exception("action after recording failed")
                self._finished(1)

    def _finished(self, count: int) -> None:
        with self._cond:
            self._done += count
            self._cond.notify_all()

    def _write(self, batch: list[Received]) -> None:
        pause = self.retry_s
        while True:
            try:
                done = self.recorder.record_many(batch)
            except OperationalError as exc:
                # Busy or unavailable: nothing of the batch was written; wait and retry.
                if self._stopping:
                    return
                log.warning(
                    "database unavailable, %d received instances wait to be recorded: %s",
                    len(batch),
                    exc.orig if exc.orig is not None else exc,
                )
                time.sleep(pause)
                pause = min(30.0, pause * 2)
                continue
            except Exception:
                if len(batch) == 1:
                    self._give_up_or_retry(batch[0])
                    return
                log.exception("recording a batch of %d instances failed; one by one", len(batch))
                for item in batch:
                    self._write([item])
                return
            self.batches += 1
            self.recorded += len(batch) - len(done.conflicts)
            for item, why in done.conflicts:
                # Another process or path claimed the series in the meantime (the listener
                # checks first): the file stays where it is, unindexed, and the log says why.
                log.error("spooled file %s left in place, not indexed: %s", item.path, why)
            return

    def _give_up_or_retry(self, item: Received, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            try:
                self.recorder.record_many([item])
                self.recorded += 1
                return
            except Exception:
                log.exception(
                    "could not record instance %s (attempt %d of %d)",
                    item.header.sop_uid,
                    attempt,
                    attempts,
                )
                time.sleep(self.retry_s * attempt)
        self.given_up += 1
        log.error(
            "gave up recording instance %s (%s); its file stays in the spool and the next "
            "start's re-index records it",
            item.header.sop_uid,
            item.path,
        )


def mark_complete(session: Session, series: Series, quiet_period_s: float) -> None:
    """A receiving series is complete: quiet and released (``SeriesState.COMPLETE``)."""
    series.state = SeriesState.COMPLETE
    series.completed_at = utcnow()
    add_event(
        session,
        EventKind.SERIES_COMPLETE,
        f"{series.instance_count} instances, quiet for {quiet_period_s:g} s",
        study_uid=series.study.study_uid,
        series_uid=series.series_uid,
    )


def record_routing(
    session: Session,
    series: Series,
    *,
    phase: str,
    confidence: float,
    reasons: list[str],
    matched_rules: list[str],
) -> None:
    """Store a series' phase (with its reasons) and the rules that matched it.

    A phase that differs from the one stored before (the study's other series changed the
    picture) is recorded as a ``phase_changed`` event.
    """
    if series.phase is not None and series.phase != phase:
        add_event(
            session,
            EventKind.PHASE_CHANGED,
            f"phase {series.phase} -> {phase} with the study's other series",
            study_uid=series.study.study_uid,
            series_uid=series.series_uid,
        )
    series.phase = phase
    series.phase_confidence = confidence
    series.phase_reasons = reasons
    series.matched_rule = ", ".join(matched_rules) or None


def mark_routed(series: Series) -> None:
    """The router acted on this completion of the series."""
    series.routed_at = utcnow()


def set_study_note(study: Study, note: str | None) -> None:
    """Why nothing ran for a study (or None): shown on the status page."""
    study.note = note or None


def path_study(session: Session, inputs: dict[str, dict[str, str]]) -> Study:
    """The study row of path API jobs, one per set of input paths (keeps jobs per study)."""
    uid = derived_uid("path-study", *(f"{r}={v['path']}" for r, v in sorted(inputs.items())))
    study = session.scalars(select(Study).where(Study.study_uid == uid)).one_or_none()
    if study is None:
        study = Study(study_uid=uid, study_description="path API request")
        session.add(study)
        session.flush()
    return study
