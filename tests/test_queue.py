"""Queue semantics on SQLite and on the real PostgreSQL: priority without starvation,
cancel, retry-then-fail, leases, ownership, expiry and GPU admission."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from db.models import Job, utcnow
from inference import queue
from inference.gpu import Admission
from inference.registry import load_registry
from kernel.catalog import PipelineSpec
from tests.test_queue_support import job_row, models_file, queue_job, record_study


def _jobs(db, tmp_path, n=1, **kw):
    study, series_uid = record_study(db, tmp_path / "study")
    return study, series_uid, [queue_job(db, study, f"{series_uid}.{i}", **kw) for i in range(n)]


def _age(db, job_id, seconds):
    with db.session() as s:
        s.get_one(Job, job_id).queued_at = utcnow() - timedelta(seconds=seconds)


def test_urgent_runs_first_but_a_long_waiting_normal_job_is_not_starved(db, tmp_path):
    study, uid, (old_normal, new_normal) = _jobs(db, tmp_path, 2)
    urgent = [queue_job(db, study, f"{uid}.u{i}", priority="urgent") for i in range(2)]
    _age(db, old_normal, 120)
    order = [queue.claim(db, "w", "cpu", promote_after_s=60).id for _ in range(4)]
    # The normal job that waited past promote_after_s ranks with the urgent ones (oldest
    # first); the fresh normal job waits for both urgent ones.
    assert order == [old_normal, *urgent, new_normal]


def test_cancel_a_queued_job_and_mark_a_running_one(db, tmp_path):
    _, _, (queued, running) = _jobs(db, tmp_path, 2)
    with db.session() as s:
        s.get_one(Job, running).priority = 10
    assert queue.claim(db, "w", "cpu").id == running
    assert queue.cancel(db, queued) == "cancelled"
    assert queue.cancel(db, running) == "cancelling"
    assert queue.heartbeat(db, running, ("w", 1)) == "cancelling"  # the worker stops it
    assert queue.fail(db, running, "cancelled while running", owner=("w", 1)) == "cancelled"
    assert queue.claim(db, "w", "cpu") is None


def test_retry_with_backoff_then_failed_with_the_error_kept(db, tmp_path):
    _, _, (job_id,) = _jobs(db, tmp_path, max_attempts=2)
    queue.claim(db, "w", "cpu")
    assert queue.fail(db, job_id, "RuntimeError: one", retry_base_s=30, owner=("w", 1)) == "queued"
    assert queue.claim(db, "w", "cpu") is None  # backing off
    with db.session() as s:
        s.get_one(Job, job_id).not_before = utcnow()
    queue.claim(db, "w", "cpu")
    assert queue.fail(db, job_id, "RuntimeError: two", owner=("w", 2)) == "failed"
    row = job_row(db, job_id)
    assert (row.state, row.attempts, row.last_error) == ("failed", 2, "RuntimeError: two")


def test_a_silent_worker_loses_its_job_and_cannot_finish_it_later(db, tmp_path):
    _, _, (job_id,) = _jobs(db, tmp_path, max_attempts=2)
    queue.claim(db, "lost-node", "cpu")
    assert queue.requeue_expired(db, lease_s=60) == 0  # heartbeat is fresh
    with db.session() as s:
        s.get_one(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)
    assert queue.requeue_expired(db, lease_s=60) == 1
    row = job_row(db, job_id)
    assert row.state == "queued" and "stopped heart-beating" in row.last_error
    assert queue.claim(db, "other", "cpu").id == job_id
    # The first worker wakes up: it neither heart-beats, finishes nor fails the job.
    assert queue.heartbeat(db, job_id, ("lost-node", 1)) is None
    assert queue.finish(db, job_id, {}, owner=("lost-node", 1)) == "running"
    assert queue.fail(db, job_id, "late", owner=("lost-node", 1)) == "running"
    assert queue.finish(db, job_id, {"ok": 1}, owner=("other", 2)) == "done"


def test_lease_expiry_on_the_last_attempt_fails_the_job(db, tmp_path):
    _, _, (job_id,) = _jobs(db, tmp_path, max_attempts=1)
    queue.claim(db, "w", "cpu")
    with db.session() as s:
        s.get_one(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=120)
    queue.requeue_expired(db, lease_s=60)
    assert job_row(db, job_id).state == "failed"


def test_queued_jobs_expire_after_the_maximum_age(db, tmp_path):
    _, _, (old, fresh) = _jobs(db, tmp_path, 2)
    _age(db, old, 3600)
    assert queue.expire_queued(db, max_age_s=600) == 1
    assert job_row(db, old).state == "expired" and job_row(db, fresh).state == "queued"


def test_a_job_waits_until_its_model_fits_in_free_gpu_memory(db, tmp_path):
    registry = load_registry(models_file(tmp_path))
    registry.models["tumor"].gpu_memory_mb = 3000
    free = {"cuda:0": 2000}

    catalog = {"tumor": PipelineSpec(models=["tumor"])}
    admission = Admission("cuda:0", catalog.get, registry, probe=free.get)
    _, _, (job_id,) = _jobs(db, tmp_path)
    assert queue.claim(db, "w", "cuda:0", admit=admission) is None
    assert job_row(db, job_id).state == "queued"
    free["cuda:0"] = 4000
    assert queue.claim(db, "w", "cuda:0", admit=admission).id == job_id
    # A CPU device has no GPU memory to manage: the probe answers None, the job starts.
    cpu = Admission("cpu", catalog.get, registry, probe=lambda d: None)
    _, _, (other,) = _jobs(db, tmp_path / "b")
    assert queue.claim(db, "w", "cpu", admit=cpu).id == other


def test_claim_by_several_workers_on_both_databases_takes_each_job_once(db, tmp_path):
    _, _, ids = _jobs(db, tmp_path, 6)
    got = [queue.claim(db, f"w{i % 3}", "cpu") for i in range(7)]
    assert sorted(j.id for j in got if j) == sorted(ids) and got[-1] is None
    with db.session() as s:
        assert set(s.scalars(select(Job.state))) == {"running"}
