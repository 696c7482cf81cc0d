"""What the pages and the JSON API show, as plain dicts (one source for both).

Every function takes an open session and returns JSON-ready data; patient IDs only when
``admin`` is true, patient names never.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from db.models import Dispatch, Event, Job, Result, Series, Study
from kernel.vocabulary import (
    ACTIVE_JOB_STATES,
    RUNNING_JOB_STATES,
    UNDELIVERED_STATES,
    JobState,
    OutboxKind,
    OutboxState,
)

STUDY_STATUSES = ("failed", "active", "done", "received")


def as_utc(value: datetime | None) -> str | None:
    """ISO 8601 with the UTC offset, or None."""
    return value.isoformat() if value else None


def _midnight() -> datetime:
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def job_dict(job: Job, study_uid: str | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "study_uid": study_uid,
        "pipeline": job.pipeline,
        "state": job.state,
        "priority": "urgent" if job.priority > 0 else "normal",
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "progress": job.progress,
        "worker": job.worker,
        "device": job.device,
        "queued_at": as_utc(job.queued_at),
        "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
        "last_error": job.last_error,
    }


def dashboard(s: Session) -> dict[str, Any]:
    today = _midnight()
    received = s.scalar(select(func.count()).where(Study.first_received_at >= today))
    processed = s.scalar(
        select(func.count(func.distinct(Job.study_id))).where(
            Job.state == JobState.DONE, Job.finished_at >= today
        )
    )
    failed = s.scalar(
        select(func.count(func.distinct(Job.study_id))).where(
            Job.state == JobState.FAILED, Job.finished_at >= today
        )
    )
    queued = s.scalar(select(func.count()).where(Job.state == JobState.QUEUED))
    running = s.execute(
        select(Job, Study.study_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state.in_(RUNNING_JOB_STATES))
        .order_by(Job.started_at)
    ).all()
    pending = dict(
        s.execute(
            select(Dispatch.destination, func.count())
            .where(Dispatch.state.in_(UNDELIVERED_STATES))
            .group_by(Dispatch.destination)
        ).all()
    )
    errors = s.scalars(
        select(Event).where(Event.level == "error").order_by(Event.id.desc()).limit(10)
    ).all()
    return {
        "today": {"received": received, "processed": processed, "failed": failed},
        "queue_length": queued,
        "running": [job_dict(j, uid) for j, uid in running],
        "pending_sends": pending,
        "errors": [event_dict(e) for e in errors],
    }


def event_dict(e: Event) -> dict[str, Any]:
    return {
        "at": as_utc(e.at),
        "level": e.level,
        "kind": e.kind,
        "study_uid": e.study_uid,
        "series_uid": e.series_uid,
        "job_id": e.job_id,
        "message": e.message,
    }


def _status_filter(status: str) -> Any:
    has_job = lambda *states: exists().where(  # noqa: E731
        Job.study_id == Study.id, Job.state.in_(states)
    )
    if status == "failed":
        return has_job(JobState.FAILED)
    if status == "active":
        return has_job(*ACTIVE_JOB_STATES)
    if status == "done":
        return and_(has_job(JobState.DONE), ~has_job(JobState.FAILED, *ACTIVE_JOB_STATES))
    return ~exists().where(Job.study_id == Study.id)


def studies(
    s: Session,
    *,
    admin: bool,
    q: str = "",
    date: str = "",
    status: str = "",
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """One page of studies, newest first; ``q`` matches UID, accession (and patient ID)."""
    query = select(Study)
    if q:
        like = f"%{q}%"
        fields = [Study.study_uid.like(like), Study.accession_number.like(like)]
        if admin:
            fields.append(Study.patient_id.like(like))
        query = query.where(or_(*fields))
    if date:
        query = query.where(Study.study_date == date.replace("-", ""))
    if status in STUDY_STATUSES:
        query = query.where(_status_filter(status))
    rows = s.scalars(
        query.order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(min(max(limit, 1), 1000))
        .offset(max(offset, 0))
    ).all()
    ids = [r.id for r in rows]
    job_states: dict[int, set[str]] = {}
    series_counts: dict[int, int] = {}
    if ids:
        for sid, state in s.execute(
            select(Job.study_id, Job.state).where(Job.study_id.in_(ids)).distinct()
        ):
            job_states.setdefault(sid, set()).add(state)
        series_counts = dict(
            s.execute(
                select(Series.study_id, func.count())
                .where(Series.study_id.in_(ids))
                .group_by(Series.study_id)
            ).all()
        )
    items = []
    for st in rows:
        states = job_states.get(st.id, set())
        items.append(
            {
                "study_uid": st.study_uid,
                "study_date": st.study_date,
                "accession_number": st.accession_number,
                "patient_id": st.patient_id if admin else None,
                "study_description": st.study_description,
                "first_received_at": as_utc(st.first_received_at),
                "last_received_at": as_utc(st.last_received_at),
                "series_count": series_counts.get(st.id, 0),
                "status": _status_of(states),
                "note": st.note,
            }
        )
    return {"items": items, "limit": limit, "offset": offset}


def _status_of(states: set[str]) -> str:
    if JobState.FAILED in states:
        return "failed"
    if states & set(ACTIVE_JOB_STATES):
        return "active"
    if JobState.DONE in states:
        return "done"
    return "received"


def _span(a: datetime | None, b: datetime | None) -> float | None:
    return (b - a).total_seconds() if a and b else None


def study_detail(s: Session, study_uid: str, *, admin: bool) -> dict[str, Any] | None:
    st = s.scalars(select(Study).where(Study.study_uid == study_uid)).first()
    if st is None:
        return None
    series = s.scalars(
        select(Series).where(Series.study_id == st.id).order_by(Series.series_number, Series.id)
    ).all()
    jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
    results = s.scalars(select(Result).where(Result.study_id == st.id).order_by(Result.id)).all()
    sends = s.scalars(
        select(Dispatch).where(Dispatch.study_id == st.id).order_by(Dispatch.id)
    ).all()
    events = s.scalars(
        select(Event).where(Event.study_uid == study_uid).order_by(Event.at, Event.id).limit(500)
    ).all()

    def first(values: list[datetime | None], pick: Any = min) -> datetime | None:
        present = [v for v in values if v is not None]
        return pick(present) if present else None

    steps = [
        ("received", st.first_received_at),
        ("complete", first([x.completed_at for x in series], max)),
        ("classified", first([x.routed_at for x in series], max)),
        ("queued", first([j.queued_at for j in jobs])),
        ("inferred", first([j.finished_at for j in jobs if j.state == JobState.DONE], max)),
        ("sent", first([d.sent_at for d in sends if d.kind == OutboxKind.RESULT], max)),
    ]
    timeline = []
    previous: datetime | None = None
    for name, at in steps:
        timeline.append({"step": name, "at": as_utc(at), "after_s": _span(previous, at)})
        previous = at or previous
    return {
        "study_uid": st.study_uid,
        "patient_id": st.patient_id if admin else None,
        "accession_number": st.accession_number,
        "study_date": st.study_date,
        "study_description": st.study_description,
        "note": st.note,
        "timeline": timeline,
        "total_s": _span(st.first_received_at, first([t for _, t in steps], max)),
        "series": [
            {
                "series_uid": x.series_uid,
                "series_number": x.series_number,
                "series_description": x.series_description,
                "modality": x.modality,
                "state": x.state,
                "instances": x.instance_count,
                "phase": x.phase,
                "phase_confidence": x.phase_confidence,
                "phase_reasons": x.phase_reasons or [],
                "matched_rule": x.matched_rule,
                "completed_at": as_utc(x.completed_at),
            }
            for x in series
        ],
        "jobs": [job_dict(j, st.study_uid) for j in jobs],
        "results": [
            {
                "id": r.id,
                "job_id": r.job_id,
                "kind": r.kind,
                "sop_uid": r.sop_uid,
                "source_series_uid": r.source_series_uid,
                "created_at": as_utc(r.created_at),
                "pipeline": r.pipeline,
                "result_type": r.result_type,
                "superseded_by": r.superseded_by,
                "superseded_at": as_utc(r.superseded_at),
            }
            for r in results
        ],
        "dispatches": [dispatch_dict(d) for d in sends],
        "events": [event_dict(e) for e in events],
    }


def dispatch_dict(d: Dispatch) -> dict[str, Any]:
    return {
        "id": d.id,
        "kind": d.kind,
        "sop_uid": d.sop_uid,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "sent_at": as_utc(d.sent_at),
        "next_attempt_at": as_utc(d.next_attempt_at),
    }


def queue(s: Session, failed_days: int = 7) -> dict[str, Any]:
    since = datetime.now(UTC) - timedelta(days=failed_days)
    out: dict[str, Any] = {}
    for key, states, order in (
        ("running", RUNNING_JOB_STATES, Job.started_at),
        ("queued", (JobState.QUEUED,), Job.priority.desc()),
        ("failed", (JobState.FAILED,), Job.finished_at.desc()),
    ):
        query = (
            select(Job, Study.study_uid)
            .join(Study, Study.id == Job.study_id)
            .where(Job.state.in_(states))
            .order_by(order, Job.id)
            .limit(200)
        )
        if key == "failed":
            query = query.where(Job.finished_at >= since)
        out[key] = [job_dict(j, uid) for j, uid in s.execute(query).all()]
    out["counts"] = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    out["series"] = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
    out["dispatches"] = dict(
        s.execute(select(Dispatch.state, func.count()).group_by(Dispatch.state)).all()
    )
    return out


def destination_counts(s: Session) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for dest, state, n in s.execute(
        select(Dispatch.destination, Dispatch.state, func.count()).group_by(
            Dispatch.destination, Dispatch.state
        )
    ):
        counts.setdefault(dest, {})[state] = n
    return counts


def failed_dispatch_ids(s: Session, destination: str) -> list[int]:
    return list(
        s.scalars(
            select(Dispatch.id).where(
                Dispatch.destination == destination, Dispatch.state == OutboxState.FAILED
            )
        )
    )
