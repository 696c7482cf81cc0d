"""Every path and query parameter is validated: numbers that overflow a 64-bit id, negative
limits, UIDs that are no UIDs get 422, never a server error; schemathesis fuzzes every
operation of the app's OpenAPI document in-process (ASGI) as an admin: 0 server errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from dicom_node.web import create_app
from tests.security_helpers import role_users, running_node
from tests.web_helpers import failed_job

# Examples per operation and generation mode: 32 operations x 2 modes x this.
EXAMPLES = 20


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory):
    with running_node(tmp_path_factory.mktemp("schema")) as node:
        headers = role_users(node)
        failed_job(node)  # a study and a failed job for the routes to find
        yield node, create_app(node.view()), headers["admin"]


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("GET", "/inference/jobs/1180591620717411303424", None),  # was 500 (OverflowError)
        ("GET", "/inference/jobs/0", None),
        ("GET", "/api/studies?limit=-1", None),  # was every row
        ("GET", "/api/studies?limit=0", None),
        ("GET", "/api/studies?limit=1001", None),
        ("GET", "/api/studies?offset=-1", None),
        ("GET", "/api/studies?status=sideways", None),
        ("GET", "/api/studies?date=2024", None),
        ("GET", "/api/studies/1.2.3%27%20OR%201=1", None),
        ("GET", "/api/results/99999999999999999999", None),
        ("GET", "/api/results/1/slices/-1.png", None),
        ("GET", "/api/results/1/slices/0.png?window=bone", None),
        ("POST", "/api/jobs/1/explode", {}),
        ("POST", "/api/jobs/9223372036854775808/retry", {}),
        ("POST", "/api/dispatches/resend", {"dispatch_ids": [-1]}),
        ("POST", "/api/dispatches/resend", {"dispatch_ids": "all"}),
        ("POST", "/api/dispatches/resend", [1, 2]),
        ("POST", "/api/jobs/1/priority", {"priority": ["urgent"]}),
        ("POST", "/inference/tumor?wait_s=-1", {"image_path": "/x"}),
        ("POST", "/inference/tumor?wait_s=1e300", {"image_path": "/x"}),
        ("POST", "/api/rules/dry-run?series_uid=abc", None),
        ("GET", "/api/audit?since=yesterday", None),
        ("GET", "/api/audit?limit=100000", None),
        ("GET", "/api/audit?action=everything", None),
        ("GET", "/api/tokens/1/revoke", None),  # 405: a GET on a POST route
        ("POST", "/api/users/ada/explode", {}),
        ("GET", "/studies?offset=-5", None),
        ("GET", "/results/0", None),
    ],
)
def test_bad_parameters_are_4xx(web, method, url, body):
    _node, app, admin = web
    r = TestClient(app).request(method, url, headers=admin, json=body)
    assert 400 <= r.status_code < 500, (url, r.status_code, r.text)


def test_form_resend_with_bad_ids_is_422(web):
    _node, app, admin = web
    r = TestClient(app).post("/api/dispatches/resend", headers=admin, data={"dispatch_id": "x"})
    assert r.status_code == 422


def test_schemathesis_finds_no_server_error(web):
    import schemathesis

    _node, app, admin = web
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app, headers=admin)
    errors: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30  # the API (pages are not in the schema)

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def call(case) -> None:
                response = case.call(headers=admin)
                if response.status_code >= 500:
                    errors.append(
                        f"{case.method} {case.formatted_path} {case.query} -> "
                        f"{response.status_code} {response.text[:200]}"
                    )

            try:
                call()
            except Unsatisfiable:
                # Nothing to get wrong (no parameters, no body): no negative case exists.
                assert mode == GenerationMode.NEGATIVE, operation.label
    assert not errors, "\n".join(errors[:20])
