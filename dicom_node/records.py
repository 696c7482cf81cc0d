"""The record of what was received: the one writer of studies, series and instances.

The SCP (``InstanceRecorder``) and the start-up spool re-index add instances; the
assembler marks series complete (``mark_complete``); the router stores each series' phase
and matched rules (``record_routing``) and a study's note (``set_study_note``); the path
API keeps a study row per set of input paths (``path_study``). Nothing else writes these
tables, so every state a series passes through is set here (see
``kernel.vocabulary.SeriesState``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, Series, Study, utcnow
from db.session import Database
from dicom_node.instance import InstanceHeader
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


class InstanceRecorder:
    """Records spooled instances; the hot path is a few plain statements per instance.

    The first instance of a series creates the study / series rows through the ORM and
    caches their ids; later instances only insert (or bump) their instance row and touch
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
        key = (header.study_uid, header.series_uid)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._create_series(header, origin)
            self._ids[key] = ids
        study_id, series_id = ids
        now = utcnow()
        instances, series, studies = Instance.__table__, Series.__table__, Study.__table__
        # A plain connection, not an ORM session: this runs once per received instance.
        with self.db.engine.begin() as s:
            existing = s.execute(
                select(instances.c.id).where(
                    instances.c.series_id == series_id, instances.c.sop_uid == header.sop_uid
                )
            ).scalar()
            stack = dict(
                stack_key=header.stack_key,
                slice_position_mm=header.slice_position_mm,
                acquisition_number=header.acquisition_number,
            )
            if existing is None:
                s.execute(
                    instances.insert().values(
                        series_id=series_id,
                        sop_uid=header.sop_uid,
                        sop_class_uid=header.sop_class_uid,
                        transfer_syntax_uid=header.transfer_syntax_uid,
                        instance_number=header.instance_number,
                        path=path,
                        size_bytes=size_bytes,
                        received_at=now,
                        receive_count=1,
                        **stack,
                    )
                )
                self._check_elsewhere(s, header, series_id)
            else:
                s.execute(
                    instances.update()
                    .where(instances.c.id == existing)
                    .values(
                        receive_count=instances.c.receive_count + 1,
                        received_at=now,
                        size_bytes=size_bytes,
                        transfer_syntax_uid=header.transfer_syntax_uid,
                        instance_number=header.instance_number,
                        path=path,
                        **stack,
                    )
                )
            if header.uid_problems and ("uid", series_id, 0) not in self._warned:
                self._warned.add(("uid", series_id, 0))
                add_event_on(
                    s,
                    EventKind.UID_NOT_CONFORMANT,
                    f"{'; '.join(header.uid_problems)} (PS3.5 9.1): accepted, stored and "
                    "referenced exactly as received",
                    level=EventLevel.WARNING,
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
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
                    last_received_at=now,
                    instance_count=series.c.instance_count + (0 if existing else 1),
                )
            )
            s.execute(studies.update().where(studies.c.id == study_id).values(last_received_at=now))
            if reopened:
                add_event_on(
                    s,
                    EventKind.SERIES_REOPENED,
                    f"late instance {header.sop_uid} re-opened the series",
                    level=EventLevel.WARNING,
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                )
        return bool(reopened)

    def _check_elsewhere(self, conn: Any, header: InstanceHeader, series_id: int) -> None:
        """Report (once per pair of series) a SOP Instance UID also present in another series."""
        others = conn.execute(
            select(Series.__table__.c.id, Series.__table__.c.series_uid)
            .join(Instance.__table__, Instance.__table__.c.series_id == Series.__table__.c.id)
            .where(
                Instance.__table__.c.sop_uid == header.sop_uid,
                Instance.__table__.c.series_id != series_id,
            )
        ).all()
        for other_id, other_uid in others:
            key = ("dup", min(series_id, other_id), max(series_id, other_id))
            if key in self._warned:
                continue
            self._warned.add(key)
            add_event_on(
                conn,
                EventKind.DUPLICATE_SOP_UID,
                f"SOP Instance UID {header.sop_uid} was already received in series {other_uid}; "
                "both instances are kept apart (a sender reuses SOP Instance UIDs across series; "
                "a PACS keeps only the first object under one UID)",
                level=EventLevel.WARNING,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
            )

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

