"""Scale-out: GPU workers on other machines through Celery (Redis or RabbitMQ broker).

The node publishes one message per due queued job (``QueueKeeper``); a worker that gets a
message claims the head of the queue in the shared database, exactly like an embedded
worker (priority, anti-starvation and GPU admission included), and runs it in its warm
``spawn`` child. A message is a "one job is ready" token rather than a job: so urgent
jobs still overtake a backlog of normal ones already sitting in the broker, and a stale
or duplicated message simply finds nothing to do. The database holds the job states.

Worker loss: ``task_acks_late`` + ``task_reject_on_worker_lost`` make the broker
re-deliver the message of a killed worker; the job row itself is requeued by the node's
lease check (no heartbeat for ``worker.lease_s``) and published again, so it runs on
another worker even where the broker waits (Redis re-delivers only after its
visibility timeout).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from db.session import Database
from inference import queue
from inference.gpu import Admission
from inference.supervisor import DeviceSupervisor, worker_name
from kernel.catalog import PipelineCatalog
from kernel.settings import NodeSettings

log = logging.getLogger("inference.celery")

TASK_NAME = "dicom_node.run_job"


def make_app(settings: NodeSettings, device: str | None = None) -> Celery:
    """The Celery app for these settings; ``device`` is set in a worker process."""
    w = settings.worker
    if not w.broker_url:
        raise ValueError("worker.broker_url is not set: Celery needs a broker")
    longest_s = max([w.time_limit_s, *w.pipeline_time_limits_s.values()])
    app = Celery("dicom_node", broker=w.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=w.celery_queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # Redis re-delivers an unacknowledged message after this; longer than any job so
        # that a job still running is not handed out again while it runs.
        broker_transport_options={"visibility_timeout": int(longest_s + w.lease_s)},
        worker_hijack_root_logger=False,
    )
    if device is not None:
        runner = CeleryJobRunner(settings, device)

        @app.task(name=TASK_NAME, bind=True)
        def run_job(task: Any, job_id: int) -> str:
            return runner.run(job_id)

        app.runner = runner  # type: ignore[attr-defined]
    return app


def publisher(app: Celery, queue_name: str) -> Any:
    """A function the node calls with each due job id."""

    def publish(job_id: int) -> None:
        app.send_task(TASK_NAME, args=[job_id], queue=queue_name)

    return publish


class CeleryJobRunner:
    """Worker-process state: one database engine and one warm device child."""

    def __init__(self, settings: NodeSettings, device: str) -> None:
        self.settings = settings
        self.device = device
        self._lock = threading.Lock()
        self._ready = False
        self.child_target: Any = None  # None: inference.child.child_main

    def _setup(self) -> None:
        from inference.registry import load_registry

        s = self.settings
        self.db = Database(s.db_url)
        self.name = worker_name("celery", self.device)
        registry = load_registry(s.models_file)
        catalog = PipelineCatalog(
            s.rules_file, {m: spec.channels for m, spec in registry.models.items()}
        )
        self.admission = Admission(self.device, catalog.get, registry)
        self.supervisor = DeviceSupervisor(self.db, s, self.device, self.name)
        if self.child_target is not None:
            self.supervisor.child_target = self.child_target
        self._ready = True

    def run(self, job_id: int) -> str:
        with self._lock:
            if not self._ready:
                self._setup()
            self.supervisor.ensure_child()
            job = queue.claim(
                self.db,
                self.name,
                self.device,
                admit=self.admission,
                promote_after_s=self.settings.worker.promote_after_s,
            )
            if job is None:
                log.info("message for job %s: nothing due to claim", job_id)
                return "nothing"
            return self.supervisor.run(job)
