"""Asking the image for a series' phase: evidence jobs, from the router's side.

The node holds no model, so image evidence is a worker job (``PHASE_EVIDENCE_JOB``,
urgent: routing waits for it) whose summary carries the measurements. The router asks for
it when the tags are weak (``request``), reads it back when it plans the study again
(``lookup_in``), and is woken by ``arrived_since_routing`` when a job has finished.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, Series, Study, utcnow
from dicom_node.image_phase import ImageEvidenceSettings
from inference.phase_evidence import PHASE_EVIDENCE_JOB
from inference.queue import enqueue
from kernel.vocabulary import FINISHED_JOB_STATES, JobState, Priority

_LOOK_BACK = timedelta(days=1)


def _series(session: Session, series_uid: str) -> Series | None:
    return session.scalars(select(Series).where(Series.series_uid == series_uid)).one_or_none()


def _jobs_for(session: Session, series: Series) -> list[Job]:
    """The evidence jobs of this completion of the series, newest first."""
    jobs = session.scalars(
        select(Job)
        .where(Job.study_id == series.study_id, Job.pipeline == PHASE_EVIDENCE_JOB)
        .order_by(Job.id.desc())
    ).all()
    since = series.completed_at
    return [
        j
        for j in jobs
        if (j.inputs or {}).get("image") == series.series_uid
        and (since is None or j.queued_at >= since)
    ]


def lookup_in(session: Session, series_uid: str) -> dict[str, Any] | None:
    """The image evidence of a series' latest completion (``PhaseClassifier`` format), or
    None when none was asked for."""
    series = _series(session, series_uid)
    if series is None:
        return None
    jobs = _jobs_for(session, series)
    if not jobs:
        return None
    job = jobs[0]
    if job.state == JobState.DONE:
        summary = job.summary or {}
        if "image_evidence" in summary:
            return {"state": "ready", "measurements": summary["image_evidence"]}
        return {"state": "none", "reason": summary.get("no_image_evidence", "no measurement")}
    if job.state in FINISHED_JOB_STATES:
        return {"state": "none", "reason": f"job {job.id} {job.state}: {job.last_error or '-'}"}
    return {"state": "pending"}


def request(
    session: Session,
    study: Study,
    series_uid: str,
    settings: ImageEvidenceSettings,
    max_attempts: int,
) -> Job | None:
    """Queue the evidence job of a series (urgent); None when one is queued already."""
    series = _series(session, series_uid)
    inputs = {
        "image": series_uid,
        "evidence": {"model": settings.model, "structures": dict(settings.structures)},
    }
    return enqueue(
        session,
        study,
        PHASE_EVIDENCE_JOB,
        inputs,
        priority=Priority.URGENT,
        max_attempts=max_attempts,
        inputs_ready_at=series.completed_at if series is not None else None,
        reason=f"the tags leave the phase of series {series_uid} open; model {settings.model}",
    )


def arrived_since_routing(session: Session) -> list[str]:
    """Series whose evidence job finished after the series was last routed."""
    finished = session.scalars(
        select(Job).where(
            Job.pipeline == PHASE_EVIDENCE_JOB,
            Job.state.in_(FINISHED_JOB_STATES),
            Job.finished_at >= utcnow() - _LOOK_BACK,
        )
    ).all()
    due: list[str] = []
    for job in finished:
        uid = (job.inputs or {}).get("image")
        series = _series(session, uid) if uid else None
        if series is None or uid in due or series.completed_at is None:
            continue
        if job.queued_at < series.completed_at:  # evidence of an earlier completion
            continue
        if series.routed_at is None or series.routed_at < job.finished_at:
            due.append(uid)
    return due


def from_database(db: Any) -> Any:
    """An image evidence lookup (series UID -> evidence) on the node's database: what the
    live router would use now (the rules dry run)."""

    def lookup(series_uid: str) -> dict[str, Any] | None:
        with db.session() as s:
            return lookup_in(s, series_uid)

    return lookup


def in_process(models_file: Any, settings: ImageEvidenceSettings) -> Any:
    """An image evidence lookup ``(series UID, files) -> evidence`` that measures in this
    process with the registry's model, as a worker would (``route explain``). It loads
    torch and the model on first use."""
    from inference.engine import Engine
    from inference.phase_evidence import EvidenceError, measure
    from inference.registry import load_registry
    from inference.volume import SeriesReadError, load_series

    engine: list[Engine] = []

    def lookup(_series_uid: str, files: list[Any]) -> dict[str, Any] | None:
        if not settings.model or not files:
            return None
        if not engine:
            import torch

            engine.append(Engine(load_registry(models_file), torch.device("cpu")))
        try:
            volume = load_series(files)
            measured = measure(engine[0], settings.model, volume, settings.structures)
        except (EvidenceError, SeriesReadError) as exc:
            return {"state": "none", "reason": str(exc)}
        return {"state": "ready", "measurements": measured}

    return lookup
