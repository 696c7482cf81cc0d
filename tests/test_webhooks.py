"""Job status webhooks on a running node, with a real HTTP receiver in the test.

A study pushed with storescu runs the tumour pipeline of the rules (its ``update_url``),
path API jobs carry their own ``update_url``; the receiver answers 500 to the first POST
of each job and 200 after, and each job gets exactly one accepted POST, signed (checked
with the README's own verification code), after one retry. A failed job reports its
error, a 4xx answer fails the delivery at once with the reason on the study page and in
the API, and a delivery not yet made survives a node restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from sqlalchemy import select

from db.models import Job, Study, WebhookDelivery
from devkit.memwatch import peak_rss
from devkit.net import free_port
from devkit.synth import generate_study
from dicom_node.grpc_api import path_inference_pb2 as pb2
from dicom_node.grpc_api import path_inference_pb2_grpc as pb2_grpc
from dicom_node.rules import RulesError, parse_rules
from dicom_node.webhook_sender import WebhookSender
from inference import queue
from kernel import webhooks
from kernel.settings import REPO_ROOT, WebhookSettings
from tests.conftest import node_settings, storescu, wait_until
from tests.web_helpers import client_for, login, make_users

SECRET = b"correct-horse-webhook-key"
LOCAL = ["127.0.0.1"]  # webhooks.allowed_hosts of the tests: their receivers are local
SMALL = {"rows": 64, "columns": 64, "pixel_spacing_mm": 6.0, "slice_thickness_mm": 6.0}


def readme_verify() -> Any:
    """The ``verify`` function of README "Job status webhooks", run as written."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Job status webhooks", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - the documented example itself
    return scope["verify"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST. ``/flaky/...`` answers 500 to
    the first POST of each job and 200 after; ``/gone/...`` answers 404; others 200."""

    def __init__(self, port: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job_id = json.loads(body)["job_id"]
                with receiver.lock:
                    seen = [
                        p for p in receiver.posts if (p["path"], p["job_id"]) == (self.path, job_id)
                    ]
                    if self.path.startswith("/gone"):
                        status, text = 404, b"no such hook here"
                    elif self.path.startswith("/flaky") and not seen:
                        status, text = 500, b"busy"
                    else:
                        status, text = 200, b"ok"
                    receiver.posts.append(
                        {
                            "path": self.path,
                            "job_id": job_id,
                            "headers": dict(self.headers),
                            "body": body,
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self, job_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["job_id"] == job_id and p["status"] == 200]

    def of_job(self, job_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["job_id"] == job_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class Misbehaving:
    """An HTTP server on 127.0.0.1 whose answers misbehave: ``/huge`` answers 200 with a
    400 MiB body, ``/trickle`` 200 with a body of one byte every 0.5 s; others 200 "ok".
    ``paths`` records the path of every POST as it arrives."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.closed = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                server.paths.append(self.path)
                try:
                    if self.path.startswith("/huge"):
                        self._head(400 << 20)
                        block = b" " * (1 << 20)
                        for _ in range(400):
                            self.wfile.write(block)
                    elif self.path.startswith("/trickle"):
                        self._head(100_000)
                        while not server.closed.wait(0.5):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                    else:
                        self._head(2)
                        self.wfile.write(b"ok")
                except OSError:  # the node hung up, as it should
                    self.close_connection = True

            def _head(self, length: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def misbehaving() -> Iterator[Misbehaving]:
    m = Misbehaving()
    yield m
    m.close()


def test_a_huge_answer_is_read_capped(misbehaving: Misbehaving) -> None:
    """A receiver answering 400 MiB: the POST is delivered after reading at most 64 KiB
    of the answer, and the node's memory hardly grows (it used to grow by ~1 GB)."""
    settings = WebhookSettings(timeout_s=20, allowed_hosts=LOCAL)
    sender = WebhookSender(None, settings)  # type: ignore[arg-type]
    started = time.monotonic()
    with peak_rss() as rss:
        outcome = sender.post(1, misbehaving.url("/huge"), '{"job_id": 1}')
    assert (outcome.state, outcome.http_status) == ("delivered", 200), outcome
    assert rss.growth_mb < 40, rss.growth_mb
    assert time.monotonic() - started < 10


def _end_jobs(node: Any, urls: list[str]) -> list[int]:
    """Queue one job per URL (its ``update_url``) and cancel it: its delivery is due."""
    with node.db.session() as s:
        study = Study(study_uid=f"1.2.826.0.1.3680043.10.1.{len(urls)}{id(urls) % 997}")
        s.add(study)
        s.flush()
        ids = [
            queue.enqueue(s, study, "tumor", {"image": f"1.2.3.{i}"}, update_urls=[url]).id
            for i, url in enumerate(urls)
        ]
    for job_id in ids:
        assert queue.cancel(node.db, job_id) == "cancelled"
    return ids


def test_a_trickling_receiver_holds_only_its_own_delivery(
    start_node, receiver: Receiver, misbehaving: Misbehaving
) -> None:
    """A receiver sending its answer a byte at a time: its POST ends at timeout_s by the
    wall clock and is retried, a healthy receiver is POSTed meanwhile, and /healthz says
    the stuck delivery is overdue (it used to hold every delivery for minutes)."""
    node = start_node(
        worker={"enabled": False},
        webhooks={
            "timeout_s": 4,
            "retry_initial_s": 60,
            "retry_max_s": 60,
            "overdue_alert_s": 1,
            "allowed_hosts": LOCAL,
        },
    )
    (slow,) = _end_jobs(node, [misbehaving.url("/trickle")])
    wait_until(lambda: misbehaving.paths, 30, "the POST to the trickling receiver")
    posted = time.monotonic()
    (healthy,) = _end_jobs(node, [receiver.url("/ok")])
    (row,) = _settled(node, healthy)
    assert row.state == "delivered"
    (stuck,) = _deliveries(node, slow)
    assert (stuck.state, stuck.attempts) == ("sending", 0)  # not waited for

    with httpx.Client(base_url=f"http://127.0.0.1:{node.web_port}", timeout=30) as client:

        def overdue() -> dict[str, Any] | None:
            health = client.get("/healthz").json()
            return health if health["webhooks"]["overdue"] else None

        health = wait_until(overdue, 30, "/healthz to report the stuck delivery")
        assert health["status"] == "degraded" and health["webhooks"]["overdue"] == 1
        assert any("webhook deliveries overdue: 1" in r for r in health["reasons"])
        (again,) = _settled_or_retried(node, slow)
        took_s = time.monotonic() - posted
        assert (again.state, again.attempts, again.last_status) == ("pending", 1, None)
        assert again.last_error == "no complete answer within 4 s"
        assert 3 < took_s < 12, took_s  # 4 s by the wall clock (it used to be minutes)
        health = client.get("/healthz").json()
        assert health["webhooks"] == {"undelivered": 1, "overdue": 0, "oldest_overdue_s": None}


def _settled_or_retried(node: Any, job_id: int) -> list[WebhookDelivery]:
    def tried() -> list[WebhookDelivery] | None:
        rows = _deliveries(node, job_id)
        return rows if all(r.attempts for r in rows) else None

    return wait_until(tried, 30, f"a first POST of job {job_id}'s webhook to end")


def _check_signed(post: dict[str, Any]) -> dict[str, Any]:
    """The POST's signature is good (README's verify and by hand); returns its body."""
    headers, body = post["headers"], post["body"]
    assert readme_verify()(SECRET, headers, body)
    signed = headers["X-Dicom-Node-Timestamp"].encode() + b"." + body
    expected = "sha256=" + hmac.new(SECRET, signed, hashlib.sha256).hexdigest()
    assert headers["X-Dicom-Node-Signature"] == expected
    assert not readme_verify()(b"another key", headers, body)
    parsed = json.loads(body)
    assert headers["X-Dicom-Node-Delivery"] == str(parsed["delivery_id"])
    return parsed


def _deliveries(node: Any, job_id: int) -> list[WebhookDelivery]:
    with node.db.session() as s:
        rows = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).all()
        for row in rows:
            s.expunge(row)
        return list(rows)


def _settled(node: Any, job_id: int, count: int = 1) -> list[WebhookDelivery]:
    """The job's deliveries once ``count`` of them are delivered or failed."""

    def ended() -> list[WebhookDelivery] | None:
        rows = _deliveries(node, job_id)
        done = [r for r in rows if r.state in ("delivered", "failed")]
        return rows if len(done) >= count else None

    return wait_until(ended, 120, f"the webhook deliveries of job {job_id}")


def test_update_urls_must_be_http_or_https() -> None:
    text = (REPO_ROOT / "routing_rules.yaml").read_text()
    bad = text.replace(
        "    models: [tumor]\n", "    models: [tumor]\n    update_url: file:///etc/passwd\n", 1
    )
    with pytest.raises(RulesError, match=r"tumor.*update_url.*http:// or https://.*not file:"):
        parse_rules(bad, "rules.yaml")
    good = text.replace(
        "    models: [tumor]\n", "    models: [tumor]\n    update_url: https://ris.example/h\n", 1
    )
    assert parse_rules(good).pipelines["tumor"].update_url == "https://ris.example/h"
    for url in ("ftp://ris.example/h", "ris.example/h", "http:///h", "https://h:99999/"):
        with pytest.raises(webhooks.WebhookUrlError):
            webhooks.check_url(url)
    # README's rules snippet loads as written.
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Job status webhooks", 1)[1].split("\n## ", 1)[0]
    snippet = re.findall(r"```yaml\n(.*?)```", section, re.S)[0]
    assert parse_rules(snippet).pipelines["tumor"].update_url.startswith("https://")
    shown = webhooks.display_url("https://user:pw@ris.example:8443/h/T0K3N?key=s3cret")
    assert shown == "https://ris.example:8443"


def test_update_urls_to_internal_services_are_refused() -> None:
    """SSRF: credentials always, loopback / link-local / unspecified / multicast /
    metadata hosts unless webhooks.allowed_hosts lists them; private ranges pass."""
    refused = {
        "http://169.254.169.254/latest/meta-data/": "a link-local address",
        "http://127.0.0.1:6379/": "a loopback address",
        "http://127.1:6379/": "a loopback address",
        "http://2130706433/": "a loopback address",
        "http://[::1]:8080/": "a loopback address",
        "http://[::ffff:127.0.0.1]/": "a loopback address",
        "http://[fe80::1]/": "a link-local address",
        "http://0.0.0.0:8080/": "an unspecified address",
        "http://224.0.0.1/": "a multicast address",
        "http://[fd00:ec2::254]/": "a cloud metadata address",
        "http://localhost:9000/": "a loopback address",
        "http://user:pw@ris.example/h": "must not carry a user name or password",
        "http://user@10.0.0.5/h": "must not carry a user name or password",
    }
    for url, reason in refused.items():
        with pytest.raises(webhooks.WebhookUrlError, match=reason):
            webhooks.check_url(url)
    for url in ("http://10.1.2.3/h", "https://172.16.0.9/h", "http://192.168.1.20:8080/h"):
        assert webhooks.check_url(url) == url  # hospital receivers live there
    allowed = WebhookSettings(allowed_hosts=["LOCALHOST", "127.0.0.0/8", "[::1]"]).allowed_hosts
    assert allowed == ["localhost", "127.0.0.0/8", "::1/128"]
    for url in ("http://localhost:9000/", "http://127.0.0.1:6379/", "http://[::1]:8080/"):
        assert webhooks.check_url(url, allowed_hosts=allowed) == url
    with pytest.raises(webhooks.WebhookUrlError, match="link-local"):
        webhooks.check_url("http://169.254.169.254/", allowed_hosts=allowed)
    with pytest.raises(webhooks.WebhookUrlError, match="user name"):
        webhooks.check_url("http://u:p@127.0.0.1/", allowed_hosts=allowed)
    for bad in ("http://ris.example", "ris.example:80", "ris example"):
        with pytest.raises(ValueError, match="neither a host name nor a network"):
            WebhookSettings(allowed_hosts=[bad])

    # At rules load (the node passes its allowed_hosts): refused with the reason.
    text = (REPO_ROOT / "routing_rules.yaml").read_text()
    metadata = text.replace(
        "    models: [tumor]\n",
        "    models: [tumor]\n    update_url: http://169.254.169.254/latest/\n",
        1,
    )
    with pytest.raises(RulesError, match=r"tumor.*update_url.*link-local.*allowed_hosts"):
        parse_rules(metadata, "rules.yaml", webhook_allowed_hosts=[])
    local = metadata.replace("169.254.169.254", "127.0.0.1")
    parse_rules(local, webhook_allowed_hosts=["127.0.0.1/32"])
    with pytest.raises(RulesError, match="user name or password"):
        parse_rules(local.replace("http://", "http://u:p@"), webhook_allowed_hosts=None)

    # At send time: what the name resolves to is checked; the delivery fails, unsent.
    assert webhooks.host_refusal("ris.example", [ip_address("10.0.0.5")], []) is None
    reason = webhooks.host_refusal("ris.example", [ip_address("169.254.169.254")], [])
    assert reason and reason.startswith("ris.example (169.254.169.254) is a link-local")


def test_a_name_resolving_to_an_internal_address_fails_unsent(misbehaving: Misbehaving) -> None:
    """The host name of the machine resolves to loopback here (/etc/hosts): the POST is
    refused at send time, before a connection; with the host allowed it goes."""
    name = socket.gethostname()
    try:
        resolved = {ip_address(i[4][0]) for i in socket.getaddrinfo(name, 80)}
    except OSError:
        pytest.skip("this machine's host name does not resolve")
    if not all(a.is_loopback for a in resolved) or name.lower().endswith("localhost"):
        pytest.skip("this machine's host name does not resolve to loopback only")
    url = misbehaving.url("/ok").replace("127.0.0.1", name)
    sender = WebhookSender(None, WebhookSettings(timeout_s=5))  # type: ignore[arg-type]
    outcome = sender.post(1, url, '{"job_id": 1}')
    assert (outcome.state, outcome.http_status) == ("failed", None), outcome
    assert "is a loopback address" in outcome.detail and "allowed_hosts" in outcome.detail
    assert misbehaving.paths == []
    sender = WebhookSender(None, WebhookSettings(timeout_s=5, allowed_hosts=[name]))  # type: ignore[arg-type]
    assert sender.post(1, url, '{"job_id": 1}').state == "delivered"
    assert misbehaving.paths == ["/ok"]


def test_a_delivery_is_written_with_the_jobs_end_and_retried_by_the_policy(db) -> None:
    """On SQLite and PostgreSQL: no row before the job ends, one per URL in the
    transaction that ends it; retry with backoff, a refusal or used-up attempts fail it,
    a row left sending goes again."""
    settings = WebhookSettings(retry_initial_s=0.01, retry_max_s=0.02, max_attempts=2)
    urls = ["https://a.example/h?t=1", "http://b.example:8080/h"]
    with db.session() as s:
        study = Study(study_uid="1.2.826.0.1.3680043.10.1.7")
        s.add(study)
        s.flush()
        job = queue.enqueue(s, study, "tumor", {"image": "1.2.3"}, update_urls=urls[:1])
        queue.enqueue(s, study, "tumor", {"image": "1.2.3"}, update_urls=urls)  # joins it
        job_id = job.id
    with db.session() as s:
        assert s.get_one(Job, job_id).update_urls == urls
        assert s.scalars(select(WebhookDelivery)).all() == []
    claimed = queue.claim(db, "w", "cpu")
    assert queue.fail(db, claimed.id, "model crashed", retry=False) == "failed"
    with db.session() as s:
        rows = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        assert [(r.url, r.state, r.job_state) for r in rows] == [
            (urls[0], "pending", "failed"),
            (urls[1], "pending", "failed"),
        ]
        body = json.loads(rows[0].body)
        assert (body["status"], body["error"], body["delivery_id"]) == (
            "failed",
            "model crashed",
            rows[0].id,
        )
        assert body["series_uids"] == {"image": "1.2.3"}
        assert not any("patient" in key for key in body)

    with db.session() as s:
        assert webhooks.backlog(s, settings) == webhooks.Backlog(2, 0, None)
        time.sleep(0.05)
        late = webhooks.backlog(s, WebhookSettings(overdue_alert_s=0.01))
        assert (late.undelivered, late.overdue) == (2, 2) and late.oldest_overdue_s >= 0
    # A chooser (the sender's limit per receiver) passes rows over: they stay pending.
    (only,) = webhooks.claim_due(db, 10, "test", take=lambda url: "b.example" in url)
    assert only.url == urls[1] and webhooks.release_unsent(db, [only.id]) == 1
    first, second = webhooks.claim_due(db, 10, "test")
    assert webhooks.claim_due(db, 10, "test") == []  # both held
    retry = webhooks.Outcome("retry", 503, "HTTP 503 Service Unavailable")
    assert webhooks.record(db, first.id, retry, settings) == "pending"
    refused = webhooks.Outcome("failed", 403, "HTTP 403 Forbidden: bad token")
    assert webhooks.record(db, second.id, refused, settings) == "failed"
    (again,) = wait_until(lambda: webhooks.claim_due(db, 10, "test"), 5, "the retry")
    assert webhooks.reset_interrupted(db) == 1  # claimed, then the node stopped
    (again,) = webhooks.claim_due(db, 10, "test")
    assert webhooks.record(db, again.id, retry, settings) == "failed"  # attempts used up
    with db.session() as s:
        one, two = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        assert (one.attempts, one.last_status) == (2, 503)
        assert one.last_error == "HTTP 503 Service Unavailable; gave up after 2 attempts"
        assert (two.attempts, two.last_error) == (
            1,
            "HTTP 403 Forbidden: bad token; not retried (the receiver refused it)",
        )


def test_every_job_gets_one_signed_post_after_a_retry(
    tmp_path: Path, start_node, receiver: Receiver
) -> None:
    secret = tmp_path / "webhook.key"
    secret.write_bytes(SECRET + b"\n")
    rules = yaml.safe_load((REPO_ROOT / "routing_rules.yaml").read_text())
    rules["pipelines"]["tumor"]["update_url"] = receiver.url("/flaky/rules?token=s3cret")
    rules["pipelines"]["kidney_api"] = {"models": ["tumor"], "inputs": {"image": ["P", "A"]}}
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    node = start_node(
        rules_file=rules_file,
        path_api={"allowed_roots": [tmp_path]},
        webhooks={
            "secret_file": secret,
            "retry_initial_s": 0.3,
            "retry_max_s": 1.0,
            "allowed_hosts": LOCAL,
        },
    )
    token = make_users(node)
    study = generate_study(tmp_path / "study", seed=61, phases="P", **SMALL)
    portal = study.series[0]
    assert storescu(portal.files, node.settings.port).returncode == 0
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    broken_too = tmp_path / "broken_too.nii.gz"
    broken_too.write_bytes(b"not an image either")

    with httpx.Client(
        base_url=f"http://127.0.0.1:{node.web_port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
    ) as api:
        r = api.post(
            "/inference/kidney_api",
            json={"image_path": str(broken), "update_url": "file:///etc/passwd"},
        )
        assert r.status_code == 400 and "http:// or https://" in r.text, r.text
        # Internal services and credentials are refused (SSRF); 127.0.0.1 is allowed here.
        for url, reason in (
            ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
            ("http://[::1]:6379/", "a loopback address"),
            ("http://127.0.0.2:6379/", "a loopback address"),
            ("http://user:pw@ris.example/h", "must not carry a user name or password"),
        ):
            r = api.post(
                "/inference/kidney_api", json={"image_path": str(broken), "update_url": url}
            )
            assert r.status_code == 400 and reason in r.text, (url, r.text)
            assert "pw@" not in r.text
        # Queued at once (wait_s=0), so the three path jobs run while the DICOM one does.
        api_url = receiver.url("/flaky/api/job?key=abc")
        ids = {}
        for name, path, url in (
            ("mask", str(portal.files[0].parent), api_url),
            ("failed", str(broken), api_url),
            ("refused", str(broken_too), receiver.url("/gone/hook")),
        ):
            r = api.post(
                "/inference/kidney_api?wait_s=0", json={"image_path": path, "update_url": url}
            )
            assert r.status_code == 202, r.text
            ids[name] = r.json()["job_id"]

        def tumor_job() -> int | None:
            with node.db.session() as s:
                return s.scalar(select(Job.id).where(Job.pipeline == "tumor"))

        ids["dicom"] = wait_until(tumor_job, 60, "the tumour job of the pushed study")

        # Each job that reached a /flaky URL: one 500, then exactly one accepted POST.
        for name in ("dicom", "mask", "failed"):
            (row,) = _settled(node, ids[name])
            assert (row.state, row.attempts, row.last_status) == ("delivered", 2, 200), name
            posts = receiver.of_job(ids[name])
            assert [p["status"] for p in posts] == [500, 200], name
            assert posts[0]["body"] == posts[1]["body"]  # the same bytes, signed anew
            body = _check_signed(posts[1])
            assert body["job_id"] == ids[name] and body["delivery_id"] == row.id

        dicom = _check_signed(receiver.accepted(ids["dicom"])[0])
        assert receiver.accepted(ids["dicom"])[0]["path"] == "/flaky/rules?token=s3cret"
        assert dicom["status"] == "done" and dicom["error"] is None
        assert dicom["pipeline"] == "tumor" and dicom["study_uid"] == study.study_uid
        assert dicom["series_uids"] == {"image": portal.series_uid}
        (seg,) = dicom["results"]
        assert seg["kind"] == "SEG" and seg["source_series_uid"] == portal.series_uid
        assert seg["sop_uid"] and seg["series_uid"] and dicom["finished_at"]

        mask = _check_signed(receiver.accepted(ids["mask"])[0])
        assert mask["status"] == "done" and mask["results"] == []
        assert mask["mask_path"] == api.get(f"/inference/jobs/{ids['mask']}").json()["mask_path"]
        assert mask["input_paths"] == {"image": str(portal.files[0].parent.resolve())}

        failed = _check_signed(receiver.accepted(ids["failed"])[0])
        assert failed["status"] == "failed" and "cannot be read" in failed["error"]
        assert failed["mask_path"] is None

        # A 4xx answer: failed at once, with the receiver's reason, shown on the study.
        (refused,) = _settled(node, ids["refused"])
        assert (refused.state, refused.attempts, refused.last_status) == ("failed", 1, 404)
        assert "HTTP 404" in refused.last_error and "no such hook here" in refused.last_error
        assert [p["status"] for p in receiver.of_job(ids["refused"])] == [404]

        with node.db.session() as s:
            path_study = s.scalar(
                select(Study.study_uid)
                .join(Job, Job.study_id == Study.id)
                .where(Job.id == ids["refused"])
            )
        shown = api.get(f"/api/studies/{path_study}").json()["webhooks"]
        (entry,) = [w for w in shown if w["job_id"] == ids["refused"]]
        assert entry["state"] == "failed" and entry["last_status"] == 404
        assert "no such hook here" in entry["last_error"]
        assert entry["url"] == f"http://127.0.0.1:{receiver.port}"  # host only
        dicom_shown = api.get(f"/api/studies/{study.study_uid}").json()["webhooks"]
        assert [(w["job_id"], w["state"]) for w in dicom_shown] == [(ids["dicom"], "delivered")]

    page_client = client_for(node)
    login(page_client, "ada")
    page = page_client.get(f"/studies/{study.study_uid}").text
    assert 'id="webhooks"' in page and "delivered" in page
    assert "webhook retry" in page and "webhook sent" in page  # rows of the job's run
    assert "s3cret" not in page and "/flaky" not in page  # never the path or query
    page = page_client.get(f"/studies/{path_study}").text
    assert "no such hook here" in page and "/gone" not in page


def test_an_undelivered_webhook_survives_a_restart(tmp_path: Path) -> None:
    """Nothing listens at the URL yet: the deliveries wait, retrying; the node stops with
    them pending, one of them left ``sending`` (a stop in the middle of its POST); after
    the restart the receiver is up and each job gets exactly one accepted POST."""
    from dicom_node.service import Node

    port = free_port()  # the receiver's, once it runs
    secret = tmp_path / "webhook.key"
    secret.write_bytes(SECRET)
    settings = node_settings(
        tmp_path,
        worker={"enabled": False},  # the jobs never run: they end by being cancelled
        path_api={"allowed_roots": [tmp_path]},
        grpc={"enabled": True, "host": "127.0.0.1", "port": free_port()},
        webhooks={
            "secret_file": secret,
            "retry_initial_s": 0.3,
            "retry_max_s": 0.6,
            "allowed_hosts": ["127.0.0.0/8"],  # a network works as well
        },
    )
    node = Node(settings, stop_grace_s=3).start()
    ids = []
    try:
        token = make_users(node)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{node.web_port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as api:
            url = f"http://127.0.0.1:{port}/ok"
            image = tmp_path / "a.nii.gz"
            image.write_bytes(b"never read")
            r = api.post(
                "/inference/tumor?wait_s=0", json={"image_path": str(image), "update_url": url}
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
            # The same over gRPC: a URL of another scheme is refused, an http one kept.
            image = tmp_path / "b.nii.gz"
            image.write_bytes(b"never read either")
            with grpc.insecure_channel(f"127.0.0.1:{settings.grpc.port}") as channel:
                stub = pb2_grpc.PathInferenceStub(channel)
                metadata = (("authorization", f"Bearer {token}"),)
                request = pb2.TumorRequest(image_path=str(image), wait_s=0, update_url="ftp://x/y")
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Tumor(request, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "http:// or https://" in refused.value.details()
                request = pb2.TumorRequest(image_path=str(image), wait_s=0, update_url=url)
                ids.append(stub.Tumor(request, metadata=metadata).job_id)
            for job_id in ids:
                assert api.post(f"/api/jobs/{job_id}/cancel").status_code == 200
        for job_id in ids:
            wait_until(
                lambda j=job_id: any(r.attempts >= 1 for r in _deliveries(node, j)),
                30,
                f"a first POST of job {job_id}'s webhook",
            )
    finally:
        node.stop()
    rows = {job_id: _deliveries(node, job_id) for job_id in ids}
    for job_id, (row,) in rows.items():
        assert row.state == "pending" and "no connection" in row.last_error, job_id
    with node.db.session() as s:  # the first as a stop in the middle of its POST leaves it
        s.get_one(WebhookDelivery, rows[ids[0]][0].id).state = "sending"
    node.db.dispose()

    receiver = Receiver(port)
    again = Node(settings, stop_grace_s=3).start()
    try:
        for job_id in ids:
            (row,) = _settled(again, job_id)
            assert row.state == "delivered", (row.state, row.last_error)
            (post,) = receiver.of_job(job_id)
            body = _check_signed(post)
            assert body["status"] == "cancelled" and body["job_id"] == job_id
    finally:
        again.stop()
        receiver.close()
