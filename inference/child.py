"""The worker child: a long-lived ``spawn`` process per device that keeps models warm.

The parent (``inference.supervisor``) sends job ids over a Pipe; the child runs them and
answers with progress, done or error messages. A crash, OOM kill or hang of a model ends
this process only; the parent counts the attempt and starts a fresh child. ``spawn``
(never ``fork``) because the parent has threads and possibly CUDA already initialised.
The child opens its own database engine and models from the settings (a plain dict).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("inference.child")

PROGRESS_EVERY_S = 0.5


class ProgressHook:
    """Fraction of sliding-window tiles predicted, over all models of the running job.

    Wraps two methods of each warm nnU-Net predictor instance: the one that plans the
    tiles (gives the total) and the one that predicts one tile (counts it). Preprocessing
    and export are not counted, so 1.0 means "all tiles predicted", not "job done".
    """

    def __init__(self, send: Any) -> None:
        self.send = send
        self.job_id: int | None = None
        self.models: list[str] = []
        self.model_index = 0
        self.total = 0
        self.done = 0
        self._last_sent = 0.0

    def begin(self, job_id: int, models: list[str]) -> None:
        self.job_id, self.models = job_id, list(models) or ["?"]
        self.model_index, self.total, self.done = 0, 0, 0

    def install(self, model_id: str, predictor: Any) -> None:
        """Hook a predictor once; runners without an nnU-Net sliding window are skipped."""
        if predictor is None or getattr(predictor, "_dicom_node_progress", False):
            return
        if not hasattr(predictor, "_internal_maybe_mirror_and_predict"):
            return
        plan = predictor._internal_get_sliding_window_slicers
        predict_tile = predictor._internal_maybe_mirror_and_predict

        def planned(*args: Any, **kwargs: Any) -> Any:
            slicers = plan(*args, **kwargs)
            if model_id in self.models:
                self.model_index = self.models.index(model_id)
            self.total, self.done = len(slicers), 0
            return slicers

        def predicted(*args: Any, **kwargs: Any) -> Any:
            out = predict_tile(*args, **kwargs)
            self.done += 1
            self._report()
            return out

        predictor._internal_get_sliding_window_slicers = planned
        predictor._internal_maybe_mirror_and_predict = predicted
        predictor._dicom_node_progress = True

    def fraction(self) -> float:
        within = self.done / self.total if self.total else 0.0
        return min(1.0, (self.model_index + within) / len(self.models))

    def _report(self) -> None:
        now = time.monotonic()
        if self.job_id is not None and now - self._last_sent >= PROGRESS_EVERY_S:
            self._last_sent = now
            self.send(("progress", self.job_id, round(self.fraction(), 4)))


def _exit_with_parent(parent_pid: int) -> None:
    """A child must not outlive a node killed with -9 (it would hold the GPU and race the
    restarted node for the job): exit as soon as the parent is gone."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def child_main(conn: Connection, settings_data: dict[str, Any], device: str) -> None:
    """Entry point of the spawned child: serve jobs until the pipe closes."""
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True
    ).start()
    from kernel.settings import NodeSettings

    settings = NodeSettings(**settings_data)
    logging.basicConfig(
        level=getattr(logging, settings.log_level),
        format=f"%(asctime)s %(levelname)s %(name)s[child {device}]: %(message)s",
    )
    import torch

    from db.session import Database
    from inference.engine import Engine
    from inference.jobrun import JobRunner
    from inference.registry import load_registry
    from kernel.catalog import PipelineCatalog

    registry = load_registry(settings.models_file)
    catalog = PipelineCatalog(
        settings.rules_file, {m: spec.channels for m, spec in registry.models.items()}
    )
    db = Database(settings.db_url)
    engine = Engine(registry, torch.device(device))
    runner = JobRunner(
        db, engine, catalog.get, settings.results_dir, settings.result_destination_list
    )
    hook = ProgressHook(conn.send)
    conn.send(("ready", None, None))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                break
            if message[0] == "stop":
                break
            _, job_id, worker, attempt = message
            try:
                spec = catalog.get(_pipeline_of(db, job_id))
                models = list(spec.models) if spec else []
                hook.begin(job_id, models)
                for model_id in models:
                    hook.install(model_id, getattr(engine.runner(model_id), "predictor", None))
                state = runner.run(job_id, (worker, attempt))
            except Exception as exc:
                log.error("job %s failed: %s", job_id, traceback.format_exc())
                kind = "input_error" if is_input_error(exc) else "error"
                conn.send((kind, job_id, f"{type(exc).__name__}: {exc}"))
            else:
                conn.send(("done", job_id, state))
    finally:
        db.dispose()
    _exit_now()


def _exit_now() -> None:
    """End the child at once after a ``stop`` or a closed pipe: the interpreter's own
    shutdown, with torch and the models loaded, takes one to two seconds (module teardown,
    thread pools) that a stopping node would wait. Nothing is left to finalise: the
    database engine is disposed, logs are flushed here, and a job's files are written and
    closed before its ``done`` answer (an unanswered job is requeued by the parent)."""
    # Named semaphores this process made (torch, nnU-Net) are unlinked by their
    # finalizers; skipped, the parent's resource tracker warns of them as leaked.
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers(0)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _pipeline_of(db: Any, job_id: int) -> str:
    from db.models import Job

    with db.session() as s:
        return s.get_one(Job, job_id).pipeline


def is_input_error(exc: BaseException) -> bool:
    """The job's input is wrong (an unreadable image, a missing phase, a bad path): a retry
    would fail the same way, so the job fails at once with the reason."""
    from inference.engine import PipelineInputError
    from inference.path_api import PathInputError
    from inference.volume import SeriesReadError

    return isinstance(exc, PipelineInputError | PathInputError | SeriesReadError)
