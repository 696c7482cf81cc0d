"""The job queue in the database: the one writer of the ``jobs`` table.

Enqueue (with de-duplication), claim atomically, heart-beat, finish, fail with retry,
requeue, expire, and the admin actions (retry, cancel, priority). Every job state in
``kernel.vocabulary.JobState`` is set here. Claiming is one transaction: SQLite serialises
writers (BEGIN IMMEDIATE), PostgreSQL uses ``FOR UPDATE SKIP LOCKED`` so several workers
never take the same job.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select
from sqlalchemy.orm import Session

from db.models import Job, Study, utcnow
from db.session import Database
from kernel import webhooks
from kernel.events import add_event
from kernel.retry import RetryPolicy
from kernel.vocabulary import (
    ACTIVE_JOB_STATES,
    PRIORITY_RANKS,
    RUNNING_JOB_STATES,
    EventKind,
    EventLevel,
    JobState,
    Priority,
)

PRIORITIES = {str(p): rank for p, rank in PRIORITY_RANKS.items()}
ACTIVE_STATES = ACTIVE_JOB_STATES
RUNNING_STATES = RUNNING_JOB_STATES

# Who holds a running job: (worker name, attempt number). A worker that lost its lease
# (and so its job) can never finish or fail the job another worker took over.
Owner = tuple[str, int]


def identical_job(
    session: Session,
    study: Study,
    pipeline: str,
    inputs: dict[str, Any],
    inputs_ready_at: datetime | None = None,
) -> Job | None:
    """A job that already covers this request: the same pipeline on the same inputs,
    still queued, or (with ``inputs_ready_at``) queued at or after the inputs were last
    completed. The one de-duplication rule of the queue."""
    candidates = session.scalars(
        select(Job)
        .where(Job.study_id == study.id, Job.pipeline == pipeline)
        .order_by(Job.id.desc())
    ).all()
    for job in candidates:
        if job.inputs != inputs:
            continue
        if job.state == JobState.QUEUED:
            return job
        if inputs_ready_at is not None and job.queued_at >= inputs_ready_at:
            return job
    return None


def enqueue(
    session: Session,
    study: Study,
    pipeline: str,
    inputs: dict[str, Any],
    *,
    priority: Priority | str = Priority.NORMAL,
    max_attempts: int = 3,
    inputs_ready_at: datetime | None = None,
    reason: str | None = None,
    update_urls: list[str] | None = None,
) -> Job | None:
    """Queue a pipeline run; None when ``identical_job`` already covers it.

    ``inputs``: input role -> series UID (or ``{"path": ...}`` for the path API).
    ``max_attempts``: tries before the job fails (the node passes ``worker.max_attempts``).
    ``inputs_ready_at``: when the inputs were last completed; a job queued since then
    for the same inputs is not queued again (a routing pass that repeats itself).
    ``reason``: why these inputs were chosen (shown in the job_queued event).
    ``update_urls``: http(s) URLs told when the job ends (``kernel.webhooks``); a job
    still queued or running that covers the request gets those it lacks.
    """
    same = identical_job(session, study, pipeline, inputs, inputs_ready_at)
    if same is not None:
        if update_urls and same.state in ACTIVE_STATES:
            same.update_urls = webhooks.merge_urls(*(same.update_urls or []), *update_urls)
        return None
    priority = Priority(priority)
    job = Job(
        study_id=study.id,
        pipeline=pipeline,
        inputs=inputs,
        priority=priority.rank,
        max_attempts=max_attempts,
        queued_at=utcnow(),
        state=JobState.QUEUED,
        update_urls=webhooks.merge_urls(*update_urls) if update_urls else None,
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        EventKind.JOB_QUEUED,
        f"pipeline {pipeline} queued ({priority})" + (f": {reason}" if reason else ""),
        study_uid=study.study_uid,
        job_id=job.id,
        data={"inputs": inputs, "reason": reason},
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
            .where(
                Job.state == JobState.QUEUED,
                or_(Job.not_before.is_(None), Job.not_before <= now),
            )
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
        job.state = JobState.RUNNING
        job.attempts += 1
        job.worker = worker
        job.device = device
        job.started_at = now
        job.heartbeat_at = now
        job.progress = 0.0
        job.finished_at = None
        add_event(
            s,
            EventKind.JOB_STARTED,
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
        if job.state == JobState.CANCELLING:  # cancelled while it ran: result not kept
            job.state, job.finished_at = JobState.CANCELLED, utcnow()
            webhooks.job_ended(s, job)
            return job.state
        if record is not None:
            record(s, job)
        job.state = JobState.DONE
        job.progress = 1.0
        job.finished_at = utcnow()
        job.summary = summary
        job.last_error = None
        seconds = (job.finished_at - job.started_at).total_seconds() if job.started_at else 0
        add_event(
            s,
            EventKind.JOB_DONE,
            f"pipeline {job.pipeline} finished in {seconds:.1f} s",
            study_uid=job.study.study_uid,
            job_id=job.id,
            data=summary,
        )
        webhooks.job_ended(s, job)
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

    The job's ``max_attempts`` and ``retry_base_s`` make its ``RetryPolicy``: attempt n is
    retried after ``retry_base_s * 2 ** (n - 1)`` seconds until the attempts are used up.

    ``retry=False`` fails for good at once: the input itself is wrong (an unreadable
    image, a missing phase) and another attempt would only fail the same way, later.
    """
    with db.session() as s:
        job = _locked(s, db, job_id)
        if not _owned(job, owner):
            return job.state
        job.last_error = error
        job.finished_at = utcnow()
        if job.state == JobState.CANCELLING:
            job.state = JobState.CANCELLED
            webhooks.job_ended(s, job)
            return job.state
        policy = RetryPolicy(max_attempts=job.max_attempts, base_s=retry_base_s)
        delay = policy.next_delay_s(job.attempts) if retry else None
        if not retry:
            job.state = JobState.FAILED
            message = f"failed on its input (not retried): {error}"
            level = EventLevel.ERROR
        elif delay is not None:
            job.state = JobState.QUEUED
            job.not_before = utcnow() + timedelta(seconds=delay)
            message = f"attempt {job.attempts} failed, retry in {delay:g} s: {error}"
            level = EventLevel.WARNING
        else:
            job.state = JobState.FAILED
            message = f"failed after {job.attempts} attempts: {error}"
            level = EventLevel.ERROR
        add_event(
            s,
            EventKind.JOB_FAILED if job.state == JobState.FAILED else EventKind.JOB_RETRY,
            f"pipeline {job.pipeline} {message}",
            level=level,
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
        webhooks.job_ended(s, job)  # only when it failed for good
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
            if job.state == JobState.CANCELLING:
                job.state, job.finished_at = JobState.CANCELLED, utcnow()
                webhooks.job_ended(s, job)
                continue
            job.state = JobState.QUEUED
            job.attempts = max(0, job.attempts - 1)
            job.worker = None
            add_event(
                s,
                EventKind.JOB_REQUEUED,
                f"pipeline {job.pipeline} was running when the node stopped; queued again",
                level=EventLevel.WARNING,
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
        jobs = s.scalars(
            select(Job).where(Job.state == JobState.QUEUED, Job.queued_at < cutoff)
        ).all()
        for job in jobs:
            job.state, job.finished_at = JobState.EXPIRED, utcnow()
            add_event(
                s,
                EventKind.JOB_EXPIRED,
                f"pipeline {job.pipeline} waited more than {max_age_s:g} s; expired",
                level=EventLevel.WARNING,
                study_uid=job.study.study_uid,
                job_id=job.id,
            )
            webhooks.job_ended(s, job)
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
        job.state, job.attempts, job.not_before = JobState.QUEUED, 0, None
        job.queued_at, job.progress, job.worker = utcnow(), 0.0, None
        add_event(
            s,
            EventKind.JOB_RETRY,
            f"pipeline {job.pipeline} queued again by {by}",
            study_uid=job.study.study_uid,
            job_id=job.id,
            data={"requeued_by": by},  # a new run of the job (the timeline starts one)
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
        job.state = JobState.CANCELLED if job.state == JobState.QUEUED else JobState.CANCELLING
        if job.state == JobState.CANCELLED:
            job.finished_at = utcnow()
        add_event(
            s,
            EventKind.JOB_CANCEL,
            f"pipeline {job.pipeline} {job.state} by {by}",
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
        webhooks.job_ended(s, job)  # only once it is cancelled (a queued job)
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
            EventKind.JOB_PRIORITY,
            f"pipeline {job.pipeline} set to {priority} by {by}",
            study_uid=job.study.study_uid,
            job_id=job.id,
        )
