"""Database layer on SQLite and on the real PostgreSQL: schema, records, queue."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy
from sqlalchemy import select

from db.migrate import downgrade, upgrade
from db.models import Dispatch, Event, Instance, Job, Series, Study, utcnow
from dicom_node.instance import InstanceHeader
from dicom_node.records import Origin, record_instance
from inference import queue

ORIGIN = Origin("CT1", "DICOM_NODE", "127.0.0.1")


def header(sop: str, series: str = "1.2.3.2", study: str = "1.2.3.1") -> InstanceHeader:
    return InstanceHeader(
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        instance_number=int(sop.rsplit(".", 1)[-1]),
        patient_id="PID",
    )


def test_migrations_go_down_and_up_again(db_url):
    downgrade(db_url, "base")
    engine = sqlalchemy.create_engine(db_url)
    assert "jobs" not in sqlalchemy.inspect(engine).get_table_names()
    upgrade(db_url)
    tables = set(sqlalchemy.inspect(engine).get_table_names())
    engine.dispose()
    assert {"studies", "series", "instances", "jobs", "results", "dispatches", "events"} <= tables


def test_sqlite_runs_in_wal_mode(tmp_path):
    from db.session import Database

    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    database.dispose()


def test_instances_are_recorded_once_per_sop_uid(db):
    for sop in ("1.2.3.2.1", "1.2.3.2.2", "1.2.3.2.1"):
        record_instance(db, header(sop), f"/spool/{sop}.dcm", 100, ORIGIN)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        rows = s.scalars(select(Instance).order_by(Instance.sop_uid)).all()
        assert study.patient_id == "PID"
        assert series.instance_count == 2 and series.calling_ae == "CT1"
        assert [r.receive_count for r in rows] == [2, 1]
        assert s.scalars(select(Event.kind)).all() == ["study_received"]


def test_late_instance_reopens_a_complete_series(db):
    record_instance(db, header("1.2.3.2.1"), "/a", 1, ORIGIN)
    with db.session() as s:
        s.scalars(select(Series)).one().state = "complete"
    assert record_instance(db, header("1.2.3.2.2"), "/b", 1, ORIGIN) is True
    with db.session() as s:
        assert s.scalars(select(Series)).one().state == "receiving"
        assert "series_reopened" in s.scalars(select(Event.kind)).all()


def _study(db) -> Study:
    record_instance(db, header("1.2.3.2.1"), "/a", 1, ORIGIN)
    with db.session() as s:
        return s.scalars(select(Study)).one()


def test_claim_takes_urgent_first_then_oldest(db):
    study = _study(db)
    with db.session() as s:
        study = s.merge(study)
        first = queue.enqueue(s, study, "tumor", {"image": "1"})
        second = queue.enqueue(s, study, "tumor", {"image": "2"})
        urgent = queue.enqueue(s, study, "tumor", {"image": "3"}, priority="urgent")
        assert queue.enqueue(s, study, "tumor", {"image": "1"}) is None  # already waiting
    order = [queue.claim(db, "w", "cpu").id for _ in range(3)]
    assert order == [urgent.id, first.id, second.id]
    assert queue.claim(db, "w", "cpu") is None


def test_concurrent_claims_never_share_a_job(db):
    study = _study(db)
    with db.session() as s:
        study = s.merge(study)
        for i in range(20):
            queue.enqueue(s, study, "tumor", {"image": str(i)})
    claimed: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        while (job := queue.claim(db, threading.current_thread().name, "cpu")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20


def test_failed_attempts_retry_with_backoff_then_fail(db):
    study = _study(db)
    with db.session() as s:
        job = queue.enqueue(s, s.merge(study), "tumor", {"image": "1"}, max_attempts=2)
    assert queue.claim(db, "w", "cpu").id == job.id
    assert queue.fail(db, job.id, "RuntimeError: boom") == "queued"
    assert queue.claim(db, "w", "cpu") is None  # not before the backoff
    with db.session() as s:
        s.get_one(Job, job.id).not_before = utcnow() - timedelta(seconds=1)
    assert queue.claim(db, "w", "cpu").id == job.id
    assert queue.fail(db, job.id, "RuntimeError: boom again") == "failed"
    with db.session() as s:
        row = s.get_one(Job, job.id)
        assert (row.state, row.attempts, row.last_error) == (
            "failed",
            2,
            "RuntimeError: boom again",
        )


def test_abandoned_running_job_is_requeued_without_losing_an_attempt(db):
    study = _study(db)
    with db.session() as s:
        job = queue.enqueue(s, s.merge(study), "tumor", {"image": "1"})
    queue.claim(db, "w", "cpu")
    assert queue.requeue_abandoned(db) == 1
    with db.session() as s:
        row = s.get_one(Job, job.id)
        assert (row.state, row.attempts) == ("queued", 0)


def test_one_dispatch_row_per_instance_and_destination(db):
    _study(db)
    with db.session() as s:
        s.add(
            Dispatch(
                kind="result", sop_uid="1.2", sop_class_uid="1.2", path="/x", destination="pacs"
            )
        )
    with pytest.raises(sqlalchemy.exc.IntegrityError), db.session() as s:
        s.add(
            Dispatch(
                kind="result", sop_uid="1.2", sop_class_uid="1.2", path="/x", destination="pacs"
            )
        )
