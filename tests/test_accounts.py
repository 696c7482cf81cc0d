"""Account lifecycle on the command line and the Users page: disable, enable, delete,
unlock, reset password, role, tokens with creator and expiry, revoke; sessions that end
on the server (logout, password change, idle time, lifetime). Every change is audited."""

from __future__ import annotations

import io
import re
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from db.models import ApiToken, WebSession, utcnow
from dicom_node.cli import main
from dicom_node.web import create_app
from tests.security_helpers import audit_rows, role_users, running_node
from tests.web_helpers import PASSWORD, failed_job, login

NEW_PASSWORD = "a different long passphrase"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    with running_node(tmp_path_factory.mktemp("accounts")) as running:
        role_users(running)
        yield running


@pytest.fixture
def cli(node, monkeypatch, capsys):
    """Run ``dicom-node`` in this process against the node's database: (status, out, err)."""
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(node.settings.data_dir))

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _client(node) -> TestClient:
    return TestClient(create_app(node.view()))


def _try_login(client: TestClient, username: str, password: str) -> int:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token},
        follow_redirects=False,
    )
    return r.status_code


def _logged_in(client: TestClient) -> bool:
    r = client.get("/api/queue")
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def test_command_line_account_lifecycle(node, cli):
    add = ("user", "add", "carol", "--role", "operator", "--password-stdin")
    code, _, err = cli(*add, stdin="short\n")
    assert code == 2 and "at least 12 characters" in err
    assert cli(*add, stdin=PASSWORD + "\n")[0] == 0
    code, out, _ = cli("token", "create", "ci", "--user", "carol", "--expires-days", "30")
    assert code == 0
    bearer = {"Authorization": f"Bearer {out.strip().splitlines()[-1]}"}

    browser = _client(node)
    assert _try_login(browser, "carol", PASSWORD) == 303 and _logged_in(browser)
    api = _client(node)
    assert api.get("/api/queue", headers=bearer).status_code == 200
    code, out, _ = cli("token", "list", "--user", "carol")
    line = out.strip().splitlines()[-1]
    token_id = int(line.split("\t")[0])
    assert "\tci\tcarol (operator)\tmade by cli:" in line and "last used never" not in line
    assert f"expires {(utcnow() + timedelta(days=30)).date().isoformat()}" in line

    # Disabled: the open session ends, the token and the password are refused.
    assert cli("user", "disable", "carol")[0] == 0
    assert not _logged_in(browser)
    assert api.get("/api/queue", headers=bearer).status_code == 401
    assert _try_login(_client(node), "carol", PASSWORD) == 401
    assert audit_rows(node, action="login", object_id="carol")[-1].detail == {"reason": "disabled"}
    assert cli("user", "enable", "carol")[0] == 0
    assert api.get("/api/queue", headers=bearer).status_code == 200

    # Locked after 5 wrong passwords; unlocked from the command line, the right one works
    # at once (the web's login rate limit forgets the attempts before the unlock too).
    browser = _client(node)
    codes = [_try_login(browser, "carol", "wrong password!") for _ in range(5)]
    assert codes == [401] * 5
    assert _try_login(browser, "carol", PASSWORD) == 429
    code, out, _ = cli("user", "list")
    assert "carol\toperator\tlocked\t" in out
    code, out, _ = cli("user", "unlock", "carol")
    assert code == 0 and "unlocked" in out
    assert _try_login(browser, "carol", PASSWORD) == 303 and _logged_in(browser)

    # A reset password ends the session; the old password is refused, the new one works.
    code, out, _ = cli(
        "user", "reset-password", "carol", "--password-stdin", stdin=NEW_PASSWORD + "\n"
    )
    assert code == 0 and "1 session(s) ended" in out
    assert not _logged_in(browser)
    assert _try_login(_client(node), "carol", PASSWORD) == 401
    assert _try_login(_client(node), "carol", NEW_PASSWORD) == 303

    # A role change counts from the next request.
    job_id = failed_job(node)
    assert cli("user", "role", "carol", "viewer")[0] == 0
    assert api.post(f"/api/jobs/{job_id}/retry", headers=bearer).status_code == 403

    code, out, _ = cli("token", "revoke", str(token_id))
    assert code == 0 and "('ci' of carol) revoked" in out
    assert api.get("/api/queue", headers=bearer).status_code == 401
    assert cli("token", "revoke", str(token_id))[0] == 2

    assert cli("user", "delete", "carol")[0] == 0
    assert "carol" not in cli("user", "list")[1]
    code, _, err = cli("user", "delete", "admin-user")
    assert code == 2 and "only enabled admin" in err

    done = [(r.action, r.outcome) for r in audit_rows(node, actor_kind="cli")]
    for expected in (
        ("user_created", "failure"),
        ("user_created", "success"),
        ("token_created", "success"),
        ("user_disabled", "success"),
        ("user_enabled", "success"),
        ("user_unlocked", "success"),
        ("password_reset", "success"),
        ("user_role_changed", "success"),
        ("token_revoked", "success"),
        ("user_deleted", "success"),
        ("user_deleted", "failure"),
    ):
        assert expected in done, expected
    row = audit_rows(node, action="user_deleted", outcome="success")[-1]
    assert row.object_id == "carol" and row.actor.startswith("cli:")
    assert row.source.startswith(row.actor + "@")


def _form(client: TestClient, url: str, csrf: str, **fields: str):
    return client.post(
        url, data={"csrf_token": csrf, "next": "/users", **fields}, follow_redirects=False
    )


def test_users_page_manages_accounts_and_tokens(node):
    admin = _client(node)
    csrf = login(admin, "admin-user")
    page = admin.get("/users")
    assert page.status_code == 200 and "operator-user" in page.text
    assert "reviewer tests" in page.text  # the tokens, by name

    r = _form(admin, "/api/users", csrf, username="dora", role="reviewer", password="short")
    assert r.status_code == 422 and "at least 12" in r.text
    same = "dora-the-explorer"
    r = _form(admin, "/api/users", csrf, username=same, role="viewer", password=same)
    assert r.status_code == 422 and "must not be the username" in r.text
    r = _form(admin, "/api/users", csrf, username="dora", role="reviewer", password=PASSWORD)
    assert r.status_code == 303 and "created" in r.headers["location"]
    dora = _client(node)
    login(dora, "dora")
    assert _form(admin, "/api/users/dora/disable", csrf).status_code == 303
    assert not _logged_in(dora)
    assert _form(admin, "/api/users/dora/enable", csrf).status_code == 303
    r = _form(admin, "/api/users/dora/reset-password", csrf, password=NEW_PASSWORD)
    assert r.status_code == 303 and "session" in r.headers["location"]
    assert _try_login(_client(node), "dora", NEW_PASSWORD) == 303
    assert _form(admin, "/api/users/dora/role", csrf, role="operator").status_code == 303
    assert _form(admin, "/api/users/dora/role", csrf, role="root").status_code == 422
    assert _form(admin, "/api/users/dora/unlock", csrf).status_code == 303
    assert _form(admin, "/api/users/nobody/disable", csrf).status_code == 404

    # The last enabled admin stays.
    r = _form(admin, "/api/users/admin-user/role", csrf, role="viewer")
    assert r.status_code == 409 and "only enabled admin" in r.text
    assert _form(admin, "/api/users/admin-user/disable", csrf).status_code == 409

    # Tokens: made over the API (shown once), listed, revoked from the page.
    r = admin.post(
        "/api/tokens",
        headers={"X-CSRF-Token": csrf},
        json={"user": "dora", "name": "scanner-bridge", "expires_days": "7"},
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["created_by"] == "admin-user" and made["expires_at"] and not made["expired"]
    bearer = {"Authorization": f"Bearer {made['token']}"}
    assert _client(node).get("/api/queue", headers=bearer).status_code == 200
    listed = admin.get("/api/tokens?user=dora").json()["tokens"]
    assert [t["name"] for t in listed] == ["scanner-bridge"] and "token" not in listed[0]
    assert _form(admin, f"/api/tokens/{made['id']}/revoke", csrf).status_code == 303
    assert _client(node).get("/api/queue", headers=bearer).status_code == 401

    # An expired token is refused.
    r = admin.post(
        "/api/tokens", headers={"X-CSRF-Token": csrf}, json={"user": "dora", "name": "old"}
    )
    old = r.json()
    with node.db.session() as s:
        s.get(ApiToken, old["id"]).expires_at = utcnow() - timedelta(seconds=1)
    expired = {"Authorization": f"Bearer {old['token']}"}
    assert _client(node).get("/api/queue", headers=expired).status_code == 401

    assert _form(admin, "/api/users/dora/delete", csrf).status_code == 303
    assert "dora" not in admin.get("/users").text
    actions = {(r.action, r.outcome) for r in audit_rows(node, actor="admin-user")}
    assert {
        ("user_created", "failure"),
        ("user_created", "success"),
        ("user_disabled", "success"),
        ("password_reset", "success"),
        ("user_role_changed", "failure"),
        ("token_created", "success"),
        ("token_revoked", "success"),
        ("user_deleted", "success"),
    } <= actions


def test_logout_and_password_change_end_the_session_on_the_server(node):
    browser = _client(node)
    csrf = login(browser, "viewer-user")
    stolen = browser.cookies.get("dicom_node_session")
    r = browser.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    replay = _client(node)
    replay.cookies.set("dicom_node_session", stolen)
    assert replay.get("/", follow_redirects=False).headers["location"].startswith("/login")
    assert replay.get("/api/queue").status_code == 401

    csrf = login(browser, "viewer-user")
    other = _client(node)
    login(other, "viewer-user")  # a second browser of the same user
    r = browser.post(
        "/api/account/password",
        data={"csrf_token": csrf, "current_password": "not it", "new_password": NEW_PASSWORD},
    )
    assert r.status_code == 422 and "current password is wrong" in r.text
    r = browser.post(
        "/api/account/password",
        data={"csrf_token": csrf, "current_password": PASSWORD, "new_password": NEW_PASSWORD},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].startswith("/login?msg=")
    assert not _logged_in(browser) and not _logged_in(other)
    assert _try_login(_client(node), "viewer-user", NEW_PASSWORD) == 303
    with node.db.session() as s:
        left = s.query(WebSession).count()
    assert left >= 1
    kinds = [(r.action, r.outcome) for r in audit_rows(node, actor="viewer-user")]
    assert ("logout", "success") in kinds and ("password_changed", "failure") in kinds
    assert ("password_changed", "success") in kinds


def test_sessions_end_after_idle_time_and_lifetime(tmp_path):
    """Idle 4 s, lifetime 8 s: a page refreshing itself (X-Partial) is no activity. (Steps
    1.6 s apart: a loaded CI machine may run a step late by most of a second.)"""
    web = {"host": "127.0.0.1", "port": 0, "session_idle_s": 4, "session_max_age_s": 8}
    with running_node(tmp_path, web=web) as node:
        role_users(node)
        idle, busy = _client(node), _client(node)
        login(idle, "viewer-user")
        login(busy, "viewer-user")
        start = time.monotonic()

        def at(t: float) -> None:
            time.sleep(max(0.0, start + t - time.monotonic()))

        partial = {"X-Partial": "1"}
        at(1.6)
        assert _logged_in(idle) and _logged_in(busy)
        at(3.2)
        assert _logged_in(idle) and _logged_in(busy)
        at(4.8)
        assert idle.get("/", headers=partial).status_code == 200 and _logged_in(busy)
        at(6.4)
        assert idle.get("/", headers=partial).status_code == 200 and _logged_in(busy)
        at(8.6)
        # idle: 5.4 s since its user last did something (the refreshes did not count);
        # busy: active every 1.6 s, but 8 s after its login.
        assert not _logged_in(idle)
        assert not _logged_in(busy)
