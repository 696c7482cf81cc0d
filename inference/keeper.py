"""The queue keeper, a loop in the node: leases, expiry and (scale-out) Celery publishing.

It runs in the node whatever executes the jobs: it requeues running jobs whose worker
stopped heart-beating (any machine), expires jobs that waited too long, and in Celery
mode publishes each due queued job's id to the broker. The database stays the source of
truth: a task for a job that is no longer queued does nothing, so publishing twice (a
re-publish after a lost message, a broker re-delivery) is harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import or_, select

from db.models import Job, utcnow
from db.session import Database
from inference import queue
from kernel.settings import WorkerSettings
from kernel.vocabulary import JobState

log = logging.getLogger("inference.keeper")


class QueueKeeper:
    def __init__(
        self,
        db: Database,
        settings: WorkerSettings,
        publish: Callable[[int], None] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.publish = publish
        self.interval_s = interval_s or min(5.0, max(0.2, settings.lease_s / 4))
        # job id -> (attempts when published, monotonic time): one publish per attempt,
        # again after a lease without anyone taking it (a message the broker lost).
        self._published: dict[int, tuple[int, float]] = {}

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("queue keeper error")
            stop.wait(self.interval_s)

    def tick(self) -> None:
        w = self.settings
        expired = queue.requeue_expired(self.db, w.lease_s, retry_base_s=w.retry_backoff_s)
        if expired:
            log.warning("%d running job(s) lost their worker; requeued or failed", expired)
        if w.max_queue_age_s is not None:
            queue.expire_queued(self.db, w.max_queue_age_s)
        if self.publish is not None:
            self.publish_due()

    def publish_due(self) -> int:
        now = utcnow()
        with self.db.session() as s:
            due = s.execute(
                select(Job.id, Job.attempts)
                .where(
                    Job.state == JobState.QUEUED,
                    or_(Job.not_before.is_(None), Job.not_before <= now),
                )
                .order_by(Job.priority.desc(), Job.queued_at, Job.id)
            ).all()
        count = 0
        mono = time.monotonic()
        due_ids = set()
        for job_id, attempts in due:
            due_ids.add(job_id)
            seen = self._published.get(job_id)
            if seen and seen[0] == attempts and mono - seen[1] < self.settings.lease_s:
                continue
            assert self.publish is not None
            self.publish(job_id)
            self._published[job_id] = (attempts, mono)
            count += 1
        for job_id in list(self._published):  # forget jobs that left the queue
            if job_id not in due_ids:
                del self._published[job_id]
        return count
