"""Retrieve requests: the one writer of ``retrieve_requests``.

A request asks a configured source (settings ``sources``) for one study, found by its
Study Instance UID, its AccessionNumber, or a PatientID with an optional StudyDate range,
and names the pipelines to run on it (None: the routing rules choose). The web form, the
JSON API and ``dicom-node retrieve`` create requests (``create``); the node's retrieval
loop (``dicom_node.retriever``) moves them along::

    requested -> querying -> retrieving -> received
                        \\-> failed (reason)  \\-> failed (reason)

and counts the instances expected (what the source says the study holds), received (stored
by the node) and failed. The router reads the pipelines a study's latest request names
(``named_pipelines``): they replace the rules' choice for that study, and still need
their input phases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import RetrieveRequest, Study, utcnow
from db.session import Database
from kernel.events import add_event
from kernel.uids import InvalidUIDError, require_uid
from kernel.vocabulary import ACTIVE_RETRIEVE_STATES, EventKind, EventLevel, RetrieveState

# PS3.5 6.2: AccessionNumber is SH (16 characters), PatientID LO (64). The query matches
# single values exactly (PS3.4 C.2.2.2.1): the matching characters '*' and '?', and the
# value separator '\\', would turn it into a wildcard or a list, so they are refused.
_NOT_IN_A_KEY = re.compile(r"[*?\\\x00-\x1f]")
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


class RetrieveError(ValueError):
    """A retrieve request or search that cannot be made as asked (unknown source or
    pipeline, a query that names no study); the message says what to change."""


@dataclass(frozen=True)
class StudyQuery:
    """Which study to look for at a source: exactly one of a Study Instance UID, an
    AccessionNumber, or a PatientID (with an optional StudyDate range ``date_from`` ..
    ``date_to``, YYYYMMDD, inclusive). Built by ``parse_query``."""

    study_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    date_from: str | None = None
    date_to: str | None = None

    def describe(self, patient_ids: bool = False) -> str:
        """E.g. ``accession A123``; a patient ID query names the ID only when
        ``patient_ids`` (never in logs)."""
        if self.study_uid:
            return f"study {self.study_uid}"
        if self.accession_number:
            return f"accession {self.accession_number}"
        who = f"patient ID {self.patient_id}" if patient_ids else "the patient ID"
        if self.date_from or self.date_to:
            who += f" with study date {self.date_range()}"
        return who

    def date_range(self) -> str:
        """The StudyDate range matching key (PS3.4 C.2.2.2.5): ``A-B``, ``A-``, ``-B``."""
        if not (self.date_from or self.date_to):
            return ""
        if self.date_from and self.date_from == self.date_to:
            return self.date_from
        return f"{self.date_from or ''}-{self.date_to or ''}"

    def matches(
        self, study_uid: str, accession: str | None, patient_id: str | None, study_date: str | None
    ) -> bool:
        """Whether a study a source returned is really one this query asked for.

        A source that ignores a matching key it does not support returns every study; the
        node must not retrieve those, so each answer is checked here as well.
        """
        if self.study_uid:
            return study_uid == self.study_uid
        if self.accession_number:
            return (accession or "").strip() == self.accession_number
        if (patient_id or "").strip() != self.patient_id:
            return False
        date = (study_date or "").strip()
        if self.date_from and not (date and date >= self.date_from):
            return False
        return not (self.date_to and not (date and date <= self.date_to))


def _date(value: str | None, name: str) -> str | None:
    text = (value or "").strip()
    if not text:
        return None
    m = _DATE.match(text)
    if not m:
        raise RetrieveError(f"{name} {text!r} is not a date (YYYYMMDD or YYYY-MM-DD)")
    try:
        datetime(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise RetrieveError(f"{name} {text!r} is not a date of the calendar") from None
    return "".join(m.groups())


def _key(value: str | None, name: str, size: int) -> str | None:
    text = (value or "").strip()
    if not text:
        return None
    if len(text) > size:
        raise RetrieveError(f"{name} {text!r} is longer than {size} characters")
    if _NOT_IN_A_KEY.search(text):
        raise RetrieveError(
            f"{name} {text!r} has a character a query cannot match exactly (*, ?, \\ or a "
            "control character)"
        )
    return text


def parse_query(
    study_uid: str | None = None,
    accession_number: str | None = None,
    patient_id: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
) -> StudyQuery:
    """The query a user typed, checked: exactly one of the three ways to name a study
    (dates only with a patient ID). Raises ``RetrieveError`` saying what is wrong."""
    uid = (study_uid or "").strip() or None
    if uid is not None:
        try:
            uid = require_uid(uid, "StudyInstanceUID")
        except InvalidUIDError as exc:
            raise RetrieveError(str(exc)) from None
    query = StudyQuery(
        study_uid=uid,
        accession_number=_key(accession_number, "accession number", 16),
        patient_id=_key(patient_id, "patient ID", 64),
        date_from=_date(date_from, "date_from"),
        date_to=_date(date_to, "date_to"),
    )
    given = [x for x in (query.study_uid, query.accession_number, query.patient_id) if x]
    if len(given) != 1:
        raise RetrieveError(
            "name the study by exactly one of: Study Instance UID, accession number, or "
            "patient ID (with an optional study date range)"
        )
    if (query.date_from or query.date_to) and not query.patient_id:
        raise RetrieveError("a study date range goes with a patient ID")
    if query.date_from and query.date_to and query.date_from > query.date_to:
        raise RetrieveError(f"date_from {query.date_from} is after date_to {query.date_to}")
    return query


def check_pipelines(names: Iterable[str] | None, catalog: Mapping[str, Any]) -> list[str] | None:
    """The pipelines a request names, each one of the catalog in force; None (or empty):
    the routing rules choose. Raises ``RetrieveError`` naming an unknown pipeline."""
    chosen: list[str] = []
    for name in names or []:
        name = str(name).strip()
        if name and name not in chosen:
            chosen.append(name)
    unknown = [n for n in chosen if n not in catalog]
    if unknown:
        raise RetrieveError(
            f"unknown pipeline {', '.join(repr(n) for n in unknown)} (pipelines of the rules "
            f"file: {', '.join(sorted(catalog)) or 'none'})"
        )
    return chosen or None


# -- writing ------------------------------------------------------------------------------


def create(
    db: Database,
    source: str,
    query: StudyQuery,
    pipelines: list[str] | None,
    requested_by: str,
) -> int:
    """A new request in state ``requested``; returns its id. The caller has checked the
    source name and the pipelines (``check_pipelines``)."""
    now = utcnow()
    with db.session() as s:
        row = RetrieveRequest(
            source=source,
            study_uid=query.study_uid,
            accession_number=query.accession_number,
            patient_id=query.patient_id,
            date_from=query.date_from,
            date_to=query.date_to,
            pipelines=pipelines,
            state=RetrieveState.REQUESTED,
            instances_received=0,
            instances_failed=0,
            requested_by=requested_by[:128],
            requested_at=now,
            updated_at=now,
            attempts=0,
        )
        s.add(row)
        s.flush()
        return row.id


def query_of(row: RetrieveRequest) -> StudyQuery:
    """The query a request was made with."""
    return StudyQuery(
        study_uid=row.study_uid if not (row.accession_number or row.patient_id) else None,
        accession_number=row.accession_number,
        patient_id=row.patient_id,
        date_from=row.date_from,
        date_to=row.date_to,
    )


def claim_next(db: Database) -> RetrieveRequest | None:
    """The oldest ``requested`` request, now ``querying`` (one claimant wins); None when
    there is none."""
    with db.session() as s:
        for row_id in s.scalars(
            select(RetrieveRequest.id)
            .where(RetrieveRequest.state == RetrieveState.REQUESTED)
            .order_by(RetrieveRequest.id)
            .limit(5)
        ).all():
            now = utcnow()
            taken = s.execute(
                update(RetrieveRequest)
                .where(
                    RetrieveRequest.id == row_id,
                    RetrieveRequest.state == RetrieveState.REQUESTED,
                )
                .values(
                    state=RetrieveState.QUERYING,
                    started_at=now,
                    updated_at=now,
                    attempts=RetrieveRequest.attempts + 1,
                    reason=None,
                )
            ).rowcount
            if taken:
                s.flush()
                return s.get(RetrieveRequest, row_id)
    return None


def start_retrieving(
    db: Database,
    request_id: int,
    *,
    study_uid: str,
    method: str,
    expected: int | None,
    detail: dict[str, Any],
    message: str,
) -> None:
    """The source named the study: ``retrieving`` by ``method`` (C-MOVE, C-GET,
    WADO-RS), with the instances it said the study holds; a ``retrieve_started`` event."""
    with db.session() as s:
        row = s.get(RetrieveRequest, request_id)
        row.study_uid = study_uid
        row.state = RetrieveState.RETRIEVING
        row.method = method
        row.instances_expected = expected
        row.instances_received = 0
        row.instances_failed = 0
        row.detail = detail
        row.updated_at = utcnow()
        add_event(
            s,
            EventKind.RETRIEVE_STARTED,
            message,
            study_uid=study_uid,
            data={"retrieve_id": request_id, "source": row.source, "method": method},
        )


def progress(
    db: Database,
    request_id: int,
    *,
    received: int,
    failed: int,
    expected: int | None = None,
) -> None:
    """Counts so far (``expected`` only when the source now says better)."""
    values: dict[str, Any] = dict(
        instances_received=received, instances_failed=failed, updated_at=utcnow()
    )
    if expected is not None:
        values["instances_expected"] = expected
    with db.session() as s:
        s.execute(update(RetrieveRequest).where(RetrieveRequest.id == request_id).values(**values))


def finish(
    db: Database,
    request_id: int,
    *,
    received: int,
    failed: int,
    expected: int | None,
    reason: str | None,
    detail: dict[str, Any] | None = None,
) -> str:
    """The source is done: ``received`` when nothing failed and something came, else
    ``failed`` with ``reason``; an event either way. Returns the state."""
    ok = reason is None and failed == 0 and received > 0
    state = RetrieveState.RECEIVED if ok else RetrieveState.FAILED
    if not ok and reason is None:
        reason = "the source sent no instance" if received == 0 else f"{failed} instances failed"
    with db.session() as s:
        row = s.get(RetrieveRequest, request_id)
        row.state = state
        row.instances_received = received
        row.instances_failed = failed
        if expected is not None:
            row.instances_expected = expected
        row.reason = reason
        row.detail = {**(row.detail or {}), **(detail or {})}
        row.finished_at = row.updated_at = utcnow()
        if ok:
            add_event(
                s,
                EventKind.RETRIEVE_RECEIVED,
                f"retrieve #{request_id} from {row.source}: {received} instances received "
                f"by {row.method}",
                study_uid=row.study_uid,
                data={"retrieve_id": request_id, "received": received},
            )
        else:
            add_event(
                s,
                EventKind.RETRIEVE_FAILED,
                f"retrieve #{request_id} from {row.source} failed: {reason}",
                level=EventLevel.ERROR,
                study_uid=row.study_uid,
                data={"retrieve_id": request_id, "received": received, "failed": failed},
            )
    return state


def fail(db: Database, request_id: int, reason: str) -> None:
    """Failed before any instance was asked for (unknown study, source unreachable)."""
    with db.session() as s:
        row = s.get(RetrieveRequest, request_id)
        row.state = RetrieveState.FAILED
        row.reason = reason
        row.finished_at = row.updated_at = utcnow()
        add_event(
            s,
            EventKind.RETRIEVE_FAILED,
            f"retrieve #{request_id} from {row.source} failed: {reason}",
            level=EventLevel.ERROR,
            study_uid=row.study_uid,
            data={"retrieve_id": request_id},
        )


def requeue_interrupted(db: Database) -> int:
    """Requests a previous run left querying or retrieving (the node stopped) are asked
    for again; instances already stored are simply received once more. Returns how many."""
    with db.session() as s:
        return s.execute(
            update(RetrieveRequest)
            .where(RetrieveRequest.state.in_((RetrieveState.QUERYING, RetrieveState.RETRIEVING)))
            .values(state=RetrieveState.REQUESTED, updated_at=utcnow())
        ).rowcount


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedPipelines:
    """The pipelines a retrieve request names for its study, and the words the routing
    events say about it."""

    request_id: int
    pipelines: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"retrieve request #{self.request_id} names pipelines "
            f"{', '.join(self.pipelines)} (instead of the rules' choice)"
        )


def named_pipelines(s: Session, study_uid: str) -> NamedPipelines | None:
    """The pipelines the study's latest retrieval names, or None (never retrieved, or the
    choice left to the routing rules). Only requests that began retrieving count: one
    that failed before (study not found, source down) brought nothing to route."""
    row = s.execute(
        select(RetrieveRequest.id, RetrieveRequest.pipelines)
        .where(RetrieveRequest.study_uid == study_uid, RetrieveRequest.method.is_not(None))
        .order_by(RetrieveRequest.id.desc())
        .limit(1)
    ).first()
    if row is None or not row.pipelines:
        return None
    return NamedPipelines(row.id, tuple(str(p) for p in row.pipelines))


def as_dict(row: RetrieveRequest, patient_ids: bool = False) -> dict[str, Any]:
    """A request for the pages and the API (UTC times; the patient ID of a patient ID
    query only for those who see patient IDs)."""

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    query = query_of(row)
    return {
        "id": row.id,
        "source": row.source,
        "query": query.describe(patient_ids),
        "study_uid": row.study_uid,
        "accession_number": row.accession_number,
        "patient_id": row.patient_id if patient_ids else None,
        "date_from": row.date_from,
        "date_to": row.date_to,
        "pipelines": list(row.pipelines) if row.pipelines else None,
        "state": row.state,
        "active": row.state in ACTIVE_RETRIEVE_STATES,
        "method": row.method,
        "reason": row.reason,
        "instances_expected": row.instances_expected,
        "instances_received": row.instances_received,
        "instances_failed": row.instances_failed,
        "requested_by": row.requested_by,
        "requested_at": when(row.requested_at),
        "started_at": when(row.started_at),
        "updated_at": when(row.updated_at),
        "finished_at": when(row.finished_at),
        "attempts": row.attempts,
        "detail": row.detail,
    }


def get(s: Session, request_id: int) -> RetrieveRequest | None:
    return s.get(RetrieveRequest, request_id)


def recent(s: Session, limit: int = 20) -> list[RetrieveRequest]:
    """The latest requests, newest first."""
    return list(s.scalars(select(RetrieveRequest).order_by(RetrieveRequest.id.desc()).limit(limit)))


def of_study(s: Session, study_uid: str) -> list[RetrieveRequest]:
    """A study's requests, newest first."""
    return list(
        s.scalars(
            select(RetrieveRequest)
            .where(RetrieveRequest.study_uid == study_uid)
            .order_by(RetrieveRequest.id.desc())
        )
    )


def known_studies(s: Session, study_uids: Iterable[str]) -> set[str]:
    """Which of these studies the node has received (rows in ``studies``)."""
    uids = list(study_uids)
    if not uids:
        return set()
    return set(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(uids))))
