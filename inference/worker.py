"""The embedded worker: a thread per device that claims jobs and runs them in its child.

The thread claims (atomically, GPU admission permitting), hands the job to its device's
warm ``spawn`` child (``inference.supervisor``) and watches it: heartbeats, progress,
time limit, cancel. The pipeline itself (inputs, models, SEG, outbox rows) is
``inference.jobrun``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from db.session import Database
from inference import queue
from inference.gpu import Admission
from inference.supervisor import DeviceSupervisor, worker_name
from kernel.settings import NodeSettings

log = logging.getLogger("inference.worker")


class LocalWorker:
    """One device's worker loop inside ``dicom-node serve``."""

    def __init__(
        self,
        db: Database,
        settings: NodeSettings,
        device: str,
        admission: Admission | None = None,
        on_job_end: Callable[[], None] | None = None,
    ) -> None:
        """``on_job_end``: called after each job this worker ran (whatever its end), so
        the node's senders look for the rows the job queued now, not at their next poll."""
        self.db = db
        self.on_job_end = on_job_end
        self.settings = settings
        self.device = device
        self.admission = admission
        self.name = worker_name("local", device)
        self.supervisor = DeviceSupervisor(db, settings, device, self.name)
        self.current_job: int | None = None
        self.stop: threading.Event | None = None  # run_forever's: ends a child's start

    def run_forever(self, stop: threading.Event) -> None:
        self.stop = stop
        poll_s = self.settings.worker.poll_interval_s
        while not stop.is_set():
            try:
                worked = self.run_one()
            except Exception:  # the loop must survive anything
                log.exception("worker loop error on %s", self.device)
                worked = False
                stop.wait(max(poll_s, 5.0))
            if not worked:
                stop.wait(poll_s)

    def run_one(self) -> bool:
        """Claim and run one job; False when nothing was due (or admitted)."""
        # A warm child before the job's clock starts; none when the node stops meanwhile.
        if not self.supervisor.ensure_child(self.stop):
            return False
        job = queue.claim(
            self.db,
            self.name,
            self.device,
            admit=self.admission,
            promote_after_s=self.settings.worker.promote_after_s,
        )
        if job is None:
            return False
        self.current_job = job.id
        try:
            self.supervisor.run(job)
        finally:
            self.current_job = None
            if self.on_job_end is not None:
                self.on_job_end()
        return True

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the child; a job still running gets ``grace_s`` before it is killed (the
        node requeues it)."""
        self.supervisor.close(grace_s)
