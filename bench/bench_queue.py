"""Queue overhead: no-op jobs through the embedded worker and through Celery.

Measures what the queue itself costs per job: enqueue, atomic claim, hand-over to the
warm spawn child over a Pipe, the child's answer and the "done" transaction. The child
here is a no-op (``noop_child``) instead of ``inference.child.child_main``, so no model
runs; everything else is the production code path (LocalWorker / Celery task,
DeviceSupervisor, queue.claim / finish, QueueKeeper publishing).

    .venv/bin/python bench/bench_queue.py                 # both modes, 200 jobs
    .venv/bin/python bench/bench_queue.py --jobs 50 --only embedded
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from sqlalchemy import select, text  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.models import Job, Study  # noqa: E402
from db.session import Database  # noqa: E402
from kernel.settings import load_settings  # noqa: E402

# A database of its own: the test suite resets the schema of `test` at will.
POSTGRES_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/bench_queue"
REDIS_URL = "redis://127.0.0.1:6379/12"


def noop_child(conn: Any, settings_data: dict[str, Any], device: str) -> None:
    """A worker child that finishes every job at once (queue overhead only)."""
    from inference import queue
    from kernel.settings import NodeSettings

    db = Database(NodeSettings(**settings_data).db_url)
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        _, job_id, worker, attempt = message
        conn.send(("done", job_id, queue.finish(db, job_id, {}, owner=(worker, attempt))))


def _settings(data_dir: Path, database_url: str | None, **worker: Any) -> Any:
    # The tumor model and rules using only it: a Celery worker checks the registry and
    # rules at start, as in production; no model runs here.
    from tests.test_queue_support import models_file, rules_file

    base = {"device": "cpu", "poll_interval_s": 0.05, "heartbeat_s": 1.0, **worker}
    data_dir.mkdir(parents=True, exist_ok=True)
    return load_settings(
        None,
        models_file=models_file(data_dir),
        rules_file=rules_file(data_dir),
        data_dir=data_dir,
        database_url=database_url,
        web={"enabled": False},
        worker=base,
    )


def _enqueue(db: Database, n: int) -> None:
    from inference import queue

    with db.session() as s:
        study = Study(study_uid=f"2.25.{uuid.uuid4().int}")
        s.add(study)
        s.flush()
        for i in range(n):
            queue.enqueue(s, study, "noop", {"image": str(i)})


def _measure(db: Database, n: int, timeout_s: float = 600) -> dict[str, float]:
    t0 = time.perf_counter()
    _enqueue(db, n)
    deadline = time.monotonic() + timeout_s
    while True:
        with db.session() as s:
            done = s.scalar(text("SELECT count(*) FROM jobs WHERE state = 'done'"))
        if done >= n or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    with db.session() as s:
        jobs = s.scalars(select(Job)).all()
        waits = [(j.started_at - j.queued_at).total_seconds() for j in jobs if j.started_at]
    return {
        "jobs": n,
        "done": done,
        "seconds": elapsed,
        "jobs_per_s": done / elapsed,
        "median_wait_ms": statistics.median(waits) * 1000 if waits else float("nan"),
    }


def _sequential_wait_ms(db: Database, n: int) -> float:
    """Median enqueue-to-start of jobs enqueued one at a time into an idle queue."""
    waits = []
    for _ in range(n):
        with db.session() as s:
            s.execute(text("DELETE FROM events"))
            s.execute(text("DELETE FROM jobs"))
        _measure(db, 1, 60)
        with db.session() as s:
            j = s.scalars(select(Job)).one()
            waits.append((j.started_at - j.queued_at).total_seconds() * 1000)
    return statistics.median(waits)


def _reset(db: Database) -> None:
    with db.session() as s:
        s.execute(text("DELETE FROM events"))
        s.execute(text("DELETE FROM jobs"))


def bench_embedded(n: int, tmp: Path) -> dict[str, float]:
    from inference.worker import LocalWorker

    settings = _settings(tmp / "embedded", None)
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    worker = LocalWorker(db, settings, "cpu")
    worker.supervisor.child_target = noop_child
    worker.supervisor.ensure_child()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        result = _measure(db, n)
        result["idle_wait_ms"] = _sequential_wait_ms(db, 10)
        return result
    finally:
        stop.set()
        worker.shutdown()
        db.dispose()


def bench_celery(n: int, tmp: Path) -> dict[str, float]:
    import sqlalchemy

    from inference.celery_app import make_app, publisher
    from inference.keeper import QueueKeeper

    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS bench_queue"))
        conn.execute(text("CREATE DATABASE bench_queue"))
    admin.dispose()
    upgrade(POSTGRES_URL)
    q = f"bench-{uuid.uuid4().hex[:8]}"
    settings = _settings(tmp / "celery", POSTGRES_URL, broker_url=REDIS_URL, celery_queue=q)
    config = tmp / "celery.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    worker = subprocess.Popen(
        [sys.executable, __file__, "--celery-worker", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "celery-worker.log").open("wb"),
    )
    db = Database(POSTGRES_URL)
    keeper = QueueKeeper(db, settings.worker, publisher(make_app(settings), q), interval_s=0.05)
    stop = threading.Event()
    threading.Thread(target=keeper.run_forever, args=(stop,), daemon=True).start()
    try:
        _enqueue(db, 1)  # wait for the worker (and its child) to be up
        try:
            _wait_done(db, 1, 120)
        except RuntimeError:
            print((tmp / "celery-worker.log").read_text()[-3000:], file=sys.stderr)
            raise
        _reset(db)
        result = _measure(db, n)
        result["idle_wait_ms"] = _sequential_wait_ms(db, 10)
        return result
    finally:
        stop.set()
        worker.terminate()
        worker.wait(30)
        db.dispose()


def _wait_done(db: Database, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with db.session() as s:
            if s.scalar(text("SELECT count(*) FROM jobs WHERE state = 'done'")) >= n:
                return
        time.sleep(0.1)
    raise RuntimeError("the Celery worker did not run the warm-up job")


def celery_worker_main(config: str) -> None:
    from inference.celery_app import make_app

    settings = load_settings(config)
    app = make_app(settings, device="cpu")
    app.runner.child_target = noop_child
    app.worker_main(
        ["worker", "--pool=solo", f"--queues={settings.worker.celery_queue}", "--loglevel=WARNING"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--only", default="embedded,celery")
    parser.add_argument("--celery-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.celery_worker:
        celery_worker_main(args.celery_worker)
        return 0
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.only.split(","):
            fn = {"embedded": bench_embedded, "celery": bench_celery}[mode]
            rows.append((mode, fn(args.jobs, Path(tmp))))
    print(
        f"{'mode':<10} {'jobs':>5} {'done':>5} {'seconds':>8} {'jobs/s':>8} "
        f"{'median enqueue->start (burst) ms':>33} {'idle enqueue->start ms':>23}"
    )
    for mode, r in rows:
        print(
            f"{mode:<10} {r['jobs']:>5} {r['done']:>5} {r['seconds']:>8.2f} "
            f"{r['jobs_per_s']:>8.1f} {r['median_wait_ms']:>33.0f} {r['idle_wait_ms']:>23.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
