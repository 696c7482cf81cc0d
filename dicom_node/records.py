"""Database bookkeeping shared by the stages: received instances and timeline events."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Event, Instance, Series, Study, utcnow
from db.session import Database
from dicom_node.instance import InstanceHeader

log = logging.getLogger("dicom_node.records")


@dataclass(frozen=True)
class Origin:
    """Where an instance came from (the association that carried it)."""

    calling_ae: str
    called_ae: str
    address: str


def add_event(
    session: Session,
    kind: str,
    message: str,
    *,
    level: str = "info",
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Append one timeline event and log it (UIDs only, never patient names)."""
    session.add(
        Event(
            kind=kind,
            message=message,
            level=level,
            study_uid=study_uid,
            series_uid=series_uid,
            job_id=job_id,
            data=data,
        )
    )
    getattr(log, "error" if level == "error" else level)(
        "%s study=%s series=%s job=%s %s", kind, study_uid, series_uid, job_id, message
    )


class InstanceRecorder:
    """Records spooled instances; the hot path is a few plain statements per instance.

    The first instance of a series creates the study / series rows through the ORM and
    caches their ids; later instances only insert (or bump) their instance row and touch
    the series. Rows are never deleted while the node runs, so the cache cannot go stale.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._ids: dict[str, tuple[int, int]] = {}  # series_uid -> (study_id, series_id)

    def record(self, header: InstanceHeader, path: str, size_bytes: int, origin: Origin) -> bool:
        """Record one instance; returns True when it re-opened a completed series.

        A re-sent SOP instance updates its row (the file was replaced), never duplicates.
        """
        ids = self._ids.get(header.series_uid)
        if ids is None:
            ids = self._create_series(header, origin)
            self._ids[header.series_uid] = ids
        study_id, series_id = ids
        now = utcnow()
        instances, series, studies = Instance.__table__, Series.__table__, Study.__table__
        # A plain connection, not an ORM session: this runs once per received instance.
        with self.db.engine.begin() as s:
            existing = s.execute(
                select(instances.c.id).where(instances.c.sop_uid == header.sop_uid)
            ).scalar()
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
                    )
                )
            else:
                s.execute(
                    instances.update()
                    .where(instances.c.id == existing)
                    .values(
                        receive_count=instances.c.receive_count + 1,
                        received_at=now,
                        size_bytes=size_bytes,
                        transfer_syntax_uid=header.transfer_syntax_uid,
                        path=path,
                    )
                )
            reopened = s.execute(
                series.update()
                .where(series.c.id == series_id, series.c.state != "receiving")
                .values(state="receiving")
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
                message = f"late instance {header.sop_uid} re-opened the series"
                s.execute(
                    Event.__table__.insert().values(
                        at=now,
                        kind="series_reopened",
                        level="warning",
                        message=message,
                        study_uid=header.study_uid,
                        series_uid=header.series_uid,
                    )
                )
                log.warning(
                    "series_reopened study=%s series=%s %s",
                    header.study_uid,
                    header.series_uid,
                    message,
                )
        return bool(reopened)

    def _create_series(self, header: InstanceHeader, origin: Origin) -> tuple[int, int]:
        now = utcnow()
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
                    s, "study_received", "first instance of the study", study_uid=study.study_uid
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


def series_files(session: Session, series_uid: str) -> list[str]:
    """Paths of the instances of a series, in no particular order."""
    rows = session.scalars(
        select(Instance.path).join(Series).where(Series.series_uid == series_uid)
    )
    return list(rows)


def as_utc(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
