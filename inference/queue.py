"""The job queue in the database: enqueue, claim atomically, finish, fail with retry.

Claiming is one transaction: SQLite serialises writers (BEGIN IMMEDIATE), PostgreSQL
uses ``FOR UPDATE SKIP LOCKED`` so several workers never take the same job.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import case, or_, select
from sqlalchemy.orm import Session

from db.models import Job, Study, utcnow
from db.session import Database
from dicom_node.records import add_event

PRIORITIES = {"normal": 0, "urgent": 10}
ACTIVE_STATES = ("queued", "running", "cancelling")
RUNNING_STATES = ("running", "cancelling")

# Who holds a running job: (worker name, attempt number). A worker that lost its lease
# (and so its job) can never finish or fail the job another worker took over.
Owner = tuple[str, int]


def enqueue(
    session: Session,
    study: Study,
    pipeline: str,
    inputs: dict[str, str],
    *,
    priority: str = "normal",
    max_attempts: int = 3,
) -> Job | None:
    """Queue a pipeline run unless an identical one is already waiting."""
    waiting = session.scalars(
        select(Job).where(Job.study_id == study.id, Job.pipeline == pipeline, Job.state == "queued")
    ).all()
    if any(j.inputs == inputs for j in waiting):
        return None
    job = Job(
        study_id=study.id,
        pipeline=pipeline,
        inputs=inputs,
        priority=PRIORITIES[priority],
        max_attempts=max_attempts,
        queued_at=utcnow(),
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        "job_queued",
        f"pipeline {pipeline} queued ({priority})",
        study_uid=study.study_uid,
        job_id=job.id,
        data={"inputs": inputs},
    )
    return job


def claim(
    db: Database,
    worker: str,
    device: str,
    *,
    job_id: int | None = None,
    admit: Callable[[Job], bool] | None = None,
    promote_after_s: float | None = None,
) -> Job | None:
    """Take the most urgent due job and mark it running; None when there is none.

    ``promote_after_s``: a job that has waited this long ranks as urgent, so a stream of
    urgent studies cannot starve normal ones. ``admit`` (GPU admission) may refuse the
    head of the queue: it then waits, nothing behind it jumps ahead on this device.
    ``job_id`` claims that one job only (a Celery task), if it is still queued and due.
    """
    now = utcnow()
    with db.session() as s:
        rank = Job.priority
        if promote_after_s is not None:
            waited_long = Job.queued_at <= now - timedelta(seconds=promote_after_s)
            rank = case((waited_long, max(PRIORITIES.values())), else_=Job.priority)
        query = (
            select(Job)
            .where(Job.state == "queued", or_(Job.not_before.is_(None), Job.not_before <= now))
            .order_by(rank.desc(), Job.queued_at, Job.id)
            .limit(1)
        )
        if job_id is not None:
            query = query.where(Job.id == job_id)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        job = s.scalars(query).first()
        if job is None or (admit is not None and not admit(job)):
            return None
        job.state = "running"
        job.attempts += 1
        job.worker = worker
        job.device = device
        job.started_at = now
        job.heartbeat_at = now
        job.progress = 0.0
        job.finished_at = None
        add_event(
            s,
            "job_started",
            f"pipeline {job.pipeline} attempt {job.attempts} on {device} ({worker})",
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
        s.flush()
        s.expunge(job)
        return job


def _locked(s: Session, db: Database, job_id: int) -> Job:
    return s.get_one(Job, job_id, with_for_update=not db.is_sqlite)


def _owned(job: Job, owner: Owner | None) -> bool:
    if owner is None:
        return True
    return job.state in RUNNING_STATES and (job.worker, job.attempts) == tuple(owner)


def heartbeat(db: Database, job_id: int, owner: Owner, progress: float | None = None) -> str | None:
    """Renew the lease of a running job; returns its state, or None if it is not ours any more.

    ``cancelling`` tells the worker to stop the job.
    """
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or not _owned(job, owner):
            return None
        job.heartbeat_at = utcnow()
        if progress is not None:
            job.progress = max(0.0, min(1.0, float(progress)))
        return job.state


def finish(
    db: Database,
    job_id: int,
    summary: dict[str, Any],
    *,
    owner: Owner | None = None,
    record: Callable[[Session, Job], None] | None = None,
) -> str:
    """Mark a job done; ``record`` writes its results in the same transaction.

    Nothing is recorded when ``owner`` no longer holds the job (its lease expired and
    another worker took it over): so a result is recorded, and sent, once. Returns the
    job's state afterwards.
    """
    with db.session() as s:
        job = _locked(s, db, job_id)
        if not _owned(job, owner):
            return job.state
        if job.state == "cancelling":  # cancelled while it ran: the result is not kept
            job.state, job.finished_at = "cancelled", utcnow()
            return job.state
        if record is not None:
            record(s, job)
        job.state = "done"
        job.progress = 1.0
        job.finished_at = utcnow()
        job.summary = summary
        job.last_error = None
        seconds = (job.finished_at - job.started_at).total_seconds() if job.started_at else 0
        add_event(
            s,
            "job_done",
            f"pipeline {job.pipeline} finished in {seconds:.1f} s",
            study_uid=job.study.study_uid,
            job_id=job.id,
            data=summary,
        )
        return job.state


def fail(
    db: Database,
    job_id: int,
    error: str,
    *,
    retry_base_s: float = 10.0,
    owner: Owner | None = None,
    retry: bool = True,
) -> str:
    """Record a failed attempt; requeue with backoff or fail for good. Returns the state.

    ``retry=False`` fails for good at once: the input itself is wrong (an unreadable
    image, a missing phase) and another attempt would only fail the same way, later.
    """
    with db.session() as s:
        job = _locked(s, db, job_id)
        if not _owned(job, owner):
            return job.state
        job.last_error = error
        job.finished_at = utcnow()
        if job.state == "cancelling":
            job.state = "cancelled"
            return job.state
        if not retry:
            job.state = "failed"
            message = f"failed on its input (not retried): {error}"
            level = "error"
        elif job.attempts < job.max_attempts:
            job.state = "queued"
            delay = retry_base_s * 2 ** (job.attempts - 1)
            job.not_before = utcnow() + timedelta(seconds=delay)
            message = f"attempt {job.attempts} failed, retry in {delay:g} s: {error}"
            level = "warning"
        else:
            job.state = "failed"
            message = f"failed after {job.attempts} attempts: {error}"
            level = "error"
        add_event(
            s,
            "job_failed" if job.state == "failed" else "job_retry",
            f"pipeline {job.pipeline} {message}",
            level=level,
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
        return job.state


def requeue_abandoned(db: Database, worker_prefix: str | None = None) -> int:
    """Put jobs left ``running`` by a stopped node back in the queue (attempt not counted).

    ``worker_prefix`` limits this to the node's own local workers: jobs of Celery workers
    on other machines are left to their heartbeats and the lease.
    """
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.state.in_(RUNNING_STATES))).all()
        count = 0
        for job in jobs:
            if worker_prefix and not (job.worker or "").startswith(worker_prefix):
                continue
            if job.state == "cancelling":
                job.state, job.finished_at = "cancelled", utcnow()
                continue
            job.state = "queued"
            job.attempts = max(0, job.attempts - 1)
            job.worker = None
            add_event(
                s,
                "job_requeued",
                f"pipeline {job.pipeline} was running when the node stopped; queued again",
                level="warning",
                study_uid=job.study.study_uid,
                job_id=job.id,
            )
            count += 1
        return count


def requeue_expired(db: Database, lease_s: float, *, retry_base_s: float = 0.0) -> int:
    """Jobs whose worker stopped heart-beating for ``lease_s``: the attempt counts.

    Covers workers on any machine (a Celery worker that lost power, a hung node); the
    job is queued again, or failed when it has used up its attempts.
    """
    cutoff = utcnow() - timedelta(seconds=lease_s)
    with db.session() as s:
        ids = s.scalars(
            select(Job.id).where(Job.state.in_(RUNNING_STATES), Job.heartbeat_at < cutoff)
        ).all()
    count = 0
    for job_id in ids:
        with db.session() as s:
            job = _locked(s, db, job_id)
            if job.state not in RUNNING_STATES or (job.heartbeat_at or cutoff) >= cutoff:
                continue  # it heart-beat meanwhile
            owner = (job.worker or "", job.attempts)
            error = f"worker {job.worker} stopped heart-beating (lease {lease_s:g} s expired)"
        fail(db, job_id, error, retry_base_s=retry_base_s, owner=owner)
        count += 1
    return count


def expire_queued(db: Database, max_age_s: float) -> int:
    """Queued jobs older than ``max_age_s`` are ``expired`` instead of run very late."""
    cutoff = utcnow() - timedelta(seconds=max_age_s)
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.state == "queued", Job.queued_at < cutoff)).all()
        for job in jobs:
            job.state, job.finished_at = "expired", utcnow()
            add_event(
                s,
                "job_expired",
                f"pipeline {job.pipeline} waited more than {max_age_s:g} s; expired",
                level="warning",
                study_uid=job.study.study_uid,
                job_id=job.id,
            )
        return len(jobs)


class JobActionError(ValueError):
    """The action does not apply to the job in its current state."""


def retry(db: Database, job_id: int, by: str = "admin") -> None:
    """Queue a failed / cancelled / done job again with fresh attempts."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobActionError(f"job {job_id} does not exist")
        if job.state in ACTIVE_STATES:
            raise JobActionError(f"job {job_id} is {job.state}; only finished jobs can be retried")
        job.state, job.attempts, job.not_before = "queued", 0, None
        job.queued_at, job.progress, job.worker = utcnow(), 0.0, None
        add_event(
            s,
            "job_retry",
            f"pipeline {job.pipeline} queued again by {by}",
            study_uid=job.study.study_uid,
            job_id=job.id,
        )


def cancel(db: Database, job_id: int, by: str = "admin") -> str:
    """Cancel a queued job at once; a running one is marked for its worker to stop.

    Returns the new state (``cancelled`` or ``cancelling``).
    """
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobActionError(f"job {job_id} does not exist")
        if job.state not in ACTIVE_STATES:
            raise JobActionError(f"job {job_id} is {job.state}; nothing to cancel")
        job.state = "cancelled" if job.state == "queued" else "cancelling"
        if job.state == "cancelled":
            job.finished_at = utcnow()
        add_event(
            s,
            "job_cancel",
            f"pipeline {job.pipeline} {job.state} by {by}",
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
        return job.state


def set_priority(db: Database, job_id: int, priority: str, by: str = "admin") -> None:
    if priority not in PRIORITIES:
        raise JobActionError(f"priority must be one of {sorted(PRIORITIES)}")
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobActionError(f"job {job_id} does not exist")
        job.priority = PRIORITIES[priority]
        add_event(
            s,
            "job_priority",
            f"pipeline {job.pipeline} set to {priority} by {by}",
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
