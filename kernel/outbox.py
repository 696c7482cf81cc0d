"""The outbox: the one writer of the ``dispatches`` table.

Every object the node delivers (a result it made, an original it forwards) is a row per
(SOP instance, destination). Routing queues forwards, the job runner queues results, the
dispatcher claims due rows and records what each C-STORE answered, storage commitment
confirms or returns rows, an admin resends, and a reviewer approves or rejects held
results. All of them move rows only through the functions here, so a row re-queued for
any reason gets the same fresh fields (state, attempts, due time, the time its
``max_age_s`` counts from, last error, commitment).

Review before sending: ``queue(..., held=...)`` creates a result's rows for those
destinations ``held``; the dispatcher never claims them, a resend leaves them alone, and
only ``approve`` (-> pending, sent at once) or ``reject`` (-> rejected, never sent) moves
them, recording who, when and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from db.models import Dispatch, Instance, Result, Series, Study, utcnow
from db.session import Database
from kernel.events import add_event, add_event_on
from kernel.retry import RetryPolicy
from kernel.settings import DispatchSettings
from kernel.vocabulary import (
    REVIEW_STATES,
    EventKind,
    EventLevel,
    OutboxKind,
    OutboxState,
    SendCause,
)

Verdict = Literal["sent", "retry", "failed"]


@dataclass(frozen=True)
class SendOutcome:
    """What one delivery attempt of one row came to.

    ``state``: ``sent`` (delivered, warnings included), ``retry`` (a later attempt may
    succeed: out of resources, no association) or ``failed`` (a retry cannot change it).
    ``status`` is the DIMSE status when the destination answered one. ``cause``: who
    decided (``SendCause``); None when the sender does not say: such a retry counts
    toward ``max_attempts`` like a refusal, and health reads ``last_status`` as before.
    """

    state: Verdict
    status: int | None
    detail: str
    cause: SendCause | None = None


def _refused_for_good(outcome: object) -> bool:
    return isinstance(outcome, SendOutcome) and outcome.state == "failed"


def send_policy(settings: DispatchSettings) -> RetryPolicy:
    """The retry policy of sends: ``dispatch.*`` with 50 % jitter; refusals are final.
    ``max_attempts`` counts only attempts the destination answered (``record_outcomes``)."""
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
    row.sending_since = row.sending_by = None
    row.attempts = 0
    row.unanswered = 0
    row.next_attempt_at = now
    row.queued_at = now
    row.last_error = None
    row.last_status = None
    row.last_cause = None
    row.commit_uid = None
    if path is not None:
        row.path = path


def _hold(row: Dispatch, now: datetime, path: str | None = None) -> None:
    """A fresh delivery that waits for a reviewer instead of the dispatcher."""
    _requeue(row, now, path)
    row.state = OutboxState.HELD
    row.reviewed_by = row.reviewed_at = row.review_note = None


def _study_uid(session: Session, row: Dispatch) -> str | None:
    if row.study_id is None:
        return None
    study = session.get(Study, row.study_id)
    return study.study_uid if study else None


@dataclass(frozen=True)
class Carried:
    """What an outbox row carries, for event messages and the status page: the result
    (pipeline, result type, job) or forwarded original, and its source series."""

    what: str  # e.g. "tumor SEG 1.2.3" or "forwarded CT 1.2.4"
    study_uid: str | None
    series_uid: str | None
    job_id: int | None


def _series_name(series: Series | None) -> str:
    if series is None:
        return "an unknown series"
    parts = [
        str(series.series_number) if series.series_number is not None else "",
        (series.series_description or "").strip(),
    ]
    return " ".join(["series", *(p for p in parts if p)])


def carried(session: Session, row: Dispatch) -> Carried:
    """What ``row`` carries (one or two reads; callers cache per SOP Instance UID)."""
    study_uid = _study_uid(session, row)
    if row.kind == OutboxKind.RESULT:
        result = session.scalars(select(Result).where(Result.sop_uid == row.sop_uid)).first()
        series = None
        if result is not None:
            series = session.scalars(
                select(Series).where(Series.series_uid == result.source_series_uid)
            ).first()
        return _describe(row, study_uid, result, series)
    series = session.scalars(
        select(Series)
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.sop_uid == row.sop_uid)
    ).first()
    return _describe(row, study_uid, None, series)


def carried_many(db: Database, rows: Iterable[Dispatch]) -> dict[str, Carried]:
    """``carried`` for a sender's chunk of rows in four reads at most, by SOP Instance
    UID (the ``cache`` of ``record_outcomes``: recording a row then reads nothing more)."""
    rows = list(rows)
    if not rows:
        return {}
    results_of = [r.sop_uid for r in rows if r.kind == OutboxKind.RESULT]
    forwards = [r.sop_uid for r in rows if r.kind != OutboxKind.RESULT]
    study_ids = {r.study_id for r in rows if r.study_id is not None}
    with db.session() as s:
        study_uids: dict[int, str] = {
            study_id: study_uid
            for study_id, study_uid in s.execute(
                select(Study.id, Study.study_uid).where(Study.id.in_(study_ids))
            ).all()
        }
        results: dict[str, Result] = {}
        for result in s.scalars(select(Result).where(Result.sop_uid.in_(results_of))):
            results.setdefault(result.sop_uid, result)
        sources: dict[str, Series] = {}
        source_uids = {r.source_series_uid for r in results.values()}
        for series in s.scalars(select(Series).where(Series.series_uid.in_(source_uids))):
            sources.setdefault(series.series_uid, series)
        series_of: dict[str, Series] = {}
        for sop_uid, series in s.execute(
            select(Instance.sop_uid, Series)
            .join(Series, Instance.series_id == Series.id)
            .where(Instance.sop_uid.in_(forwards))
        ).all():
            series_of.setdefault(sop_uid, series)
        out = {}
        for row in rows:
            study_uid = study_uids.get(row.study_id) if row.study_id is not None else None
            if row.kind == OutboxKind.RESULT:
                result = results.get(row.sop_uid)
                source = sources.get(result.source_series_uid) if result is not None else None
                out[row.sop_uid] = _describe(row, study_uid, result, source)
            else:
                out[row.sop_uid] = _describe(row, study_uid, None, series_of.get(row.sop_uid))
        return out


def _describe(
    row: Dispatch, study_uid: str | None, result: Result | None, series: Series | None
) -> Carried:
    if row.kind == OutboxKind.RESULT:
        if result is None:
            return Carried(f"result {row.sop_uid}", study_uid, None, None)
        kind = result.result_type if result.result_type == "RTSTRUCT" else result.kind
        return Carried(
            f"{result.pipeline or 'result'} {kind} {row.sop_uid} on {_series_name(series)}",
            study_uid,
            result.source_series_uid,
            result.job_id,
        )
    return Carried(
        f"forwarded {row.sop_uid} of {_series_name(series)}",
        study_uid,
        series.series_uid if series else None,
        None,
    )


def _event(
    session: Session,
    row: Dispatch,
    kind: EventKind,
    message: str,
    cache: dict[str, Carried],
    level: EventLevel = EventLevel.INFO,
) -> None:
    """An event about ``row`` naming what it carries (``{what}`` in ``message``)."""
    if row.sop_uid not in cache:
        cache[row.sop_uid] = carried(session, row)
    c = cache[row.sop_uid]
    add_event(
        session,
        kind,
        message.replace("{what}", c.what),
        level=level,
        study_uid=c.study_uid,
        series_uid=c.series_uid,
        job_id=c.job_id,
        data={"dispatch_id": row.id, "destination": row.destination},
    )


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
    held: Iterable[str] = (),
) -> int:
    """Queue delivery of one object to each destination; returns how many rows were queued.

    A row that already exists for (SOP instance, destination) is queued again with the
    new file (``replace``), unless it is still waiting to go (pending or sending). With
    ``replace=False`` only rows that ended (sent, committed, failed) are queued again.
    Rows for the destinations in ``held`` are created (or queued again) ``held``: they
    wait for a reviewer's ``approve`` or ``reject``.
    """
    held = set(held)
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
        if destination in held:
            _hold(row, now, path)
        else:
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
    ``superseded``); returns how many. Pending and held rows are withheld; rows already
    sending, sent, failed or rejected are left."""
    rows = session.scalars(
        select(Dispatch).where(
            Dispatch.sop_uid == sop_uid,
            Dispatch.state.in_((OutboxState.PENDING, OutboxState.HELD)),
        )
    ).all()
    for row in rows:
        row.state = OutboxState.SUPERSEDED
        row.last_error = f"superseded by {by_sop_uid}; not sent"
    return len(rows)


def resend(db: Database, dispatch_ids: Iterable[int], by: str = "admin") -> int:
    """Queue chosen rows again; returns how many. Rows being sent, and rows held for or
    rejected by a reviewer (only ``approve`` releases those), are left alone."""
    now = utcnow()
    count = 0
    cache: dict[str, Carried] = {}
    with db.session() as s:
        for row in s.scalars(select(Dispatch).where(Dispatch.id.in_(list(dispatch_ids)))):
            if row.state == OutboxState.SENDING or row.state in REVIEW_STATES:
                continue
            _requeue(row, now)
            count += 1
            _event(
                s, row, EventKind.RESEND, f"{{what}} to {row.destination} re-queued by {by}", cache
            )
    return count


class ReviewError(ValueError):
    """A review action that does not apply (nothing held, no reason given)."""


def _held_rows(
    session: Session, sop_uid: str, destinations: Iterable[str] | None
) -> list[Dispatch]:
    query = select(Dispatch).where(Dispatch.sop_uid == sop_uid, Dispatch.state == OutboxState.HELD)
    if destinations is not None:
        query = query.where(Dispatch.destination.in_(list(destinations)))
    return list(session.scalars(query.order_by(Dispatch.id)))


def approve(
    db: Database,
    sop_uid: str,
    by: str,
    note: str | None = None,
    destinations: Iterable[str] | None = None,
) -> int:
    """A reviewer approves a held result: its held rows (all, or those to
    ``destinations``) become pending and are sent at once. Returns how many.

    Raises ``ReviewError`` when none of its rows is held.
    """
    now = utcnow()
    with db.session() as s:
        rows = _held_rows(s, sop_uid, destinations)
        if not rows:
            raise ReviewError(f"result {sop_uid} has no send waiting for review")
        cache: dict[str, Carried] = {}
        for row in rows:
            _requeue(row, now)
            row.reviewed_by, row.reviewed_at, row.review_note = by, now, note or None
        names = ", ".join(r.destination for r in rows)
        _event(
            s,
            rows[0],
            EventKind.RESULT_APPROVED,
            f"{{what}} approved by {by} for {names}" + (f": {note}" if note else ""),
            cache,
        )
        return len(rows)


def reject(
    db: Database,
    sop_uid: str,
    by: str,
    reason: str,
    destinations: Iterable[str] | None = None,
) -> int:
    """A reviewer rejects a held result: its held rows (all, or those to
    ``destinations``) become ``rejected`` and are never sent. Returns how many.

    Raises ``ReviewError`` without a reason or when none of its rows is held.
    """
    reason = (reason or "").strip()
    if not reason:
        raise ReviewError("a rejection needs a reason (it is recorded and shown)")
    now = utcnow()
    with db.session() as s:
        rows = _held_rows(s, sop_uid, destinations)
        if not rows:
            raise ReviewError(f"result {sop_uid} has no send waiting for review")
        cache: dict[str, Carried] = {}
        for row in rows:
            row.state = OutboxState.REJECTED
            row.reviewed_by, row.reviewed_at, row.review_note = by, now, reason
            row.last_error = f"rejected by {by}: {reason}; not sent"
        names = ", ".join(r.destination for r in rows)
        _event(
            s,
            rows[0],
            EventKind.RESULT_REJECTED,
            f"{{what}} rejected by {by} (not sent to {names}): {reason}",
            cache,
            level=EventLevel.WARNING,
        )
        return len(rows)


def due_now(db: Database, destination: str, unanswered_only: bool = False) -> int:
    """Pending rows to ``destination`` waiting out a retry backoff become due now (the
    destination answers again: deliveries resume at once); returns how many.
    ``unanswered_only``: only rows whose last attempt got no answer (a sender's
    association was just accepted: rows the destination refused keep their backoff).

    Failed rows stay failed: a row the destination did not answer fails only at
    ``max_age_s``, so a failed row was refused, or waited longer than the node
    promised, and a user may have seen it failed and acted on it; sending it again
    unasked could duplicate what they did. ``resend`` sends it again when they choose."""
    now = utcnow()
    with db.session() as s:
        query = select(Dispatch).where(
            Dispatch.destination == destination,
            Dispatch.state == OutboxState.PENDING,
            Dispatch.next_attempt_at > now,
        )
        if unanswered_only:
            query = query.where(Dispatch.last_cause == SendCause.NO_ANSWER)
        rows = s.scalars(query).all()
        for row in rows:
            row.next_attempt_at = now
        return len(rows)


def reset_interrupted(db: Database) -> int:
    """Rows left ``sending`` by a stopped node are pending again; returns how many.

    Each outcome is recorded as its C-STORE is answered, so these are the rows whose send
    was in flight (it may or may not have arrived: it goes again) and rows claimed but not
    yet sent. The event names the sender and since when it held them."""
    cache: dict[str, Carried] = {}
    with db.session() as s:
        rows = s.scalars(select(Dispatch).where(Dispatch.state == OutboxState.SENDING)).all()
        for row in rows:
            held = (
                f" by {row.sending_by} since {row.sending_since:%Y-%m-%d %H:%M:%S}"
                if row.sending_by and row.sending_since
                else ""
            )
            row.state = OutboxState.PENDING
            row.sending_since = row.sending_by = None
            _event(
                s,
                row,
                EventKind.SEND_RETRY,
                f"{{what}} to {row.destination}: was being sent{held} when the node stopped; "
                "it goes again",
                cache,
                level=EventLevel.WARNING,
            )
        return len(rows)


def claim_due(
    db: Database,
    limit: int,
    destination: str | None = None,
    sender: str | None = None,
    exclude: Iterable[int] = (),
    destinations_not: Iterable[str] | None = None,
) -> list[Dispatch]:
    """Due pending rows (to ``destination``, or to none of ``destinations_not``, or any),
    marked ``sending`` by ``sender`` now, committed before they are returned (detached):
    a sender holds its rows in the database before its association opens. Rows in
    ``exclude`` are left (already tried by this caller). Concurrent claimers get
    disjoint rows (FOR UPDATE SKIP LOCKED where the database has it)."""
    now = utcnow()
    query = select(Dispatch).where(
        Dispatch.state == OutboxState.PENDING, Dispatch.next_attempt_at <= now
    )
    if destination is not None:
        query = query.where(Dispatch.destination == destination)
    if destinations_not is not None:
        query = query.where(Dispatch.destination.not_in(list(destinations_not)))
    exclude = list(exclude)
    if exclude:
        query = query.where(Dispatch.id.not_in(exclude))
    with db.session() as s:
        rows = s.scalars(
            query.order_by(Dispatch.next_attempt_at, Dispatch.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            row.state = OutboxState.SENDING
            row.sending_since, row.sending_by = now, sender
        s.flush()
        for row in rows:
            s.expunge(row)
    return list(rows)


def release_unsent(db: Database, rows: Iterable[Dispatch]) -> int:
    """Rows a sender claimed and did not try (it was asked to stop, or its association
    ended before their turn): pending again, as they were, no attempt counted. Returns
    how many."""
    ids = [row.id for row in rows]
    if not ids:
        return 0
    with db.session() as s:
        claimed = s.scalars(
            select(Dispatch).where(Dispatch.id.in_(ids), Dispatch.state == OutboxState.SENDING)
        ).all()
        for row in claimed:
            row.state = OutboxState.PENDING
            row.sending_since = row.sending_by = None
        return len(claimed)


def retry_claimed(
    db: Database, rows: Iterable[Dispatch], detail: str, settings: DispatchSettings
) -> int:
    """Rows a sender claimed and could not finish (it failed itself, not the
    destination): those still its claim get a retryable attempt with ``detail`` as the
    reason (backoff as for any retry, cause ``node``); rows it recorded already are
    left. Returns how many."""
    rows = list(rows)
    if not rows:
        return 0
    with db.session() as s:
        current = {
            row.id: row
            for row in s.scalars(select(Dispatch).where(Dispatch.id.in_([r.id for r in rows])))
        }
        mine = [r for r in rows if r.id in current and _still_claimed(current[r.id], r)]
    if mine:
        record_outcomes(
            db,
            mine,
            {r.id: SendOutcome("retry", None, detail, SendCause.NODE) for r in mine},
            settings,
        )
    return len(mine)


def record_outcomes(
    db: Database,
    rows: Iterable[Dispatch],
    outcomes: Mapping[int, SendOutcome],
    settings: DispatchSettings,
    commit_uid: str | None = None,
    cache: dict[str, Carried] | None = None,
) -> None:
    """Record one attempt per row: sent, pending again after a backoff, or failed.

    A retryable outcome fails the row when it has waited ``max_age_s`` since it was
    queued. One the destination did not answer (``SendCause.NO_ANSWER``: no
    association, refused connection, timeout) is retried until then, however many
    attempts that takes (a destination down for a maintenance window of hours); the
    others (a refusal it answered, e.g. 0xA7xx out of resources, or an error of this
    node) fail the row after ``max_attempts`` of them. The delay grows with every
    attempt, up to ``retry_max_s``. ``commit_uid`` marks sent rows as awaiting the
    destination's storage commitment report for that transaction. ``cache``: what rows
    carry (``carried``), kept by a caller that records its rows one at a time.
    """
    rows = list(rows)
    cache = {} if cache is None else cache
    if rows and all(outcomes[r.id].state == "sent" for r in rows):
        _record_sent(db, rows, outcomes, commit_uid, cache)
        return
    policy = send_policy(settings)
    now = utcnow()
    with db.session() as s:
        for detached in rows:
            row = s.get_one(Dispatch, detached.id)
            out = outcomes[row.id]
            if not _still_claimed(row, detached):
                _event(s, row, EventKind.SEND_RETRY, _REPLACED.format(row.destination), cache)
                continue
            row.sending_since = row.sending_by = None
            row.attempts += 1
            row.last_attempt_at = now
            row.last_status = out.status
            row.last_cause = out.cause or (SendCause.DESTINATION if out.state == "sent" else None)
            unanswered = out.state == "retry" and out.cause == SendCause.NO_ANSWER
            row.unanswered = (row.unanswered or 0) + int(unanswered)
            row.last_error = None if out.state == "sent" else out.detail
            if out.state == "sent":
                row.state, row.sent_at, row.commit_uid = OutboxState.SENT, now, commit_uid
                _event(
                    s,
                    row,
                    EventKind.SENT,
                    f"{{what}} sent to {row.destination} ({out.detail})",
                    cache,
                )
                continue
            queued = row.queued_at or row.created_at
            too_old = (now - queued).total_seconds() >= settings.max_age_s
            if too_old:
                delay = None
            elif unanswered:  # max_age_s bounds these, not max_attempts
                delay = policy.delay_s(row.attempts)
            else:
                delay = policy.next_delay_s(row.attempts, out, row.attempts - row.unanswered)
            if delay is not None:
                row.state = OutboxState.PENDING
                row.next_attempt_at = now + timedelta(seconds=delay)
                _event(
                    s,
                    row,
                    EventKind.SEND_RETRY,
                    f"{{what}} to {row.destination}: {out.detail}; "
                    f"attempt {row.attempts}, next in {delay:.1f} s",
                    cache,
                    level=EventLevel.WARNING,
                )
                continue
            row.state = OutboxState.FAILED
            if too_old and out.state == "retry":
                row.last_error = (
                    f"{out.detail}; not delivered within max_age_s="
                    f"{settings.max_age_s:g} s of being queued"
                )
                message = f"{{what}} to {row.destination} failed: {row.last_error}"
            elif out.state == "retry" and row.unanswered:
                message = (
                    f"{{what}} to {row.destination} failed after {row.attempts} attempts "
                    f"({row.unanswered} not answered; max_attempts="
                    f"{settings.max_attempts} bounds the others): {out.detail}"
                )
            else:
                message = (
                    f"{{what}} to {row.destination} failed after {row.attempts} attempts: "
                    f"{out.detail}"
                )
            _event(s, row, EventKind.SEND_FAILED, message, cache, level=EventLevel.ERROR)


# A row queued again while it was being sent (a newer version of the result: ``queue``
# with ``replace``) is no longer the sender's claim: what the sender sent was the older
# file, so the row keeps waiting for the newer one instead of being marked sent.
_REPLACED = (
    "{{what}}: a newer version was queued for {} while the older file was being sent; "
    "the newer version goes next"
)


def _still_claimed(row: Dispatch, claimed: Dispatch) -> bool:
    """Whether ``row`` (as it is now) is still the claim ``claimed`` (as ``claim_due``
    returned it): state ``sending``, same sender, same claim time."""
    return (
        row.state == OutboxState.SENDING
        and row.sending_by == claimed.sending_by
        and row.sending_since == claimed.sending_since
    )


# The UPDATE of ``_record_sent``, built once (building a statement costs more than running it).
_SENT = (
    Dispatch.__table__.update()
    .where(
        Dispatch.__table__.c.id == bindparam("row_id"),
        Dispatch.__table__.c.state == OutboxState.SENDING,
        Dispatch.__table__.c.sending_since == bindparam("claimed_at"),
    )
    .values(
        state=OutboxState.SENT, sent_at=bindparam("now"), commit_uid=bindparam("commit_uid"),
        sending_since=None, sending_by=None, attempts=Dispatch.__table__.c.attempts + 1,
        last_attempt_at=bindparam("now"), last_status=bindparam("status"), last_error=None,
        last_cause=bindparam("cause"),
    )
)  # fmt: skip


def _record_sent(
    db: Database,
    rows: list[Dispatch],
    outcomes: Mapping[int, SendOutcome],
    commit_uid: str | None,
    cache: dict[str, Carried],
) -> None:
    """``record_outcomes`` when every row was delivered, the common case, with plain
    statements (an UPDATE and an event INSERT per row) in one transaction: the
    dispatcher records each C-STORE as it is answered, and the ORM's read and unit of
    work cost more CPU than the C-STORE itself."""
    now = utcnow()
    with db.engine.begin() as conn:
        session: Session | None = None  # only for what a row carries, when not cached
        try:
            for row in rows:
                out = outcomes[row.id]
                updated = conn.execute(
                    _SENT,
                    {
                        "row_id": row.id,
                        "now": now,
                        "commit_uid": commit_uid,
                        "status": out.status,
                        "cause": out.cause or SendCause.DESTINATION,
                        "claimed_at": row.sending_since,
                    },
                ).rowcount
                if row.sop_uid not in cache:
                    session = session or Session(bind=conn)
                    cache[row.sop_uid] = carried(session, row)
                c = cache[row.sop_uid]
                add_event_on(
                    conn,
                    EventKind.SENT if updated else EventKind.SEND_RETRY,
                    f"{c.what} sent to {row.destination} ({out.detail})"
                    if updated
                    else _REPLACED.format(row.destination).replace("{what}", c.what),
                    study_uid=c.study_uid,
                    series_uid=c.series_uid,
                    job_id=c.job_id,
                    data={"dispatch_id": row.id, "destination": row.destination},
                )
        finally:
            if session is not None:
                session.close()


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
    cache: dict[str, Carried] = {}
    with db.session() as s:
        rows = s.scalars(select(Dispatch).where(Dispatch.commit_uid == transaction_uid)).all()
        for row in rows:
            if row.state != OutboxState.SENT:
                continue
            if row.sop_uid in committed:
                row.state, row.committed_at = OutboxState.COMMITTED, now
                settled += 1
                _event(
                    s, row, EventKind.COMMITTED, f"{{what}} committed by {row.destination}", cache
                )
            elif row.sop_uid in failed:
                reason = failed[row.sop_uid]
                _requeue(row, now)
                row.last_error = f"storage commitment failed (reason 0x{reason:04X}); resending"
                settled += 1
                _event(
                    s,
                    row,
                    EventKind.COMMIT_FAILED,
                    f"{{what}}: {row.destination} did not commit it "
                    f"(reason 0x{reason:04X}); sending again",
                    cache,
                    level=EventLevel.WARNING,
                )
    return settled


def transaction_known(db: Database, transaction_uid: str) -> bool:
    """Whether any row waits for the commitment report of ``transaction_uid``."""
    with db.session() as s:
        return (
            s.scalars(select(Dispatch.id).where(Dispatch.commit_uid == transaction_uid)).first()
            is not None
        )
