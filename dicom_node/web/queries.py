"""What the pages and the JSON API show, as plain dicts (one source for both).

Every function takes an open session and a ``Viewer`` (who looks: patient IDs only for
operators and admins, patient names never; the pipeline catalog; how reasons name times) and returns
JSON-ready data. Statuses come from ``dicom_node.status``, destination health from
``dicom_node.health``: the pages, the API and the metrics say the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from db.models import Dispatch, Event, Instance, Job, Result, Series, Study, WebhookDelivery
from dicom_node import health as destination_health
from dicom_node import retrieve
from dicom_node import status as statuses
from dicom_node.web import timeline
from dicom_node.web.display import study_heading
from kernel import webhooks
from kernel.catalog import PipelineSpec
from kernel.settings import NodeSettings
from kernel.vocabulary import (
    RUNNING_JOB_STATES,
    UNDELIVERED_STATES,
    DeliveryStatus,
    EventKind,
    EventLevel,
    JobState,
    OutboxKind,
    OutboxState,
)

# Status filters of the studies list: every status, and "in progress" for any of the
# statuses of work still going on.
IN_PROGRESS = "in_progress"
STUDY_FILTERS: dict[str, str] = {
    IN_PROGRESS: "in progress",
    **{str(s): statuses.LABELS[s] for s in DeliveryStatus},
}
_IN_PROGRESS_STATUSES = {
    DeliveryStatus.RECEIVING,
    DeliveryStatus.WAITING,
    DeliveryStatus.QUEUED,
    DeliveryStatus.RUNNING,
    DeliveryStatus.HELD,
    DeliveryStatus.DELIVERY_PENDING,
}
# Warnings that belong on the dashboard's problem list with the errors.
_PROBLEM_KINDS = (
    EventKind.SEND_RETRY,
    EventKind.RESULT_REJECTED,
    EventKind.PIPELINE_NOT_RUN,
    EventKind.DESTINATION_DOWN,
)


def as_utc(value: datetime | None) -> str | None:
    """ISO 8601 with the UTC offset, or None."""
    return value.isoformat() if value else None


@dataclass(frozen=True)
class Viewer:
    """Who looks at the data, and with what: see the module docstring."""

    settings: NodeSettings
    sees_patient_ids: bool = False  # operators and admins
    pipelines: Mapping[str, PipelineSpec] | None = None
    clock: Callable[[datetime], str] = statuses.utc_clock
    study_timeout_s: float | None = None  # the rules': when a waiting study settles

    def health(self, s: Session) -> dict[str, destination_health.DestinationHealth]:
        return destination_health.destination_health(s, self.settings)


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


def health_alerts(
    health: Mapping[str, destination_health.DestinationHealth], clock: Callable[[datetime], str]
) -> list[str]:
    """One line per destination that is unreachable or holds overdue results."""
    lines = []
    for h in health.values():
        if not h.alert:
            continue
        since = f" since {clock(h.since)}" if h.since else ""
        who = h.ae_title if h.kind == "dimse" else "DICOMweb"
        lines.append(f"Destination {h.name} ({who}) {h.state}{since}: {h.reason}")
    return lines


def dashboard(s: Session, viewer: Viewer) -> dict[str, Any]:
    today = _midnight()
    health = viewer.health(s)
    scope = select(Study.id).where(Study.first_received_at >= today)
    today_studies = s.execute(
        select(Study.id, Study.study_uid, Study.last_received_at).where(Study.id.in_(scope))
    ).all()
    states = statuses.study_statuses(
        s,
        today_studies,
        health,
        viewer.pipelines,
        viewer.clock,
        scope=scope,
        study_timeout_s=viewer.study_timeout_s,
    )
    by_status: dict[str, int] = {}
    for st in states.values():
        by_status[str(st.status)] = by_status.get(str(st.status), 0) + 1
    # A failure today: a job that failed, or a send that failed, whatever day the study
    # came in.
    failed_jobs = select(Job.study_id).where(
        Job.state.in_((JobState.FAILED, JobState.EXPIRED)), Job.finished_at >= today
    )
    failed_sends = select(Dispatch.study_id).where(
        Dispatch.state == OutboxState.FAILED,
        Dispatch.last_attempt_at >= today,
        Dispatch.study_id.is_not(None),
    )
    failed = s.scalar(select(func.count()).select_from(failed_jobs.union(failed_sends).subquery()))
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
    held = s.scalar(
        select(func.count(func.distinct(Dispatch.sop_uid))).where(
            Dispatch.state == OutboxState.HELD
        )
    )
    recent = s.scalars(
        select(Event)
        .where(or_(Event.level == EventLevel.ERROR, Event.kind.in_(_PROBLEM_KINDS)))
        .order_by(Event.id.desc())
        .limit(200)
    ).all()
    # One line per problem: the newest of the retries of one study to one destination
    # (a forwarded series retries every instance).
    problems, seen = [], set()
    for e in recent:
        key = (e.kind, e.study_uid, (e.data or {}).get("destination"), e.job_id)
        if e.kind in (EventKind.SEND_RETRY, EventKind.SEND_FAILED) and key in seen:
            continue
        seen.add(key)
        problems.append(e)
        if len(problems) == 10:
            break
    delivered = by_status.get(DeliveryStatus.DELIVERED, 0) + by_status.get(
        DeliveryStatus.DELIVERED_NO_FINDING, 0
    )
    in_progress = sum(by_status.get(str(x), 0) for x in _IN_PROGRESS_STATUSES)
    return {
        "today": {
            "received": len(today_studies),
            "delivered": delivered,
            "processed": delivered,  # the name before issue 15
            "in_progress": in_progress,
            "failed": int(failed or 0),
            "by_status": by_status,
        },
        "queue_length": queued,
        "held_for_review": int(held or 0),
        "running": [job_dict(j, uid) for j, uid in running],
        "pending_sends": pending,
        "alerts": health_alerts(health, viewer.clock),
        "health": {name: h.as_dict() for name, h in health.items()},
        "errors": [event_dict(e) for e in problems],
    }


def event_dict(e: Event, series_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "at": as_utc(e.at),
        "level": e.level,
        "kind": e.kind,
        "study_uid": e.study_uid,
        "series_uid": e.series_uid,
        "series": (series_names or {}).get(e.series_uid or "", None),
        "job_id": e.job_id,
        "message": e.message,
    }


def studies(
    s: Session,
    viewer: Viewer,
    *,
    q: str = "",
    date: str = "",
    status: str = "",
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """One page of studies, newest first; ``q`` matches UID, accession (and patient ID);
    ``status`` is a ``DeliveryStatus`` value or ``in_progress``."""
    query = select(Study)
    if q:
        like = f"%{q}%"
        fields = [
            Study.study_uid.like(like),
            Study.accession_number.like(like),
            Study.study_description.like(like),
        ]
        if viewer.sees_patient_ids:
            fields.append(Study.patient_id.like(like))
        query = query.where(or_(*fields))
    if date:
        query = query.where(Study.study_date == date.replace("-", ""))
    query = query.order_by(Study.last_received_at.desc(), Study.id.desc())
    limit = min(max(limit, 1), 1000)
    offset = max(offset, 0)
    health = viewer.health(s)
    wanted = _status_set(status)
    if wanted is None:
        rows = s.scalars(query.limit(limit).offset(offset)).all()
        states = statuses.study_statuses(
            s, rows, health, viewer.pipelines, viewer.clock, study_timeout_s=viewer.study_timeout_s
        )
    else:
        # Statuses are derived, not stored: narrow the search where SQL can, then scan the
        # newest studies in chunks.
        narrowing = [statuses.candidates(x) for x in wanted]
        if all(c is not None for c in narrowing):
            query = query.where(or_(*narrowing))
        rows, states, skipped, start = [], {}, 0, 0
        while len(rows) < limit and start < 5000:
            chunk = s.scalars(query.limit(200).offset(start)).all()
            if not chunk:
                break
            start += len(chunk)
            found = statuses.study_statuses(
                s,
                chunk,
                health,
                viewer.pipelines,
                viewer.clock,
                study_timeout_s=viewer.study_timeout_s,
            )
            for st in chunk:
                if found[st.id].status not in wanted:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                if len(rows) < limit:
                    rows.append(st)
                    states[st.id] = found[st.id]
    ids = [r.id for r in rows]
    series_counts: dict[int, int] = {}
    if ids:
        series_counts = dict(
            s.execute(
                select(Series.study_id, func.count())
                .where(Series.study_id.in_(ids))
                .group_by(Series.study_id)
            ).all()
        )
    items = []
    for st in rows:
        state = states[st.id]
        items.append(
            {
                "study_uid": st.study_uid,
                "study_date": st.study_date,
                "accession_number": st.accession_number,
                "patient_id": st.patient_id if viewer.sees_patient_ids else None,
                "study_description": st.study_description,
                "first_received_at": as_utc(st.first_received_at),
                "last_received_at": as_utc(st.last_received_at),
                "series_count": series_counts.get(st.id, 0),
                "status": str(state.status),
                "status_label": state.label,
                "status_tone": state.tone,
                "status_reason": state.reason,
                "note": st.note,
            }
        )
    return {"items": items, "limit": limit, "offset": offset}


def _status_set(status: str) -> set[DeliveryStatus] | None:
    if status == IN_PROGRESS:
        return set(_IN_PROGRESS_STATUSES)
    if status in {str(s) for s in DeliveryStatus}:
        return {DeliveryStatus(status)}
    return None


def series_label(series: Series) -> str:
    """``series 3 PORTAL VENOUS`` (number and description, as the PACS lists it)."""
    parts = [
        str(series.series_number) if series.series_number is not None else "",
        (series.series_description or "").strip(),
    ]
    named = [p for p in parts if p]
    return " ".join(["series", *named]) if named else f"series …{series.series_uid[-8:]}"


def study_detail(s: Session, study_uid: str, viewer: Viewer) -> dict[str, Any] | None:
    st = s.scalars(select(Study).where(Study.study_uid == study_uid)).first()
    if st is None:
        return None
    series = s.scalars(
        select(Series).where(Series.study_id == st.id).order_by(Series.series_number, Series.id)
    ).all()
    jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
    results = s.scalars(select(Result).where(Result.study_id == st.id).order_by(Result.id)).all()
    result_sends = s.scalars(
        select(Dispatch)
        .where(Dispatch.study_id == st.id, Dispatch.kind == OutboxKind.RESULT)
        .order_by(Dispatch.id)
    ).all()
    forwards = s.execute(
        select(Dispatch.destination, Dispatch.state, func.count(), func.max(Dispatch.last_error))
        .where(Dispatch.study_id == st.id, Dispatch.kind == OutboxKind.FORWARD)
        .group_by(Dispatch.destination, Dispatch.state)
    ).all()
    events = s.scalars(
        select(Event).where(Event.study_uid == study_uid).order_by(Event.at, Event.id).limit(1000)
    ).all()
    routed = {
        e.series_uid: e.data or {} for e in events if e.kind == EventKind.ROUTED and e.series_uid
    }
    names = {x.series_uid: series_label(x) for x in series}
    health = viewer.health(s)
    state = statuses.study_status(
        s, st, health, viewer.pipelines, viewer.clock, viewer.study_timeout_s
    )
    by_sop = {r.sop_uid: r for r in results}
    latest_jobs: dict[str, Job] = {}
    for job in jobs:
        latest_jobs[job.pipeline] = job
    feeds: dict[str, list[str]] = {}
    for name, job in sorted(latest_jobs.items()):
        for uid in (job.inputs or {}).values():
            if isinstance(uid, str):
                feeds.setdefault(uid, []).append(name)
    runs = timeline.runs(st, list(jobs), list(events))
    pipeline_of = {j.id: j.pipeline for j in jobs}
    return {
        "study_uid": st.study_uid,
        "heading": study_heading(
            st.accession_number, st.study_description, st.study_date, st.study_uid
        ),
        "patient_id": st.patient_id if viewer.sees_patient_ids else None,
        "accession_number": st.accession_number,
        "study_date": st.study_date,
        "study_description": st.study_description,
        "note": st.note,
        "status": state.as_dict(),
        "timeline": [
            {**step, "at": as_utc(step["at"])}
            for step in timeline.summary(
                st, list(series), list(jobs), list(results), list(result_sends)
            )
        ],
        "runs": [r.as_dict() for r in runs],
        "series": [
            _series_dict(x, routed.get(x.series_uid), feeds.get(x.series_uid, [])) for x in series
        ],
        "jobs": [job_dict(j, st.study_uid) for j in jobs],
        "results": [_result_dict(r, result_sends, names) for r in results],
        "dispatches": [dispatch_dict(d, by_sop.get(d.sop_uid), names) for d in result_sends],
        "forwards": [
            {"destination": d, "state": state_, "count": n, "last_error": err}
            for d, state_, n, err in forwards
        ],
        "events": [event_dict(e, names) for e in events],
        "retrievals": [
            retrieve.as_dict(r, viewer.sees_patient_ids) for r in retrieve.of_study(s, study_uid)
        ],
        "webhooks": [
            webhooks.as_dict(w, pipeline_of.get(w.job_id))
            for w in s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.study_id == st.id)
                .order_by(WebhookDelivery.id)
            )
        ],
    }


def _series_dict(x: Series, routed: dict[str, Any] | None, feeds: list[str]) -> dict[str, Any]:
    """A series row; ``feeds``: the pipelines whose latest job reads it."""
    routed = routed or {}
    failures = [
        f"{f.get('rule')}: {f.get('failure')}"
        for f in routed.get("not_matched", [])
        if isinstance(f, dict)
    ]
    return {
        "series_uid": x.series_uid,
        "series_number": x.series_number,
        "series_description": x.series_description,
        "label": series_label(x),
        "modality": x.modality,
        "state": x.state,
        "instances": x.instance_count,
        "phase": x.phase,
        "phase_confidence": x.phase_confidence,
        "phase_reasons": x.phase_reasons or [],
        "matched_rule": x.matched_rule,
        "not_matched": failures if not x.matched_rule else [],
        "asked_for": routed.get("pipelines", []),
        "feeds": feeds,
        "forward": routed.get("forward", []),
        "completed_at": as_utc(x.completed_at),
        "routed_at": as_utc(x.routed_at),
    }


def _result_dict(r: Result, sends: list[Dispatch], names: Mapping[str, str]) -> dict[str, Any]:
    mine = [d for d in sends if d.sop_uid == r.sop_uid]
    return {
        "id": r.id,
        "job_id": r.job_id,
        "kind": r.kind,
        "sop_uid": r.sop_uid,
        "source_series_uid": r.source_series_uid,
        "source_series": names.get(r.source_series_uid),
        "created_at": as_utc(r.created_at),
        "pipeline": r.pipeline,
        "result_type": r.result_type,
        "superseded_by": r.superseded_by,
        "superseded_at": as_utc(r.superseded_at),
        "held_for": [d.destination for d in mine if d.state == OutboxState.HELD],
        "reviews": [
            {
                "destination": d.destination,
                "decision": "rejected" if d.state == OutboxState.REJECTED else "approved",
                "by": d.reviewed_by,
                "at": as_utc(d.reviewed_at),
                "note": d.review_note,
            }
            for d in mine
            if d.reviewed_by
        ],
    }


def dispatch_dict(
    d: Dispatch, result: Result | None = None, names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    carries = None
    if result is not None:
        kind = result.result_type if result.result_type == "RTSTRUCT" else result.kind
        series = (names or {}).get(result.source_series_uid) or result.source_series_uid
        carries = f"{result.pipeline or 'result'} {kind} on {series}"
    return {
        "id": d.id,
        "kind": d.kind,
        "sop_uid": d.sop_uid,
        "carries": carries,
        "pipeline": result.pipeline if result else None,
        "source_series_uid": result.source_series_uid if result else None,
        "result_id": result.id if result else None,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "sent_at": as_utc(d.sent_at),
        "last_attempt_at": as_utc(d.last_attempt_at),
        "next_attempt_at": as_utc(d.next_attempt_at),
        "reviewed_by": d.reviewed_by,
        "reviewed_at": as_utc(d.reviewed_at),
        "review_note": d.review_note,
    }


def result_detail(s: Session, result_id: int) -> dict[str, Any] | None:
    """What the viewer page shows around the image: the result, its study and series,
    its sends and their review state."""
    r = s.get(Result, result_id)
    if r is None:
        return None
    study = s.get(Study, r.study_id)
    source = s.scalars(select(Series).where(Series.series_uid == r.source_series_uid)).first()
    names = {source.series_uid: series_label(source)} if source else {}
    sends = s.scalars(
        select(Dispatch).where(Dispatch.sop_uid == r.sop_uid).order_by(Dispatch.id)
    ).all()
    job = s.get(Job, r.job_id)
    return {
        **_result_dict(r, list(sends), names),
        "study_uid": study.study_uid if study else None,
        "accession_number": study.accession_number if study else None,
        "study_date": study.study_date if study else None,
        "study_description": study.study_description if study else None,
        "source_series_number": source.series_number if source else None,
        "source_series_description": source.series_description if source else None,
        "labels_ml": ((job.summary or {}).get("labels") if job else None) or {},
        "dispatches": [dispatch_dict(d, r, names) for d in sends],
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


def destinations(s: Session, viewer: Viewer) -> list[dict[str, Any]]:
    """Every configured destination: address, health, counts by state, last C-ECHO."""
    health = viewer.health(s)
    counts: dict[str, dict[str, int]] = {}
    for dest, state, n in s.execute(
        select(Dispatch.destination, Dispatch.state, func.count()).group_by(
            Dispatch.destination, Dispatch.state
        )
    ):
        counts.setdefault(dest, {})[state] = n
    out = []
    for d in viewer.settings.destinations:
        h = health[d.name]
        out.append(
            {
                **h.as_dict(),
                "review": d.review,
                "result_type": d.result_type,
                "counts": counts.get(d.name, {}),
            }
        )
    return out


def failed_dispatch_ids(s: Session, destination: str) -> list[int]:
    return list(
        s.scalars(
            select(Dispatch.id).where(
                Dispatch.destination == destination, Dispatch.state == OutboxState.FAILED
            )
        )
    )


def first_instance_path(s: Session, series_uid: str) -> str | None:
    """A file of a received series (the dry run's fallback for one series)."""
    return s.scalars(
        select(Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.series_uid == series_uid)
        .limit(1)
    ).first()
