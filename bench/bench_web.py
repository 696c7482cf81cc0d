"""Web latency with 10,000 studies: p50 / p95 of the dashboard, /studies and /api/studies.

    .venv/bin/python bench/bench_web.py [--studies 10000] [--requests 100] [--no-postgres]

Studies (2 series, 1 job, 1 send, 3 events each) are inserted straight into the database;
requests go through the real app in-process (Starlette TestClient, logged in as an admin),
so the numbers are the app's and the database's time, not the network's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.models import Dispatch, Event, Job, Series, Study  # noqa: E402
from db.session import Database  # noqa: E402
from dicom_node.view import ServiceView  # noqa: E402
from dicom_node.web import create_app  # noqa: E402
from kernel.settings import load_settings  # noqa: E402
from tests.conftest import POSTGRES_URL, reset_postgres  # noqa: E402
from tests.web_helpers import login  # noqa: E402

ENDPOINTS = [
    "/",
    "/studies",
    "/api/studies",
    "/api/studies?q=ACC00042",
    "/api/studies?status=failed",
]


def populate(db: Database, n: int) -> None:
    now = datetime.now(UTC)
    studies, series, jobs, sends, events = [], [], [], [], []
    for i in range(n):
        at = now - timedelta(minutes=n - i)
        uid = f"1.2.826.0.1.3680043.10.9.{i}"
        studies.append(
            dict(
                id=i + 1,
                study_uid=uid,
                patient_id=f"PID{i:05d}",
                patient_name="BENCH^X",
                accession_number=f"ACC{i:05d}",
                study_date=at.strftime("%Y%m%d"),
                first_received_at=at,
                last_received_at=at,
            )
        )
        for k in range(2):
            series.append(
                dict(
                    study_id=i + 1,
                    series_uid=f"{uid}.{k}",
                    modality="CT",
                    state="complete",
                    instance_count=100,
                    first_received_at=at,
                    last_received_at=at,
                    completed_at=at,
                    routed_at=at,
                    phase="AP"[k],
                )
            )
        state = "failed" if i % 50 == 0 else "done"
        jobs.append(
            dict(
                id=i + 1,
                study_id=i + 1,
                pipeline="tumor",
                inputs={"image": f"{uid}.1"},
                priority=0,
                state=state,
                attempts=1,
                max_attempts=3,
                progress=1.0,
                queued_at=at,
                started_at=at,
                finished_at=at + timedelta(seconds=20),
            )
        )
        sends.append(
            dict(
                study_id=i + 1,
                kind="result",
                sop_uid=f"{uid}.99",
                sop_class_uid="1.2",
                path="/x",
                destination="pacs",
                state="sent",
                attempts=1,
                created_at=at,
                next_attempt_at=at,
                sent_at=at + timedelta(seconds=25),
            )
        )
        for kind in ("study_received", "series_complete", "job_done"):
            events.append(dict(at=at, level="info", kind=kind, study_uid=uid, message=kind))
    with db.engine.begin() as conn:
        for model, rows in (
            (Study, studies),
            (Series, series),
            (Job, jobs),
            (Dispatch, sends),
            (Event, events),
        ):
            for start in range(0, len(rows), 2000):
                conn.execute(model.__table__.insert(), rows[start : start + 2000])


def measure(url: str, n_studies: int, n_requests: int, data_dir: Path) -> dict[str, tuple]:
    from dicom_node.web.users import add_user

    upgrade(url)
    db = Database(url)
    populate(db, n_studies)
    add_user(db, "ada", "correct horse battery", "admin")
    service = ServiceView(
        settings=load_settings(None, data_dir=data_dir, min_free_bytes=0),
        db=db,
        rules=None,  # type: ignore[arg-type]  # the measured pages do not read the rules
        registry=None,  # type: ignore[arg-type]
        loops=dict,
        listening=lambda: True,
        listener_address=lambda: None,
        devices=(),
        associations_requested=lambda: 0,
        wake_dispatcher=lambda: None,
    )
    client = TestClient(create_app(service))
    login(client, "ada")
    out = {}
    for path in ENDPOINTS:
        for _ in range(5):  # warm caches and the connection pool
            client.get(path)
        times = []
        for _ in range(n_requests):
            t0 = time.perf_counter()
            r = client.get(path)
            times.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, (path, r.status_code)
        times.sort()
        out[path] = (statistics.median(times), times[int(0.95 * (len(times) - 1))])
    db.dispose()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_web_"))
    results = {"sqlite": measure(f"sqlite:///{tmp / 'node.db'}", args.studies, args.requests, tmp)}
    if not args.no_postgres:
        reset_postgres(POSTGRES_URL)
        results["postgresql"] = measure(POSTGRES_URL, args.studies, args.requests, tmp)
    print(f"\n{args.studies} studies, {args.requests} requests per endpoint (ms)\n")
    print("| database | endpoint | p50 ms | p95 ms | goal p95 <= 100 |")
    print("| --- | --- | ---: | ---: | --- |")
    for dbname, rows in results.items():
        for path, (p50, p95) in rows.items():
            verdict = "ok" if p95 <= 100 else "MISSED"
            print(f"| {dbname} | `{path}` | {p50:.1f} | {p95:.1f} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
