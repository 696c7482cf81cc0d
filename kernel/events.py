"""The event log: the one writer of the ``events`` table (the timeline of every study).

Each event is one row and one log line. Log lines carry UIDs, never patient names.
``add_event`` joins an ORM session's transaction; ``add_event_on`` a Core connection's
(the receive path records instances with plain statements).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from db.models import Event, utcnow
from kernel.vocabulary import EventKind, EventLevel

log = logging.getLogger("dicom_node.events")

# ``add_event_on``'s INSERT, built once: building a statement per event cost more CPU
# than running it.
_INSERT = Event.__table__.insert()


def _fields(
    kind: EventKind,
    message: str,
    level: EventLevel,
    study_uid: str | None,
    series_uid: str | None,
    job_id: int | None,
    data: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "kind": str(EventKind(kind)),
        "level": str(EventLevel(level)),
        "message": message,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "job_id": job_id,
        "data": data,
    }


def _log(fields: dict[str, Any]) -> None:
    level = {"info": logging.INFO, "warning": logging.WARNING}.get(fields["level"], logging.ERROR)
    log.log(
        level,
        "%s study=%s series=%s job=%s %s",
        fields["kind"],
        fields["study_uid"],
        fields["series_uid"],
        fields["job_id"],
        fields["message"],
    )


def add_event(
    session: Session,
    kind: EventKind,
    message: str,
    *,
    level: EventLevel = EventLevel.INFO,
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Append one event in ``session``'s transaction and log it.

    Raises ``ValueError`` for a kind or level outside the vocabulary.
    """
    fields = _fields(kind, message, level, study_uid, series_uid, job_id, data)
    session.add(Event(**fields))
    _log(fields)


def add_event_on(
    conn: Connection,
    kind: EventKind,
    message: str,
    *,
    level: EventLevel = EventLevel.INFO,
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """``add_event`` on a Core connection (one INSERT, no ORM unit of work)."""
    fields = _fields(kind, message, level, study_uid, series_uid, job_id, data)
    conn.execute(_INSERT, fields)
    _log(fields)
