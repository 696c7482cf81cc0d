"""Helpers shared by the queue tests (no tests here): a tiny model registry, a study in
the database, a queued job, a settings object the worker child can rebuild."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from db.models import Job, Study
from db.session import Database
from devkit.synth import generate_study
from dicom_node.instance import parse_header
from dicom_node.records import Origin, record_instance
from inference import queue
from kernel.settings import REPO_ROOT, NodeSettings
from tests.conftest import node_settings

STANDIN = Path("/tmp/prof/tumor_model")


def models_file(folder: Path) -> Path:
    """A registry with the tumor model: the shipped one if it is there, else the stand-in
    at /tmp/prof/tumor_model copied into ``folder``."""
    shipped = REPO_ROOT / "models" / "tumor"
    source = shipped if (shipped / "dataset.json").is_file() else STANDIN
    raw = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())
    model_dir = folder / "tumor_model"
    if not model_dir.exists():
        shutil.copytree(source, model_dir)
    raw["models"] = {"tumor": {**raw["models"]["tumor"], "folder": str(model_dir)}}
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rules_file(folder: Path) -> Path:
    """The shipped routing rules reduced to the plain ``tumor`` pipeline (no crop to
    another model, no image evidence), so the queue tests need only the one tiny model."""
    raw = yaml.safe_load((REPO_ROOT / "routing_rules.yaml").read_text(encoding="utf-8"))
    tumor = {k: v for k, v in raw["pipelines"]["tumor"].items() if k != "crop"}
    raw["pipelines"] = {"tumor": tumor}
    rules = []
    for rule in raw.get("rules") or []:
        if "pipelines" in rule:
            rule["pipelines"] = [p for p in rule["pipelines"] if p == "tumor"]
            if not rule["pipelines"]:
                continue
        rules.append(rule)
    raw["rules"] = rules
    # Only the tumour model is in these tests' registry: no image evidence of the phase
    # (its organ model); the synthetic studies' tags name their phases anyway.
    raw["phases"]["image_evidence"]["when"] = "never"
    path = folder / "routing_rules.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def worker_settings(
    tmp_path: Path, worker: dict[str, Any] | None = None, **kw: Any
) -> NodeSettings:
    base = {
        "poll_interval_s": 0.1,
        "device": "cpu",
        "heartbeat_s": 0.3,
        "retry_backoff_s": 0.0,
        "lease_s": 30,
    }
    base.update(worker or {})
    kw.setdefault("models_file", models_file(tmp_path))
    kw.setdefault("rules_file", rules_file(tmp_path))
    return node_settings(tmp_path, worker=base, web={"enabled": False}, **kw)


def record_study(db: Database, folder: Path, seed: int = 3) -> tuple[Study, str]:
    """A small portal-venous series recorded as received; returns (study, series uid)."""
    study = generate_study(
        folder, seed=seed, phases="P", rows=128, columns=128, pixel_spacing_mm=3.0
    )
    series = study.series[0]
    for path in series.files:
        data = Path(path).read_bytes()
        record_instance(
            db, parse_header(data), str(path), len(data), Origin("CT", "N", "127.0.0.1")
        )
    with db.session() as s:
        row = s.scalars(select(Study).where(Study.study_uid == study.study_uid)).one()
    return row, series.series_uid


def queue_job(
    db: Database, study: Study, series_uid: str, *, max_attempts: int = 3, priority: str = "normal"
) -> int:
    with db.session() as s:
        job = queue.enqueue(
            s,
            s.merge(study),
            "tumor",
            {"image": series_uid},
            max_attempts=max_attempts,
            priority=priority,
        )
        return job.id


def job_row(db: Database, job_id: int) -> Job:
    with db.session() as s:
        return s.get_one(Job, job_id)
