"""Least privilege: the README's role table is the app's route table, and every route
answers each role 403 exactly where the table says so (and 401 / the login page without
a login). Every refusal is in the audit trail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicom_node.web import create_app, users
from dicom_node.web.auth import OPEN_ROUTES, check_routes, route_roles
from kernel.settings import REPO_ROOT
from tests.security_helpers import audit_rows, role_users, running_node

ROW = re.compile(
    r"^\| `(GET|POST) (/[^`]*)` \| ([a-z ()]+?) \| (.+?) \| (.+?) \| (.+?) \| (.+?) \|"
)
# Path parameters of the walk: ids and names nothing has, so allowed requests that get
# through change nothing (404 / 409 / 422), and a valid value where the route checks it.
SAMPLES = {
    "study_uid": "1.2.826.0.1.3680043.10.999",
    "result_id": "987654",
    "job_id": "987654",
    "token_id": "987654",
    "z": "0",
    "action": None,  # per route, below
    "name": "no-such-destination",
    "username": "no-such-user",
    "pipeline": "no-such-pipeline",
    "retrieve_id": "987654",
}
ACTIONS = {"/api/jobs/{job_id}/{action}": "retry", "/api/users/{username}/{action}": "unlock"}


def readme_table() -> dict[tuple[str, str], tuple[str, dict[str, bool]]]:
    """(method, path) -> (needs, {role: allowed}) from README's role table."""
    table = {}
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            method, path, needs, *cells = m.groups()
            allowed = {
                role: cell.strip() == "✓" for role, cell in zip(users.ROLES, cells, strict=True)
            }
            table[(method, path)] = (needs.strip(), allowed)
    return table


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    with running_node(tmp_path_factory.mktemp("roles")) as running:
        yield running


def _url(path: str) -> str:
    def fill(m: re.Match[str]) -> str:
        return ACTIONS[path] if m.group(1) == "action" else SAMPLES[m.group(1)]

    return re.sub(r"\{(\w+)\}", fill, path)


def test_readme_role_table_is_the_route_table_and_each_role_gets_403_exactly_there(node):
    from fastapi.testclient import TestClient

    documented = readme_table()
    app = create_app(node.view())
    declared = route_roles(app)
    assert set(documented) == set(declared), (
        f"undocumented: {sorted(set(declared) - set(documented))}; "
        f"gone: {sorted(set(documented) - set(declared))}"
    )
    for key, (needs, allowed) in documented.items():
        role = declared[key]
        if role is None:
            assert needs == "open" and key in OPEN_ROUTES, key
            assert all(allowed.values()), key
            continue
        assert needs == role, (key, needs, role)
        assert allowed == {r: users.may(r, role) for r in users.ROLES}, key

    headers = role_users(node)
    client = TestClient(app)
    denied = 0
    for (method, path), role in sorted(declared.items()):
        if role is None:
            continue
        url = _url(path)
        anonymous = client.request(method, url, json={}, follow_redirects=False)
        if path.startswith(("/api/", "/inference/", "/models", "/dicomweb/")):
            assert anonymous.status_code == 401, (method, url, anonymous.status_code)
        else:  # a page: to the login form
            assert anonymous.status_code == 303, (method, url, anonymous.status_code)
            assert anonymous.headers["location"].startswith("/login"), (method, url)
        for user_role, auth in headers.items():
            r = client.request(method, url, headers=auth, json={}, follow_redirects=False)
            if users.may(user_role, role):
                assert r.status_code not in (401, 403), (method, url, user_role, r.text)
                assert r.status_code < 500, (method, url, user_role, r.text)
            else:
                denied += 1
                assert r.status_code == 403, (method, url, user_role, r.status_code)
                article = {"operator": "an", "admin": "an"}.get(user_role, "a")
                assert f"is {article} {user_role}; only" in r.json()["detail"], r.text
    refused = audit_rows(node, action="request_denied")
    assert len(refused) == denied
    assert {(r.actor, r.outcome) for r in refused} >= {("viewer-user", "denied")}
    assert refused[-1].detail["needs"] in users.ROLES and refused[-1].detail["token"]


def test_a_route_without_a_declared_role_stops_the_app(node):
    from fastapi import APIRouter

    app = create_app(node.view())
    stray = APIRouter()

    @stray.get("/forgotten")
    def forgotten() -> dict[str, str]:
        return {"patient": "data"}

    app.include_router(stray)
    with pytest.raises(RuntimeError, match="GET /forgotten"):
        check_routes(app)


def test_the_roles_table_names_every_cli_command():
    """README lists the CLI commands too (they need the settings file, not a role)."""
    from dicom_node.cli import build_parser

    text = Path(REPO_ROOT / "README.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        nested = [a for a in command._actions if getattr(a, "choices", None) and a.dest != "help"]
        names = [f"{name} {child}" for a in nested for child in a.choices] or [name]
        for full in names:
            assert f"`dicom-node {full}" in text, f"`dicom-node {full}` missing from README"
