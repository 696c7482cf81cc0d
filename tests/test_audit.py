"""The audit trail: who looked at which patient's study, who resent, retried, approved
what, DICOM associations (DCMTK storescu), node starts and rules reloads; append-only in
SQLite and PostgreSQL; export as JSON lines; RFC 5424 syslog over UDP, TCP and TLS."""

from __future__ import annotations

import io
import json
import re
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.models import AuditRecord, Dispatch, Job, Result, Series, Study
from db.session import Database
from devkit.net import free_port
from devkit.synth import generate_study
from dicom_node import audit
from dicom_node.rules_holder import RulesHolder
from dicom_node.web import create_app
from inference import queue
from inference.jobrun import WrittenSeg
from inference.labels import ANATOMICAL_STRUCTURE, SegmentLabel
from inference.results import Algorithm
from inference.seg_writer import write_seg
from kernel.settings import SyslogSettings
from kernel.uids import derived_uid
from tests.conftest import storescu, wait_until
from tests.security_helpers import audit_rows, role_users, running_node
from tests.test_delivery_status import _runner
from tests.test_seg_writer import KIDNEY
from tests.web_helpers import RULES, login

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9, "review": "required"}


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory):
    """A node that admits TEST_SCU only, holds results for review, and has received one
    small synthetic study over DICOM (DCMTK storescu)."""
    base = tmp_path_factory.mktemp("trail")
    study = generate_study(
        base / "study", seed=3, phases="P", rows=64, columns=64, pixel_spacing_mm=6.0, slices=8
    )
    with running_node(
        base,
        peers=[{"ae_title": "TEST_SCU", "host": "127.0.0.1"}],
        destinations=[PACS],
        health={"echo_interval_s": 0},
    ) as node:
        files = study.series[0].files
        assert storescu(files, node.settings.port).returncode == 0
        refused = storescu(files[:1], node.settings.port, "DICOM_NODE", "INTRUDER")
        assert refused.returncode != 0
        yield node, study, role_users(node)


def _held_result(node, series_uid: str, folder: Path) -> int:
    """A real SEG on the received series, recorded by the job runner and held for review."""
    with node.db.session() as s:
        series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        files = [i.path for i in series.instances]
        study = s.scalars(select(Study)).one()
        job = queue.enqueue(s, study, "tumor", {"image": series_uid})
        job_id = job.id
    headers = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    labels = np.zeros((len(headers), 64, 64), np.uint8)
    labels[2:6, 20:40, 20:40] = 1
    sop = derived_uid("audit-test-seg")
    path = folder / "seg.dcm"
    write_seg(
        headers,
        labels,
        [SegmentLabel(1, "kidney", ANATOMICAL_STRUCTURE, KIDNEY, (185, 102, 83))],
        path=path,
        algorithm=Algorithm(name="test", version="1"),
        series_instance_uid=derived_uid("audit-test-series"),
        sop_instance_uid=sop,
        series_number=99,
        series_description="audit test",
    )
    runner = _runner(node.db, dest_review=("pacs",))
    seg = WrittenSeg(
        path, sop, derived_uid("audit-test-series"), series_uid, 1, destinations=("pacs",)
    )
    assert queue.claim(node.db, "w", "cpu").id == job_id
    record = lambda s, row: runner._record_result(s, row, seg)  # noqa: E731
    assert queue.finish(node.db, job_id, {}, record=record) == "done"
    with node.db.session() as s:
        return s.scalars(select(Result.id).where(Result.sop_uid == sop)).one()


def test_associations_views_reviews_and_actions_name_the_patient(trail, tmp_path):
    node, study, headers = trail
    study_uid, series_uid = study.study_uid, study.series[0].series_uid
    wait_until(
        lambda: len(audit_rows(node, action="dicom_association")) >= 2, 20, "two associations"
    )
    accepted, rejected = audit_rows(node, action="dicom_association")[:2]
    with node.db.session() as s:
        patient_id = s.scalars(select(Study.patient_id)).one()
    assert patient_id
    assert (accepted.actor, accepted.actor_kind, accepted.outcome) == (
        "TEST_SCU",
        "dicom",
        "success",
    )
    assert accepted.source.startswith("127.0.0.1:") and accepted.study_uid == study_uid
    assert accepted.patient_id == patient_id and accepted.patient_name is None
    assert accepted.detail["instances_stored"] == len(study.series[0].files)
    assert accepted.detail["transport"] == "plain" and accepted.detail["ended"] == "released"
    assert (rejected.actor, rejected.outcome) == ("INTRUDER", "denied")
    assert rejected.detail["outcome"].startswith("rejected")

    client = TestClient(create_app(node.view()))
    url = f"/api/studies/{study_uid}"
    wait_until(lambda: client.get(url, headers=headers["viewer"]).status_code == 200, 20, url)
    browser = TestClient(create_app(node.view()))
    login(browser, "viewer-user")
    assert browser.get(f"/studies/{study_uid}").status_code == 200
    r = client.get(f"/api/studies?q={patient_id}", headers=headers["operator"])
    assert [i["study_uid"] for i in r.json()["items"]] == [study_uid]
    viewed = audit_rows(node, action="study_viewed")
    assert [(r.actor, r.actor_kind, r.detail["via"]) for r in viewed[-2:]] == [
        ("viewer-user", "token", "api"),
        ("viewer-user", "session", "page"),
    ]
    assert viewed[-1].patient_id == patient_id and viewed[-1].source == "testclient"
    assert viewed[-2].detail["token"] == "viewer tests"
    searched = audit_rows(node, action="studies_searched")[-1]
    assert (searched.actor, searched.object_id) == ("operator-user", patient_id)

    # A result: its page, preview and slices, the review, a resend, a retry.
    result_id = _held_result(node, series_uid, tmp_path)
    assert browser.get(f"/results/{result_id}").status_code == 200
    png = client.get(f"/api/results/{result_id}/preview.png", headers=headers["viewer"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    for z in (3, 4, 5):
        r = client.get(f"/api/results/{result_id}/slices/{z}.png", headers=headers["viewer"])
        assert r.status_code == 200
    r = client.post(
        f"/api/results/{result_id}/approve",
        headers=headers["reviewer"],
        json={"note": "looks right"},
    )
    assert r.status_code == 200, r.text
    r = client.post(
        f"/api/results/{result_id}/reject", headers=headers["reviewer"], json={"reason": "too late"}
    )
    assert r.status_code == 409
    with node.db.session() as s:
        dispatch_id = s.scalars(select(Dispatch.id)).one()
        job_id = s.scalars(select(Job.id)).one()
    r = client.post(
        "/api/dispatches/resend", headers=headers["operator"], json={"dispatch_ids": [dispatch_id]}
    )
    assert r.status_code == 200
    assert client.post(f"/api/jobs/{job_id}/retry", headers=headers["operator"]).status_code == 200
    r = client.post(
        f"/api/jobs/{job_id}/priority", headers=headers["operator"], json={"priority": "sideways"}
    )
    assert r.status_code == 409

    def one(action: str, outcome: str = "success") -> AuditRecord:
        rows = audit_rows(node, action=action, outcome=outcome)
        assert len(rows) == 1, (action, outcome, [(r.actor, r.object_id) for r in rows])
        return rows[0]

    for action, outcome, actor, object_id in (
        ("result_viewed", "success", "viewer-user", str(result_id)),
        ("preview_downloaded", "success", "viewer-user", str(result_id)),
        ("result_slices_viewed", "success", "viewer-user", str(result_id)),  # once, not 3x
        ("result_approved", "success", "reviewer-user", str(result_id)),
        ("result_rejected", "failure", "reviewer-user", str(result_id)),
        ("sends_resent", "success", "operator-user", str(dispatch_id)),
        ("job_retried", "success", "operator-user", str(job_id)),
        ("job_priority_changed", "failure", "operator-user", str(job_id)),
    ):
        row = one(action, outcome)
        assert (row.actor, row.object_id) == (actor, object_id), action
        assert (row.study_uid, row.patient_id) == (study_uid, patient_id), action
    assert one("result_approved").detail["note"] == "looks right"
    assert one("result_slices_viewed").detail["first_slice"] == 3


def test_admins_search_and_export_the_trail(trail):
    node, study, headers = trail
    client = TestClient(create_app(node.view()))
    r = client.get("/api/audit?action=dicom_association&outcome=denied", headers=headers["admin"])
    assert r.status_code == 200
    assert [i["actor"] for i in r.json()["items"]] == ["INTRUDER"]
    assert client.get("/api/audit", headers=headers["operator"]).status_code == 403
    r = client.get(f"/api/audit/export?study_uid={study.study_uid}", headers=headers["admin"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines and all(x["study_uid"] == study.study_uid for x in lines)
    assert [x["id"] for x in lines] == sorted(x["id"] for x in lines)  # oldest first
    assert "patient_name" not in lines[0]
    assert audit_rows(node, action="audit_exported")[-1].actor == "admin-user"
    browser = TestClient(create_app(node.view()))
    login(browser, "admin-user")
    page = browser.get("/audit?action=dicom_association")
    assert page.status_code == 200 and "INTRUDER" in page.text and "TEST_SCU" in page.text
    assert 'href="/api/audit/export?action=dicom_association"' in page.text
    started = audit_rows(node, action="node_started")[0]
    assert started.detail["settings_sha256"] == audit.settings_digest(node.settings)
    assert browser.get("/settings").status_code == 200
    assert audit_rows(node, action="settings_viewed")[-1].actor == "admin-user"


@pytest.mark.postgres
def test_the_audit_table_is_append_only(db_url):
    db = Database(db_url)
    try:
        audit.record(db, audit.Action.LOGIN, audit.Actor("ada", "session", "10.0.0.1"))
        for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
            with (
                pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"),
                db.engine.begin() as conn,
            ):
                conn.execute(sqlalchemy.text(statement))
        if not db.is_sqlite:
            with (
                pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"),
                db.engine.begin() as conn,
            ):
                conn.execute(sqlalchemy.text("TRUNCATE audit_log"))
        with db.session() as s:
            assert s.scalars(select(AuditRecord.actor)).all() == ["ada"]
    finally:
        db.dispose()


def test_patient_names_only_with_log_patient_names_and_never_in_the_log(
    db, caplog, tmp_path, monkeypatch, capsys
):
    with db.session() as s:
        s.add(Study(study_uid="1.2.3.4", patient_id="PID-7", patient_name="TEST^SECRET"))
    caplog.set_level("INFO")
    actor = audit.Actor("vic", "session", "10.0.0.9")
    audit.record(db, "study_viewed", actor, object_type="study", study_uid="1.2.3.4")
    audit.record(db, "study_viewed", actor, study_uid="1.2.3.4", patient_names=True)
    plain, named = audit.search(db, audit.Query(actor="vic"))[::-1]
    assert plain["patient_id"] == named["patient_id"] == "PID-7"
    assert "patient_name" not in plain and named["patient_name"] == "TEST^SECRET"
    assert "TEST^SECRET" not in caplog.text and "PID-7" not in caplog.text
    assert "study=1.2.3.4" in caplog.text

    from dicom_node.cli import main

    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", db.url)
    out = tmp_path / "audit.jsonl"
    assert main(["audit", "export", "--actor", "vic", "--since", "2000-01-01", "-o", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in exported] == [plain["id"], named["id"]]
    assert "2 audit records written" in capsys.readouterr().err
    assert audit.search(db, audit.Query(action="audit_exported"))[0]["actor"].startswith("cli:")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["audit", "export", "--since", "yesterday"]) == 2


def test_rules_reloads_are_audited(db, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    holder = RulesHolder(rules, db)
    rules.write_text(RULES.replace("Every CT series", "Each CT series"))
    holder._mtime = None  # the same second on coarse file systems: force the re-read
    holder.get()
    rules.write_text("version: 1\nrules: [oops\n")
    holder._mtime = None
    holder.get()
    rows = audit.search(db, audit.Query(action="rules_reloaded"))[::-1]
    assert [r["outcome"] for r in rows] == ["success", "failure"]
    assert rows[0]["object_id"] == str(rules) and len(rows[0]["detail"]["sha256"]) == 64
    assert rows[1]["detail"]["problem"]


# -- syslog ----------------------------------------------------------------------------------

SYSLOG_LINE = re.compile(
    rb"^<(\d+)>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) (\d+) (\S+) - "
    rb"\xef\xbb\xbf(.*)$",
    re.S,
)


class Collector:
    """A syslog collector on 127.0.0.1: UDP datagrams, or TCP / TLS octet-counted frames."""

    def __init__(self, protocol: str, context: ssl.SSLContext | None = None) -> None:
        self.protocol, self.context = protocol, context
        self.messages: list[bytes] = []
        self.port = free_port()
        kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        if protocol != "udp":
            self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            if self.protocol == "udp":
                while True:
                    self.messages.append(self.sock.recv(65535))
            while True:
                conn, _ = self.sock.accept()
                if self.context is not None:
                    try:
                        conn = self.context.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError):
                        conn.close()
                        continue
                buffer = b""
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while b" " in buffer:
                        size, rest = buffer.split(b" ", 1)
                        if len(rest) < int(size):
                            break
                        self.messages.append(rest[: int(size)])
                        buffer = rest[int(size) :]
        except OSError:
            return  # closed

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sqlite_db(tmp_path: Path):
    """The forwarding tests run on SQLite only: on PostgreSQL records wait
    ``audit.COMMIT_LAG`` before they are forwarded (ids are not given in commit order)."""
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def _records(db: Database, n: int) -> None:
    for i in range(n):
        audit.record(
            db,
            "login",
            audit.Actor(f"user{i}", "session", "10.0.0.1"),
            outcome="success" if i % 2 else "failure",
        )


def _parsed(message: bytes) -> tuple[int, dict]:
    m = SYSLOG_LINE.match(message)
    assert m, message
    return int(m.group(1)), json.loads(m.group(7).decode("utf-8"))


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_syslog_forwarding_is_rfc5424_in_order_and_resumes(sqlite_db, protocol):
    db = sqlite_db
    _records(db, 3)
    collector = Collector(protocol)
    forwarder = audit.SyslogForwarder(
        db, SyslogSettings(host="127.0.0.1", port=collector.port, protocol=protocol)
    )
    try:
        assert forwarder.forward_once() == 3
        wait_until(lambda: len(collector.messages) == 3, 10, "three messages")
        pri, first = _parsed(collector.messages[0])
        assert pri == 10 * 8 + 4  # authpriv, warning: a failed login
        assert _parsed(collector.messages[1])[0] == 10 * 8 + 5  # notice: a success
        assert [_parsed(m)[1]["actor"] for m in collector.messages] == ["user0", "user1", "user2"]
        assert first["action"] == "login" and first["source"] == "10.0.0.1"
        assert forwarder.cursor() == first["id"] + 2
        assert forwarder.forward_once() == 0  # nothing new, nothing sent twice
    finally:
        forwarder.close()
        collector.close()
    if protocol == "tcp":  # the collector is down: the cursor stays, then everything goes
        _records(db, 2)
        before = forwarder.cursor()
        # A port held bound but not listening refuses every connection, and no other
        # process can take it meanwhile (the closed collector's port could be reused).
        down = socket.socket()
        down.bind(("127.0.0.1", 0))
        forwarder.settings = SyslogSettings(
            host="127.0.0.1", port=down.getsockname()[1], protocol="tcp"
        )
        try:
            with pytest.raises(OSError):
                forwarder.forward_once()
        finally:
            down.close()
        assert forwarder.cursor() == before
        again = Collector("tcp")
        forwarder.settings = SyslogSettings(host="127.0.0.1", port=again.port, protocol="tcp")
        try:
            assert forwarder.forward_once() == 2
            wait_until(lambda: len(again.messages) == 2, 10, "the two waiting records")
        finally:
            forwarder.close()
            again.close()


def test_syslog_over_tls_verifies_the_collector(sqlite_db, tmp_path):
    db = sqlite_db
    from tests.tls_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    _records(db, 1)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.pacs.cert, pki.pacs.key)
    collector = Collector("tls", context)
    trusting = SyslogSettings(
        host="127.0.0.1", port=collector.port, protocol="tls", ca_bundle=pki.ca
    )
    wrong_ca = trusting.model_copy(update={"ca_bundle": pki.untrusted_ca})
    try:
        refused = audit.SyslogForwarder(db, wrong_ca)
        with pytest.raises(ssl.SSLError, match="certificate verify failed"):
            refused.forward_once()
        assert refused.cursor() == 0
        forwarder = audit.SyslogForwarder(db, trusting)
        assert forwarder.forward_once() == 1
        wait_until(lambda: collector.messages, 10, "the record over TLS")
        assert _parsed(collector.messages[0])[1]["actor"] == "user0"
        forwarder.close()
    finally:
        collector.close()


def test_a_dicom_tls_association_is_audited_with_the_certificate_subject(tmp_path):
    from tests.test_tls import TlsNode, _tool, tls_client
    from tests.tls_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    node = TlsNode(tmp_path, pki)
    try:
        echo = subprocess.run(
            [
                _tool("echoscu"),
                *tls_client(pki, "ct1"),
                "-aet",
                "CT_SCANNER",
                "-aec",
                "DICOM_NODE",
                "127.0.0.1",
                str(node.scp.tls_port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        wait_until(lambda: audit_rows(node, action="dicom_association"), 10, "the record")
        row = audit_rows(node, action="dicom_association")[0]
        assert (row.actor, row.outcome, row.object_id) == ("CT_SCANNER", "success", "DICOM_NODE")
        assert row.detail["transport"] == "TLS"
        assert row.detail["tls_subject"] == "CN=CT1, O=Test Hospital"
        assert row.detail["instances_stored"] == 0 and row.study_uid is None
    finally:
        node.stop()
