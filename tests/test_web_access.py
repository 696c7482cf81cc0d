"""Who may see and do what on the web side: login, CSRF, roles, tokens, rate limits."""

from __future__ import annotations

import logging

import pytest

from tests.web_helpers import client_for, failed_job, login, make_users, modelless_settings

PAGES = ["/", "/studies", "/queue", "/rules", "/destinations", "/studies/1.2.3"]
API_GETS = [
    "/api/dashboard",
    "/api/studies",
    "/api/studies/1.2.3",
    "/api/queue",
    "/api/rules",
    "/api/destinations",
    "/api/openapi.json",
    "/api/results/1/preview.png",
    "/models",  # the seed service's path API
    "/inference/jobs/1",
]
API_POSTS = [
    "/api/jobs/1/retry",
    "/api/jobs/1/cancel",
    "/api/jobs/1/priority",
    "/api/rules/dry-run",
    "/api/destinations/pacs/echo",
    "/api/destinations/pacs/resend",
    "/api/dispatches/resend",
    "/inference/tumor",
]


@pytest.fixture
def web(tmp_path, start_node):
    node = start_node(**modelless_settings(tmp_path))
    token = make_users(node)
    return node, token


def test_without_login_every_page_and_api_route_is_refused(web):
    node, _ = web
    client = client_for(node)
    for path in PAGES:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    for path in API_GETS:
        assert client.get(path).status_code == 401, path
    for path in API_POSTS:
        assert client.post(path, json={}).status_code == 401, path
    assert client.get("/api/studies", headers={"Authorization": "Bearer nope"}).status_code == 401
    # Open by design, and without patient data:
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_healthz_reports_scp_and_workers(web):
    node, _ = web
    health = client_for(node).get("/healthz").json()
    assert health["status"] == "ok"
    assert health["scp_listening"] is True and health["workers_alive"] is True


def test_logged_in_admin_sees_every_page_and_patient_id(web):
    node, _ = web
    failed_job(node)
    client = client_for(node)
    login(client, "ada")
    for path in PAGES[:-1] + ["/studies/1.2.826.0.1.3680043.10.1.1"]:
        assert client.get(path).status_code == 200, path
    for path in API_GETS[:2] + API_GETS[3:7]:
        assert client.get(path).status_code == 200, path
    assert client.get("/api/studies").json()["items"][0]["patient_id"] == "PID1"
    assert "paths" in client.get("/api/openapi.json").json()


def test_post_without_csrf_token_is_refused(web):
    node, _ = web
    job_id = failed_job(node)
    client = client_for(node)
    csrf = login(client, "ada")
    assert client.post(f"/api/jobs/{job_id}/retry").status_code == 403
    r = client.post(f"/api/jobs/{job_id}/retry", headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    r = client.post(f"/api/jobs/{job_id}/retry", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["ok"]
    assert client.get("/api/queue").json()["counts"] == {"queued": 1}
    # The login form itself is CSRF-protected too.
    fresh = client_for(node)
    r = fresh.post("/login", data={"username": "ada", "password": "x"}, follow_redirects=False)
    assert r.status_code == 403


def test_viewer_cannot_act_and_does_not_see_patient_id(web):
    node, _ = web
    job_id = failed_job(node)
    client = client_for(node)
    csrf = login(client, "vic")
    r = client.post(f"/api/jobs/{job_id}/retry", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403
    assert "Retry" not in client.get("/queue").text
    assert client.get("/api/studies").json()["items"][0]["patient_id"] is None
    assert "PID1" not in client.get("/studies").text


def test_api_token_acts_without_csrf(web):
    node, token = web
    job_id = failed_job(node)
    client = client_for(node)
    auth = {"Authorization": f"Bearer {token}"}
    r = client.post(f"/api/jobs/{job_id}/retry", headers=auth)
    assert r.status_code == 200
    r = client.post(f"/api/jobs/{job_id}/priority", headers=auth, json={"priority": "urgent"})
    assert r.status_code == 200
    queued = client.get("/api/queue", headers=auth).json()["queued"]
    assert [(j["id"], j["priority"]) for j in queued] == [(job_id, "urgent")]
    r = client.post(f"/api/jobs/{job_id}/retry", headers=auth)
    assert r.status_code == 409 and "only finished jobs" in r.json()["detail"]


def test_login_is_rate_limited_per_username(web):
    node, _ = web
    client = client_for(node)
    codes = []
    for _ in range(7):
        page = client.get("/login")
        token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        r = client.post(
            "/login",
            data={"username": "ada", "password": "wrong password", "csrf_token": token},
            follow_redirects=False,
        )
        codes.append(r.status_code)
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]


def test_patient_names_never_appear_in_the_log(web, caplog, tmp_path):
    from tests.dicom_factory import ct_series

    node, _ = web
    caplog.set_level(logging.DEBUG)
    from tests.conftest import storescu, wait_until

    files = ct_series(tmp_path / "in", n=2, description="LOCALIZER")
    assert storescu(files, node.settings.port).returncode == 0
    client = client_for(node)
    login(client, "ada")
    wait_until(lambda: client.get("/api/studies").json()["items"], 20, "the study listed")
    uid = client.get("/api/studies").json()["items"][0]["study_uid"]
    page = client.get(f"/studies/{uid}")
    assert page.status_code == 200
    assert "TEST^SECRET" not in page.text
    assert "TEST^SECRET" not in caplog.text


def test_cli_creates_users_and_tokens_that_log_in(tmp_path, monkeypatch, capsys):
    import io

    from db.session import Database
    from dicom_node.cli import main
    from dicom_node.web.users import authenticate, token_user

    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret password\n"))
    assert main(["user", "add", "root", "--role", "admin", "--password-stdin"]) == 0
    assert main(["token", "create", "prom", "--user", "root"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    db = Database(f"sqlite:///{tmp_path / 'data' / 'node.db'}")
    try:
        assert authenticate(db, "root", "s3cret password") == ("root", "admin")
        assert authenticate(db, "root", "wrong") is None
        assert token_user(db, token) == ("root", "admin")
    finally:
        db.dispose()
