"""The parent side of a device worker: one warm child, heartbeats, time limit, cancel.

Used by the embedded ``LocalWorker`` thread and by the Celery task alike, so both modes
move jobs through the same states. The child is started once and reused for every job;
it is replaced only after it died, was killed for the time limit, or for a cancel.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
from typing import Any

from db.models import Job
from db.session import Database
from inference import queue
from inference.child import child_main
from kernel.settings import NodeSettings
from kernel.vocabulary import JobState

log = logging.getLogger("inference.supervisor")

CHILD_START_TIMEOUT_S = 600.0
_SPAWN = multiprocessing.get_context("spawn")


def worker_name(kind: str, device: str) -> str:
    """``host/kind/device/pid``: the prefix ``host/local/`` marks this node's own workers."""
    return f"{socket.gethostname()}/{kind}/{device}/{os.getpid()}"


class ChildStartError(RuntimeError):
    """The worker child could not start (bad model registry, import error)."""


class DeviceSupervisor:
    def __init__(
        self,
        db: Database,
        settings: NodeSettings,
        device: str,
        name: str,
        child_target: Any = child_main,
    ) -> None:
        # child_target: the child's entry point; the queue benchmark swaps in a no-op one.
        self.child_target = child_target
        self.db = db
        self.settings = settings
        self.device = device
        self.name = name
        self.process: Any = None
        self.conn: Any = None
        self.closing = False
        self.children_started = 0

    # -- the child -----------------------------------------------------------------
    def ensure_child(self, stop: threading.Event | None = None) -> bool:
        """Start the child if there is none (or it died) and wait until it is ready.

        Returns True when it is ready, False when ``stop`` was set meanwhile: a child still
        starting (importing torch, reading the registry: seconds) runs nothing yet, so it
        is killed and a stopping node does not wait for it. Raises ``ChildStartError``
        when the child exits or does not answer within ``CHILD_START_TIMEOUT_S``.
        """
        if self.process is not None and self.process.is_alive():
            return True
        self._discard()
        parent_conn, child_conn = _SPAWN.Pipe()
        data = self.settings.model_dump(mode="json")
        process = _SPAWN.Process(
            target=self.child_target,
            args=(child_conn, data, self.device),
            name=f"dicom-node-worker-{self.device}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self.process, self.conn = process, parent_conn
        self.children_started += 1
        deadline = time.monotonic() + CHILD_START_TIMEOUT_S
        while time.monotonic() < deadline and not self.closing:
            if parent_conn.poll(0.2):
                try:
                    if parent_conn.recv()[0] == "ready":
                        log.info("worker child %s on %s ready", process.pid, self.device)
                        return True
                except EOFError:
                    break
            if not process.is_alive():
                break
            if stop is not None and stop.is_set():
                self._discard()
                return False
        code = process.exitcode
        self._discard()
        raise ChildStartError(f"worker child on {self.device} did not start (exit code {code})")

    def _discard(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(10)
        if self.conn is not None:
            # The worker thread and a shutdown may both discard the same child.
            with contextlib.suppress(OSError):
                self.conn.close()
        self.process, self.conn = None, None

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the child (a running job is abandoned; the caller requeues it)."""
        self.closing = True
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop",))
            self.process.join(grace_s)
        self._discard()

    # -- one job -------------------------------------------------------------------
    def run(self, job: Job) -> str:
        """Run a job claimed by this worker; returns the job's state afterwards.

        ``interrupted`` means the worker shut down mid-job (the caller requeues it) and
        ``lost`` that the job's lease passed to another worker meanwhile.
        """
        w = self.settings.worker
        owner: queue.Owner = (self.name, job.attempts)
        limit_s = w.time_limit_for(job.pipeline)
        self.ensure_child()
        self.conn.send(("run", job.id, self.name, job.attempts))
        started = last_beat = time.monotonic()
        progress: float | None = None
        while True:
            message = self._receive(0.2)
            if message is not None and message[1] == job.id:
                kind, _, value = message
                if kind == "progress":
                    progress = value
                elif kind == "done":
                    log.info("job %s %s in %.1f s", job.id, value, time.monotonic() - started)
                    return value
                elif kind in ("error", "input_error"):
                    return queue.fail(
                        self.db,
                        job.id,
                        value,
                        retry_base_s=w.retry_backoff_s,
                        owner=owner,
                        retry=kind == "error",
                    )
            if self.process is None or not self.process.is_alive():
                if self.closing:
                    return "interrupted"
                code = self.process.exitcode if self.process is not None else None
                self._discard()
                log.error("worker child died during job %s (exit code %s)", job.id, code)
                return queue.fail(
                    self.db,
                    job.id,
                    f"worker child died (exit code {code}: crash, out of memory or killed)",
                    retry_base_s=w.retry_backoff_s,
                    owner=owner,
                )
            now = time.monotonic()
            if now - started > limit_s:
                log.error("job %s exceeded its time limit of %g s; child killed", job.id, limit_s)
                self._discard()
                return queue.fail(
                    self.db,
                    job.id,
                    f"time limit of {limit_s:g} s exceeded (pipeline {job.pipeline})",
                    retry_base_s=w.retry_backoff_s,
                    owner=owner,
                )
            if now - last_beat >= w.heartbeat_s:
                last_beat = now
                state = queue.heartbeat(self.db, job.id, owner, progress)
                if state is None:
                    log.warning("job %s is no longer ours (lease expired); child killed", job.id)
                    self._discard()
                    return "lost"
                if state == JobState.CANCELLING:
                    self._discard()
                    return queue.fail(self.db, job.id, "cancelled while running", owner=owner)

    def _receive(self, timeout_s: float) -> tuple[Any, ...] | None:
        if self.conn is None:
            return None
        try:
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            time.sleep(0.05)  # the child is gone; the liveness check handles it
        return None
