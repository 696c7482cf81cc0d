"""The outbox: the one writer of the ``dispatches`` table.

Every object the node delivers (a result it made, an original it forwards) is a row per
(SOP instance, destination). Routing queues forwards, the job runner queues results, the
dispatcher claims due rows and records what each C-STORE answered, storage commitment
confirms or returns rows, and an admin resends. All of them move rows only through the
functions here, so a row re-queued for any reason gets the same fresh fields (state,
attempts, due time, the time its ``max_age_s`` counts from, last error, commitment).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Dispatch, Study, utcnow
from db.session import Database
from kernel.events import add_event
from kernel.retry import RetryPolicy
from kernel.settings import DispatchSettings
from kernel.vocabulary import EventKind, EventLevel, OutboxKind, OutboxState

Verdict = Literal["sent", "retry", "failed"]


@dataclass(frozen=True)
class SendOutcome:
    """What one delivery attempt of one row came to.

    ``state``: ``sent`` (delivered, warnings included), ``retry`` (a later attempt may
    succeed: out of resources, no association) or ``failed`` (a retry cannot change it).
    ``status`` is the DIMSE status when the destination answered one.
    """

    state: Verdict
    status: int | None
    detail: str


def _refused_for_good(outcome: object) -> bool:
    return isinstance(outcome, SendOutcome) and outcome.state == "failed"


def send_policy(settings: DispatchSettings) -> RetryPolicy:
    """The retry policy of sends: ``dispatch.*`` with 50 % jitter; refusals are final."""
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_s=settings.retry_initial_s,
        cap_s=settings.retry_max_s,
        jitter=0.5,
        permanent=_refused_for_good,
    )


def _requeue(row: Dispatch, now: datetime, path: str | None = None) -> None:
    """The one way a row becomes pending: every field a fresh delivery needs."""
    row.state = OutboxState.PENDING
    row.attempts = 0
    row.next_attempt_at = now
    row.queued_at = now
    row.last_error = None
    row.last_status = None
    row.commit_uid = None
    if path is not None:
        row.path = path


def _study_uid(session: Session, row: Dispatch) -> str | None:
    if row.study_id is None:
        return None
    study = session.get(Study, row.study_id)
    return study.study_uid if study else None


def queue(
    session: Session,
    *,
    study_id: int | None,
    kind: OutboxKind,
    sop_uid: str,
    sop_class_uid: str,
    path: str,
    destinations: Iterable[str],
    replace: bool = True,
) -> int:
    """Queue delivery of one object to each destination; returns how many rows were queued.

    A row that already exists for (SOP instance, destination) is queued again with the
    new file (``replace``), unless it is still waiting to go (pending or sending). With
    ``replace=False`` only rows that ended (sent, committed, failed) are queued again.
    """
    destinations = list(destinations)
    existing = {
        row.destination: row
        for row in session.scalars(
            select(Dispatch).where(
                Dispatch.sop_uid == sop_uid, Dispatch.destination.in_(destinations)
            )
        )
    }
    now = utcnow()
    count = 0
    for destination in destinations:
        row = existing.get(destination)
        if row is None:
            row = Dispatch(
                study_id=study_id,
                kind=kind,
                sop_uid=sop_uid,
                sop_class_uid=sop_class_uid,
                path=path,
                destination=destination,
            )
            session.add(row)
        elif row.state in (OutboxState.PENDING, OutboxState.SENDING) and not replace:
            continue
        _requeue(row, now, path)
        count += 1
    return count


def queue_many(
    session: Session,
    *,
    study_id: int | None,
    kind: OutboxKind,
    objects: Iterable[tuple[str, str, str]],
    destination: str,
) -> int:
    """Forward ``(sop_uid, sop_class_uid, path)`` objects to one destination.

    Objects already on their way are left alone; delivered or failed ones go again (a
    series sent again is forwarded again). Returns how many rows were queued.
    """
    objects = list(objects)
    existing = {
        row.sop_uid: row
        for row in session.scalars(
            select(Dispatch).where(
                Dispatch.destination == destination,
                Dispatch.sop_uid.in_([sop for sop, _, _ in objects]),
            )
        )
    }
    now = utcnow()
    count = 0
    for sop_uid, sop_class_uid, path in objects:
        row = existing.get(sop_uid)
        if row is None:
            row = Dispatch(
                study_id=study_id,
                kind=kind,
                sop_uid=sop_uid,
                sop_class_uid=sop_class_uid,
                path=path,
                destination=destination,
            )
            session.add(row)
        elif row.state in (OutboxState.PENDING, OutboxState.SENDING):
            continue
        _requeue(row, now, path)
        count += 1
    return count


def supersede(session: Session, sop_uid: str, by_sop_uid: str) -> int:
    """Withhold the waiting deliveries of a result a newer one replaces (state
    ``superseded``); returns how many. Rows already sending, sent or failed are left."""
    rows = session.scalars(
        select(Dispatch).where(
            Dispatch.sop_uid == sop_uid, Dispatch.state == OutboxState.PENDING
        )
    ).all()
    for row in rows:
        row.state = OutboxState.SUPERSEDED
        row.last_error = f"superseded by {by_sop_uid}; not sent"
    return len(rows)


def resend(db: Database, dispatch_ids: Iterable[int], by: str = "admin") -> int:
    """Queue chosen rows again (any state but ``sending``); returns how many."""
    now = utcnow()
    count = 0
    with db.session() as s:
        for row in s.scalars(select(Dispatch).where(Dispatch.id.in_(list(dispatch_ids)))):
            if row.state == OutboxState.SENDING:
                continue
            _requeue(row, now)
            count += 1
            add_event(
                s,
                EventKind.RESEND,
                f"{row.kind} {row.sop_uid} to {row.destination} re-queued by {by}",
                study_uid=_study_uid(s, row),
            )
    return count


def reset_interrupted(db: Database) -> int:
    """Rows left ``sending`` by a stopped node are pending again; returns how many."""
    with db.session() as s:
        rows = s.scalars(select(Dispatch).where(Dispatch.state == OutboxState.SENDING)).all()
        for row in rows:
            row.state = OutboxState.PENDING
        return len(rows)


def claim_due(db: Database, limit: int) -> list[Dispatch]:
    """Due pending rows, marked ``sending`` (committed) and returned detached."""
    now = utcnow()
    with db.session() as s:
        rows = s.scalars(
            select(Dispatch)
            .where(Dispatch.state == OutboxState.PENDING, Dispatch.next_attempt_at <= now)
            .order_by(Dispatch.next_attempt_at, Dispatch.id)
            .limit(limit)
        ).all()
        for row in rows:
            row.state = OutboxState.SENDING
        s.flush()
        for row in rows:
            s.expunge(row)
    return list(rows)


def record_outcomes(
    db: Database,
    rows: Iterable[Dispatch],
    outcomes: Mapping[int, SendOutcome],
    settings: DispatchSettings,
    commit_uid: str | None = None,
) -> None:
    """Record one attempt per row: sent, pending again after a backoff, or failed.

    A retryable outcome fails the row when it has waited ``max_age_s`` since it was
    queued, or used up ``max_attempts``. ``commit_uid`` marks sent rows as awaiting the
    destination's storage commitment report for that transaction.
    """
    policy = send_policy(settings)
    now = utcnow()
    with db.session() as s:
        for detached in rows:
            row = s.get_one(Dispatch, detached.id)
            out = outcomes[row.id]
            row.attempts += 1
            row.last_status = out.status
            row.last_error = None if out.state == "sent" else out.detail
            study_uid = _study_uid(s, row)
            what = f"{row.kind} {row.sop_uid}"
            if out.state == "sent":
                row.state, row.sent_at, row.commit_uid = OutboxState.SENT, now, commit_uid
                add_event(
                    s,
                    EventKind.SENT,
                    f"{what} sent to {row.destination} ({out.detail})",
                    study_uid=study_uid,
                )
                continue
            queued = row.queued_at or row.created_at
            too_old = (now - queued).total_seconds() >= settings.max_age_s
            delay = None if too_old else policy.next_delay_s(row.attempts, out)
            if delay is not None:
                row.state = OutboxState.PENDING
                row.next_attempt_at = now + timedelta(seconds=delay)
                add_event(
                    s,
                    EventKind.SEND_RETRY,
                    f"{what} to {row.destination}: {out.detail}; "
                    f"attempt {row.attempts}, next in {delay:.1f} s",
                    level=EventLevel.WARNING,
                    study_uid=study_uid,
                )
                continue
            row.state = OutboxState.FAILED
            if too_old and out.state == "retry":
                row.last_error = (
                    f"{out.detail}; not delivered within max_age_s="
                    f"{settings.max_age_s:g} s of being queued"
                )
                message = f"{what} to {row.destination} failed: {row.last_error}"
            else:
                message = (
                    f"{what} to {row.destination} failed after {row.attempts} attempts: "
                    f"{out.detail}"
                )
            add_event(
                s, EventKind.SEND_FAILED, message, level=EventLevel.ERROR, study_uid=study_uid
            )


def record_commitment(
    db: Database, transaction_uid: str, committed: set[str], failed: Mapping[str, int]
) -> int:
    """Apply a storage commitment report (PS3.4 J.3.3); returns how many rows it settled.

    Rows of the transaction listed as committed become ``committed``; rows the
    destination failed to keep (``failed``: SOP Instance UID -> FailureReason) are
    queued again. Rows not in ``sent`` are left alone (a late or repeated report).
    """
    now = utcnow()
    settled = 0
    with db.session() as s:
        rows = s.scalars(select(Dispatch).where(Dispatch.commit_uid == transaction_uid)).all()
        for row in rows:
            if row.state != OutboxState.SENT:
                continue
            study_uid = _study_uid(s, row)
            if row.sop_uid in committed:
                row.state, row.committed_at = OutboxState.COMMITTED, now
                settled += 1
                add_event(
                    s,
                    EventKind.COMMITTED,
                    f"{row.kind} {row.sop_uid} committed by {row.destination}",
                    study_uid=study_uid,
                )
            elif row.sop_uid in failed:
                reason = failed[row.sop_uid]
                _requeue(row, now)
                row.last_error = f"storage commitment failed (reason 0x{reason:04X}); resending"
                settled += 1
                add_event(
                    s,
                    EventKind.COMMIT_FAILED,
                    f"{row.kind} {row.sop_uid}: {row.destination} did not commit it "
                    f"(reason 0x{reason:04X}); sending again",
                    level=EventLevel.WARNING,
                    study_uid=study_uid,
                )
    return settled


def transaction_known(db: Database, transaction_uid: str) -> bool:
    """Whether any row waits for the commitment report of ``transaction_uid``."""
    with db.session() as s:
        return (
            s.scalars(select(Dispatch.id).where(Dispatch.commit_uid == transaction_uid)).first()
            is not None
        )
