"""The embedded worker with its real spawn child and the real tiny nnU-Net model (SQLite):
kill -9 of the child, time limit, cancel of a running job, retry-then-fail."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Dispatch, Event, Instance, Result
from db.session import Database
from inference import queue
from inference.worker import LocalWorker
from tests.conftest import wait_until
from tests.test_queue_support import job_row, queue_job, record_study, worker_settings

pytestmark = pytest.mark.slow


class Running:
    """A LocalWorker thread (and its warm child) for one test."""

    def __init__(self, tmp_path: Path, **worker: object) -> None:
        self.settings = worker_settings(
            tmp_path,
            worker=worker,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
        )
        upgrade(self.settings.db_url)
        self.db = Database(self.settings.db_url)
        self.worker = LocalWorker(self.db, self.settings, "cpu")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run_forever, args=(self.stop,))
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.worker.shutdown()
        self.thread.join(30)
        self.db.dispose()


@pytest.fixture
def running(tmp_path: Path) -> Iterator:
    started: list[Running] = []

    def _start(**worker: object) -> Running:
        r = Running(tmp_path, **worker)
        started.append(r)
        return r

    yield _start
    for r in started:
        r.close()


def _wait_mid_job(db: Database, job_id: int) -> None:
    """Just started: the tiny model's job takes a few seconds on a CPU (child start, series
    load, resampling, prediction, SEG); the tests check afterwards that the kill or
    cancel really hit the running attempt."""
    wait_until(lambda: job_row(db, job_id).state == "running", 120, "the job running")
    time.sleep(0.3)


def test_killed_child_costs_one_attempt_and_the_seg_is_recorded_once(tmp_path, running):
    r = running()
    study, series_uid = record_study(r.db, tmp_path / "study")
    job_id = queue_job(r.db, study, series_uid)
    _wait_mid_job(r.db, job_id)
    os.kill(r.worker.supervisor.process.pid, signal.SIGKILL)
    wait_until(lambda: job_row(r.db, job_id).state == "done", 120, "the retried job done")
    row = job_row(r.db, job_id)
    assert row.attempts == 2 and row.progress == 1.0
    assert r.worker.supervisor.children_started == 2
    with r.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 1
        dispatches = s.scalars(select(Dispatch)).all()
        assert [(d.destination, d.state) for d in dispatches] == [("pacs", "pending")]
        events = s.scalars(select(Event).where(Event.job_id == job_id)).all()
    retries = [e.message for e in events if e.kind == "job_retry"]
    assert len(retries) == 1 and "worker child died (exit code -9" in retries[0]
    assert [e.kind for e in events].count("result_written") == 1


def test_time_limit_kills_the_child_and_fails_with_the_error(tmp_path, running):
    r = running(pipeline_time_limits_s={"tumor": 1.0})
    study, series_uid = record_study(r.db, tmp_path / "study")
    job_id = queue_job(r.db, study, series_uid, max_attempts=1)
    wait_until(lambda: job_row(r.db, job_id).state == "failed", 120, "the job failed")
    row = job_row(r.db, job_id)
    assert row.last_error == "time limit of 1 s exceeded (pipeline tumor)"
    wait_until(lambda: r.worker.supervisor.children_started == 2, 60, "a fresh child")


def test_cancel_stops_a_running_job_and_the_worker_goes_on(tmp_path, running):
    r = running()
    study, series_uid = record_study(r.db, tmp_path / "study")
    first = queue_job(r.db, study, series_uid)
    _wait_mid_job(r.db, first)
    assert queue.cancel(r.db, first) == "cancelling"
    second = queue_job(r.db, study, series_uid)  # the same inputs may be queued again
    wait_until(lambda: job_row(r.db, first).state == "cancelled", 30, "the job cancelled")
    wait_until(lambda: job_row(r.db, second).state == "done", 120, "the next job done")
    assert job_row(r.db, first).attempts == 1


def test_an_unreadable_series_is_retried_then_failed_with_the_error(tmp_path, running):
    r = running(max_attempts=2)
    study, series_uid = record_study(r.db, tmp_path / "study")
    with r.db.session() as s:
        for inst in s.scalars(select(Instance)):
            Path(inst.path).unlink()
    job_id = queue_job(r.db, study, series_uid, max_attempts=2)
    wait_until(lambda: job_row(r.db, job_id).state == "failed", 120, "the job failed")
    row = job_row(r.db, job_id)
    assert row.attempts == 2 and row.last_error
    assert r.worker.supervisor.children_started == 1  # an error is not a crash


def _never_ready(conn: object, settings_data: object, device: str) -> None:
    """A worker child that never answers "ready" (a slow torch import, stretched)."""
    time.sleep(600)


def test_a_stop_while_the_child_starts_does_not_wait_for_it(tmp_path):
    """The node stops seconds after it started, its child still starting: the worker
    thread ends at once and the child (running nothing yet) is killed, instead of the
    stop waiting for the child to come up (CHILD_START_TIMEOUT_S at worst)."""
    settings = worker_settings(tmp_path)
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    worker = LocalWorker(db, settings, "cpu")
    worker.supervisor.child_target = _never_ready
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,))
    thread.start()
    try:
        child = wait_until(lambda: worker.supervisor.process, 60, "the child started")
        assert child.is_alive()
        asked = time.monotonic()
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        assert time.monotonic() - asked < 5.0  # the child would answer in 600 s
        assert not child.is_alive() and worker.supervisor.process is None
    finally:
        stop.set()
        worker.shutdown()
        thread.join(30)
        db.dispose()
