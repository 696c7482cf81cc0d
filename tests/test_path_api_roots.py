"""The HTTP path API reads only under data_dir and path_api.allowed_roots, only for
operators, and tells nothing about the rest of the disk (same 403 whether a path exists
or not); refusals are audited."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from db.models import Job
from dicom_node.web import create_app
from kernel.settings import REPO_ROOT
from tests.security_helpers import audit_rows, role_users, running_node

# The shipped registry and rules (pipeline "tumor"); the worker stays off.
SHIPPED = {"models_file": REPO_ROOT / "models.yaml", "rules_file": REPO_ROOT / "routing_rules.yaml"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("roots")
    allowed, outside = base / "allowed", base / "outside"
    for folder in (allowed / "ct", outside / "ct"):
        folder.mkdir(parents=True)
        (folder / "1.dcm").write_bytes(b"\0" * 132 + b"DICM")
    (outside / "secret.txt").write_text("not an image")
    (allowed / "notes.txt").write_text("not an image")
    os.symlink(outside / "ct", allowed / "link-out")
    with running_node(base, path_api={"allowed_roots": [allowed]}, **SHIPPED) as node:
        yield node, allowed, outside, role_users(node)


def _post(client: TestClient, auth: dict, path: str):
    return client.post("/inference/tumor?wait_s=0", headers=auth, json={"image_path": path})


def test_viewers_and_reviewers_cannot_queue_path_jobs(site):
    node, allowed, _, headers = site
    client = TestClient(create_app(node.view()))
    for role in ("viewer", "reviewer"):
        r = _post(client, headers[role], str(allowed / "ct"))
        assert r.status_code == 403, r.text
        assert r.json()["detail"] == (
            f"user '{role}-user' is a {role}; only operator or admin users can do this"
        )
        r = client.get("/inference/jobs/1", headers=headers[role])
        assert r.status_code == 403
    r = client.get("/api/users", headers=headers["operator"])  # the web app's own check
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == "user 'operator-user' is an operator; only admin users can do this"
    r = _post(client, headers["operator"], str(allowed / "ct"))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    with node.db.session() as s:
        assert s.get(Job, job_id).inputs == {"image": {"path": str(allowed / "ct")}}
    assert client.get(f"/inference/jobs/{job_id}", headers=headers["operator"]).status_code == 202
    queued = audit_rows(node, action="path_job_queued", outcome="success")
    assert queued[-1].actor == "operator-user" and queued[-1].object_id == str(job_id)
    assert queued[-1].detail["paths"] == {"image": str(allowed / "ct")}


def test_outside_the_roots_is_one_answer_whether_or_not_the_path_exists(site):
    node, allowed, outside, headers = site
    client = TestClient(create_app(node.view()))
    admin = headers["admin"]
    with node.db.session() as s:
        jobs_before = s.scalar(select(func.count(Job.id)))
    probes = {
        "existing file": outside / "secret.txt",
        "existing folder": outside / "ct",
        "missing": outside / "nothing-here.nii.gz",
        "the password hashes": Path("/etc/shadow"),
        "root's home": Path("/root"),
        "missing under /": Path("/no/such/folder"),
        "dot-dot out of a root": allowed / ".." / "outside" / "ct",
        "link inside pointing out": allowed / "link-out",
        "the root's parent": allowed.parent,
        "a sibling named like the root": Path(str(allowed) + "-evil"),
    }
    answers = {}
    for name, path in probes.items():
        r = _post(client, admin, str(path))
        assert r.status_code == 403, (name, r.status_code, r.text)
        answers[name] = r.json()["detail"].replace(str(path), "<path>")
    assert len(set(answers.values())) == 1, answers  # no oracle: one wording for all
    assert "not under a folder the path API may read" in next(iter(answers.values()))
    with node.db.session() as s:
        assert s.scalar(select(func.count(Job.id))) == jobs_before  # nothing queued
    denied = audit_rows(node, action="path_job_queued", outcome="denied")
    assert len(denied) >= len(probes) and denied[-1].actor == "admin-user"


def test_inside_the_roots_the_usual_400s_and_data_dir_is_a_root(site):
    node, allowed, _, headers = site
    client = TestClient(create_app(node.view()))
    admin = headers["admin"]
    r = _post(client, admin, str(allowed / "missing.nii.gz"))
    assert r.status_code == 400 and "does not exist" in r.text
    r = _post(client, admin, str(allowed / "notes.txt"))
    assert r.status_code == 400 and "neither a NIfTI file nor a DICOM folder" in r.text
    r = _post(client, admin, "relative/ct")
    assert r.status_code == 400 and "absolute path" in r.text
    inside_data = Path(node.settings.data_dir) / "incoming"
    inside_data.mkdir(exist_ok=True)
    (inside_data / "1.dcm").write_bytes(b"x")
    r = _post(client, admin, str(inside_data))
    assert r.status_code == 202, r.text


def test_without_allowed_roots_only_the_data_folder_is_readable(tmp_path):
    with running_node(tmp_path, **SHIPPED) as node:
        headers = role_users(node)
        client = TestClient(create_app(node.view()))
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        assert node.settings.path_api.allowed_roots == []
        r = _post(client, headers["operator"], str(outside))
        assert r.status_code == 403, r.text
