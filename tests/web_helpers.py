"""Helpers of the web tests: a node without models, users, logged-in clients."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from db.models import Study
from dicom_node.web import create_app
from dicom_node.web.users import add_user, create_token
from inference import queue

RULES = """\
version: 1
rules:
  - name: ct-is-kept
    description: Every CT series is kept (test rule).
    when: {Modality: CT}
"""
PASSWORD = "correct horse battery"


def modelless_settings(tmp_path: Path) -> dict[str, Any]:
    """Settings overrides for a node that needs no trained model (worker off)."""
    models = tmp_path / "models.yaml"
    models.write_text("models: {}\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return {"models_file": models, "rules_file": rules, "worker": {"enabled": False}}


def make_users(node: Any) -> str:
    """An admin ``ada`` and a viewer ``vic``; returns an API token of ada."""
    add_user(node.db, "ada", PASSWORD, "admin")
    add_user(node.db, "vic", PASSWORD, "viewer")
    return create_token(node.db, "ada", "tests")


def login(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Log the client in; returns the session's CSRF token (from a page form)."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    home = client.get("/")
    return re.search(r'name="csrf_token" value="([^"]+)"', home.text).group(1)


def client_for(node: Any) -> TestClient:
    return TestClient(create_app(node.view()))


def failed_job(node: Any, study_uid: str = "1.2.826.0.1.3680043.10.1.1") -> int:
    """A real failed job row: queued, claimed and failed until no attempts are left."""
    with node.db.session() as s:
        study = Study(study_uid=study_uid, accession_number="ACC1", patient_id="PID1")
        s.add(study)
        s.flush()
        job = queue.enqueue(s, study, "broken", {"image": "1.2.3"}, max_attempts=1)
        job_id = job.id
    claimed = queue.claim(node.db, "test-worker", "cpu")
    assert claimed is not None and claimed.id == job_id
    assert queue.fail(node.db, job_id, "model 'broken' is not installed") == "failed"
    return job_id
