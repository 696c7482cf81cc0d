"""Scale-out on real servers: a real ``dicom-node worker`` (Celery, solo pool) against the
Redis and PostgreSQL of the test machine runs a job; killed with -9 mid-job, the job
runs again on another worker once its lease expires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from db.session import Database
from inference.celery_app import make_app, publisher
from inference.keeper import QueueKeeper
from tests.conftest import REDIS_START, ensure_postgres, reset_postgres, wait_until
from tests.test_queue_support import job_row, queue_job, record_study, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REDIS_URL = "redis://127.0.0.1:6379/11"


def ensure_redis() -> str:
    """The test Redis, started if it is down; fails (never skips) if it cannot be."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        subprocess.run(REDIS_START, shell=True, check=False, capture_output=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Redis at {REDIS_URL} is down and `{REDIS_START}` failed")
                time.sleep(0.3)
    return REDIS_URL


def _start_worker(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "-c", str(config), "worker", "--device", "cpu"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")},
    )


def test_celery_worker_runs_jobs_and_a_killed_workers_job_runs_again(tmp_path):
    url = ensure_postgres()
    reset_postgres(url)
    settings = worker_settings(
        tmp_path,
        worker={
            "broker_url": ensure_redis(),
            "celery_queue": f"test-{uuid.uuid4().hex[:8]}",
            "lease_s": 4,
            "heartbeat_s": 0.5,
        },
        database_url=url,
    )
    from db.migrate import upgrade

    upgrade(url)
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    db = Database(url)
    app = make_app(settings)
    keeper = QueueKeeper(db, settings.worker, publisher(app, settings.worker.celery_queue), 0.5)
    stop = threading.Event()
    loop = threading.Thread(target=keeper.run_forever, args=(stop,), daemon=True)
    log = tmp_path / "worker.log"
    workers = [_start_worker(config, log)]
    try:
        loop.start()
        study, series_uid = record_study(db, tmp_path / "study")
        first = queue_job(db, study, series_uid)
        wait_until(lambda: job_row(db, first).state == "done", 180, "job done by Celery")
        row = job_row(db, first)
        assert "/celery/cpu/" in row.worker and row.attempts == 1, log.read_text()[-3000:]

        # Another series: the worker remembers label maps by content, and the first
        # series' job would now finish before the kill.
        other, other_series_uid = record_study(db, tmp_path / "other", seed=4)
        second = queue_job(db, other, other_series_uid)
        wait_until(lambda: job_row(db, second).state == "running", 60, "second job running")
        time.sleep(0.2)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        workers.append(_start_worker(config, log))
        wait_until(lambda: job_row(db, second).state == "done", 180, "job done elsewhere")
        row = job_row(db, second)
        assert row.attempts == 2 and str(workers[1].pid) in row.worker
        assert "stopped heart-beating" in (row.last_error or "") or row.last_error is None
    finally:
        stop.set()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
                try:
                    w.wait(20)
                except subprocess.TimeoutExpired:
                    w.kill()
        db.dispose()
