"""DICOMweb destinations (issue 19): results and forwarded originals delivered by STOW-RS.

- End to end: a synthetic multi-phase study is sent TO the node by STOW-RS (dicomweb-client,
  an API token), the shipped models segment it, and the SEGs arrive in a real Orthanc
  (DICOMweb plugin) configured as a ``kind: dicomweb`` destination; the tumour SEG, fetched
  back with WADO-RS, is voxel-exact the model's output.
- A destination that is down (connection refused): rows are retried with the outbox's
  backoff and delivered once Orthanc comes up on that address; the QIDO-RS health check
  says so both ways.
- A small real HTTP server in the test plays an origin server: refused credentials (HTTP
  401) fail every row at once with the reason; a Store Instances Response (202 or 409)
  whose FailedSOPSequence lists one instance fails only that row, with its FailureReason,
  and an out-of-resources reason is retried.
- Settings: url required for dicomweb, ae_title/host/port for dimse, storage commitment and
  DICOM TLS refused for dicomweb; credentials never shown.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
import torch
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from db.models import Dispatch, Event
from db.session import Database
from devkit.expect import expected_result_uids
from devkit.memwatch import peak_rss
from devkit.net import free_port
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from dicom_node.dispatch import Dispatcher
from dicom_node.health import DestinationHealth, echo_destination, health_of
from dicom_node.stow_answer import NotAStoreResponse, parse_store_answer
from dicom_node.stow_response import render
from dicom_node.web.users import add_user, create_token
from inference.engine import Engine
from inference.seg_reader import seg_label_map
from inference.volume import load_series
from kernel import outbox
from kernel.settings import ConfigError, NodeSettings, load_settings
from kernel.vocabulary import DestinationState, EventKind, OutboxKind, OutboxState
from tests.conftest import node_settings, wait_until
from tests.web_helpers import PASSWORD, client_for, login

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SMALL = {"rows": 64, "columns": 64, "pixel_spacing_mm": 6.0, "slices": 12}
TOKEN = "never-shown-3f9c"  # a bearer token that must appear on no page


def dicomweb_orthanc(workdir: Path, **kwargs: Any) -> OrthancServer:
    """Orthanc with its DICOMweb plugin (Debian package orthanc-dicomweb) at /dicom-web/."""
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.fail(f"{DICOMWEB_PLUGIN} is missing: install the Debian package orthanc-dicomweb")
    return OrthancServer(
        workdir,
        extra_config={"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True}},
        **kwargs,
    )


def _queue_files(db: Database, files: list[Path], destination: str) -> dict[str, Path]:
    """Forward rows for ``files`` to ``destination``; SOP Instance UID -> file."""
    by_uid = {}
    with db.session() as s:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            by_uid[str(ds.SOPInstanceUID)] = path
            outbox.queue(
                s,
                study_id=None,
                kind=OutboxKind.FORWARD,
                sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                path=str(path),
                destinations=[destination],
            )
    return by_uid


def _rows(db: Database) -> dict[str, Dispatch]:
    with db.session() as s:
        return {r.sop_uid: r for r in s.scalars(select(Dispatch))}


def _settings(tmp_path: Path, destinations: list[dict[str, Any]]) -> NodeSettings:
    return node_settings(
        tmp_path,
        destinations=destinations,
        dispatch={"retry_initial_s": 0.5, "retry_max_s": 2.0, "timeout_s": 10},
        health={"echo_timeout_s": 5},
    )


# -- the whole chain -----------------------------------------------------------------------


@pytest.mark.slow
def test_study_stowed_to_the_node_comes_back_as_seg_in_the_dicomweb_destination(
    tmp_path, start_node
):
    with dicomweb_orthanc(tmp_path / "orthanc", throwaway=True) as pacs:
        node = start_node(
            destinations=[
                {
                    "name": "cloud",
                    "kind": "dicomweb",
                    "url": f"{pacs.url}/dicom-web/",
                    "auth": {"type": "bearer", "token": TOKEN},  # Orthanc ignores it
                }
            ]
        )
        add_user(node.db, "op", PASSWORD, "operator")
        add_user(node.db, "ada", PASSWORD, "admin")
        api_token = create_token(node.db, "op", "STOW-RS test")
        study = generate_study(
            tmp_path / "study", seed=19, phases="AP", rows=192, columns=192, pixel_spacing_mm=2.0
        )
        files = [f for series in study.series for f in series.files]

        # STOW-RS to the node with dicomweb-client and an API token.
        to_node = DICOMwebClient(
            url=f"http://127.0.0.1:{node.web_port}/dicomweb",
            headers={"Authorization": f"Bearer {api_token}"},
        )
        answer = to_node.store_instances([pydicom.dcmread(f) for f in files])
        assert "FailedSOPSequence" not in answer
        assert len(answer.ReferencedSOPSequence) == len(files)

        # The tumour SEG arrives in Orthanc: found by QIDO-RS, fetched by WADO-RS.
        portal, arterial = study.by_phase("P"), study.by_phase("A")
        _, seg_uid, _ = expected_result_uids(node, "tumor", {"image": portal.files})
        _, vessel_uid, _ = expected_result_uids(
            node, "vessel", {"A": arterial.files, "P": portal.files}
        )
        from_pacs = DICOMwebClient(url=f"{pacs.url}/dicom-web")

        def found(uid: str) -> list[dict[str, Any]]:
            return from_pacs.search_for_instances(search_filters={"SOPInstanceUID": uid})

        [item] = wait_until(lambda: found(seg_uid), 300, "the tumour SEG in Orthanc")
        series_uid = item["0020000E"]["Value"][0]
        seg_ds = from_pacs.retrieve_instance(study.study_uid, series_uid, seg_uid)
        seg = hd.seg.Segmentation.from_dataset(seg_ds)

        volume = load_series(portal.files)
        engine = Engine(node.registry, torch.device("cpu"))
        predicted = engine.runner("tumor").predict(volume.array[None], volume.spacing_zyx)
        numbers, names = seg_label_map(seg, [str(h.SOPInstanceUID) for h in volume.headers])
        value_of = {"kidney": 1, "kidney tumor": 2}
        lut = np.zeros(256, np.uint8)
        for number, name in names.items():
            lut[number] = value_of[name]
        np.testing.assert_array_equal(lut[numbers], predicted)
        assert predicted.any()

        # The multi-phase pipeline's SEG went the same way; the outbox recorded both.
        wait_until(lambda: found(vessel_uid), 300, "the vessel SEG in Orthanc")
        rows = wait_until(
            lambda: (r := _rows(node.db)) and all(x.state == "sent" for x in r.values()) and r,
            60,
            "every send recorded",
        )
        assert {(uid, r.destination, r.last_status) for uid, r in rows.items()} == {
            (seg_uid, "cloud", 0),
            (vessel_uid, "cloud", 0),
        }

        # Pages and the JSON API show the kind and URL, never the credentials.
        api = requests.get(
            f"http://127.0.0.1:{node.web_port}/api/destinations",
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=30,
        )
        [shown] = api.json()
        assert (shown["kind"], shown["url"]) == ("dicomweb", f"{pacs.url}/dicom-web")
        assert TOKEN not in api.text
        client = client_for(node)
        login(client, "ada")
        page = client.get("/destinations").text
        settings_page = client.get("/api/settings")
        assert f"{pacs.url}/dicom-web" in page and "QIDO-RS check" in page
        assert TOKEN not in page and TOKEN not in settings_page.text


# -- destination down, then up -------------------------------------------------------------


def test_destination_down_is_retried_with_backoff_and_sent_when_it_comes_up(tmp_path, db):
    port = free_port()
    url = f"http://127.0.0.1:{port}/dicom-web"
    settings = _settings(tmp_path, [{"name": "web", "kind": "dicomweb", "url": url}])
    dispatcher = Dispatcher(db, {"web": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=5, phases="P", **SMALL)
    files = study.series[0].files
    by_uid = _queue_files(db, files, "web")

    assert dispatcher.poll() == len(files)
    rows = _rows(db)
    assert {(r.state, r.attempts, r.last_status) for r in rows.values()} == {
        (OutboxState.PENDING, 1, None)
    }
    assert all("Connection refused" in r.last_error and url in r.last_error for r in rows.values())
    first = min(r.next_attempt_at for r in rows.values())
    assert first > max(r.last_attempt_at for r in rows.values())  # a backoff, not at once

    down = echo_destination(db, settings, "web", "manual")
    assert not down.ok and "Connection refused" in down.detail

    # A second attempt once the backoff is over, still refused.
    wait_until(lambda: dispatcher.poll() and min(r.attempts for r in _rows(db).values()) >= 2, 20)

    with dicomweb_orthanc(tmp_path / "orthanc", http_port=port, throwaway=True) as pacs:
        up = echo_destination(db, settings, "web", "manual")
        assert up.ok, up.detail
        # The check that found it answering made the waiting rows due at once.
        assert dispatcher.poll() == len(files)
        rows = _rows(db)
        assert {(r.state, r.last_status, r.last_error) for r in rows.values()} == {
            (OutboxState.SENT, 0, None)
        }
        assert pacs.count_instances() == len(files)
        uid, path = next(iter(by_uid.items()))
        back = DICOMwebClient(url=url).retrieve_instance(
            study.study_uid, study.series[0].series_uid, uid
        )
        assert back.PixelData == pydicom.dcmread(path).PixelData

    with db.session() as s:
        kinds = [e.kind for e in s.scalars(select(Event).order_by(Event.id))]
    assert EventKind.SEND_RETRY in kinds and EventKind.SENT in kinds
    assert EventKind.DESTINATION_DOWN in kinds and EventKind.DESTINATION_UP in kinds


# -- a small origin server that refuses -------------------------------------------------


@dataclass
class Origin:
    """What the test origin server does and saw. ``failures``: SOP Instance UID ->
    FailureReason to answer; ``status``: the HTTP status of an answer that lists failures."""

    credentials: str  # "user:password" it accepts (basic)
    failures: dict[str, int] = field(default_factory=dict)
    status: int = 409
    media_type: str = "application/dicom+json"  # of the Store Instances Response
    # SOP UIDs received -> (HTTP status, Content-Type, body): an answer of its own instead
    reply: Callable[[list[str]], tuple[int, str, bytes]] | None = None
    received: list[list[str]] = field(default_factory=list)  # SOP UIDs per request
    headers: list[dict[str, str]] = field(default_factory=list)


def _parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    out = []
    for chunk in body.split(f"--{boundary}".encode())[1:]:
        if chunk.startswith(b"--"):
            break
        out.append(chunk.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n"))
    return out


def _item(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


class _Handler(BaseHTTPRequestHandler):
    origin: Origin

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _authorised(self) -> bool:
        expected = "Basic " + base64.b64encode(self.origin.credentials.encode()).decode()
        if self.headers.get("Authorization") == expected:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self) -> None:  # QIDO-RS: no studies
        if self._authorised():
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

    def do_POST(self) -> None:  # STOW-RS
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        self.origin.headers.append(dict(self.headers))
        if not self._authorised():
            return
        uids = [
            str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID)
            for p in _parts(body, self.headers["Content-Type"])
        ]
        self.origin.received.append(uids)
        if self.origin.reply is not None:
            code, content_type, payload = self.origin.reply(uids)
        else:
            answer = Dataset()
            answer.ReferencedSOPSequence = [_item(u) for u in uids if u not in self.origin.failures]
            failed = [_item(u, self.origin.failures[u]) for u in uids if u in self.origin.failures]
            if failed:
                answer.FailedSOPSequence = failed
            code, content_type = self.origin.status if failed else 200, self.origin.media_type
            payload = render(answer, content_type)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def origin() -> Iterator[tuple[Origin, str]]:
    state = Origin(credentials="node:right-password")
    handler = type("Handler", (_Handler,), {"origin": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def _basic(password: str) -> dict[str, Any]:
    return {"type": "basic", "username": "node", "password": password}


def test_refused_credentials_fail_every_row_at_once_with_the_reason(tmp_path, db, origin):
    state, url = origin
    settings = _settings(
        tmp_path, [{"name": "web", "kind": "dicomweb", "url": url, "auth": _basic("wrong")}]
    )
    dispatcher = Dispatcher(db, {"web": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=6, phases="P", **SMALL)
    _queue_files(db, study.series[0].files, "web")

    assert dispatcher.poll() == len(study.series[0].files)
    rows = _rows(db).values()
    assert {(r.state, r.attempts) for r in rows} == {(OutboxState.FAILED, 1)}
    assert all("HTTP 401" in r.last_error and "credentials" in r.last_error for r in rows)
    assert dispatcher.poll() == 0  # nothing left to retry
    # The destination answered: health says it refused, not that nothing answered.
    assert _health(db, settings, "web").reason == (
        "latest send refused: HTTP 401 Unauthorized: credentials missing or refused (auth)"
    )
    check = echo_destination(db, settings, "web", "manual")
    assert not check.ok
    assert check.detail == (
        "QIDO-RS check refused: HTTP 401 Unauthorized: credentials missing or refused (auth)"
    )
    health = _health(db, settings, "web")
    assert (health.state, health.reason) == (DestinationState.UNREACHABLE, check.detail)
    assert "wrong" not in json.dumps([r.last_error for r in rows])


def _health(db: Database, settings: NodeSettings, name: str) -> DestinationHealth:
    with db.session() as s:
        return health_of(s, settings.destination(name), settings.health.pending_alert_s)


@pytest.fixture
def canned() -> Iterator[Callable[[int, dict[str, str], bytes], str]]:
    """Starts HTTP servers that answer every request with one (status, headers, body);
    ``{path}`` in a header value becomes the request's path. Returns a server's URL."""
    servers = []

    def start(code: int, headers: dict[str, str], body: bytes) -> str:
        class Canned(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value.replace("{path}", self.path))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

        server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/dicom-web"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_qido_check_reports_a_redirect_and_an_html_answer_as_they_are(tmp_path, db, origin, canned):
    _, target = origin  # answers 401 to a request without credentials
    redirect = canned(302, {"Location": f"{target[: -len('/dicom-web')]}{{path}}"}, b"")
    html = canned(200, {"Content-Type": "text/html"}, NGINX)
    settings = _settings(
        tmp_path,
        [
            {"name": "moved", "kind": "dicomweb", "url": redirect},
            {"name": "html", "kind": "dicomweb", "url": html},
        ],
    )

    moved = echo_destination(db, settings, "moved", "manual")
    assert not moved.ok
    assert moved.detail == (
        f"QIDO-RS check redirected: HTTP 302 Found to {target}/studies?limit=1 "
        "(set url to the address it names)"
    )  # not followed: not the 401 of where it points
    page = echo_destination(db, settings, "html", "manual")
    assert not page.ok
    assert page.detail == (
        "QIDO-RS check failed: HTTP 200 but the answer is not DICOM JSON (text/html)"
    )
    for name, answer in (("moved", moved), ("html", page)):
        health = _health(db, settings, name)
        assert (health.state, health.reason) == (DestinationState.UNREACHABLE, answer.detail)

    # A send to the redirect fails at once, naming it; health words it as a refusal.
    dispatcher = Dispatcher(db, {"moved": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=11, phases="P", **SMALL)
    _queue_files(db, study.series[0].files[:2], "moved")
    assert dispatcher.poll() == 2
    assert {r.state for r in _rows(db).values()} == {OutboxState.FAILED}
    assert _health(db, settings, "moved").reason == (
        "latest send refused: HTTP 302 Found (a redirect: set url to the address it names)"
    )


def test_failed_sop_sequence_fails_only_that_instance(tmp_path, db, origin):
    state, url = origin
    settings = _settings(
        tmp_path,
        [{"name": "web", "kind": "dicomweb", "url": url, "auth": _basic("right-password")}],
    )
    dispatcher = Dispatcher(db, {"web": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=7, phases="P", **SMALL)
    by_uid = _queue_files(db, study.series[0].files, "web")
    refused, busy, *fine = sorted(by_uid)
    state.failures = {refused: 0xC122, busy: 0xA700}  # transfer syntax; out of resources

    assert dispatcher.poll() == len(by_uid)
    # One request for the chunk, with a Content-Length (streamed, not chunked).
    assert [sorted(x) for x in state.received] == [sorted(by_uid)]
    assert state.headers[0]["Content-Length"] and "Transfer-Encoding" not in state.headers[0]
    rows = _rows(db)
    assert rows[refused].state == OutboxState.FAILED
    assert rows[refused].last_status == 0xC122
    assert "FailureReason 0xC122 transfer syntax not supported (HTTP 409)" in (
        rows[refused].last_error
    )
    assert (rows[busy].state, rows[busy].last_status) == (OutboxState.PENDING, 0xA700)
    assert {(rows[u].state, rows[u].last_status) for u in fine} == {(OutboxState.SENT, 0)}

    # A 202 Accepted answer is read the same way; the busy instance goes again and is kept.
    state.failures, state.status = {}, 202
    wait_until(lambda: dispatcher.poll() and _rows(db)[busy].state == OutboxState.SENT, 20)
    assert state.received[-1] == [busy]
    assert _rows(db)[refused].state == OutboxState.FAILED


# -- an HTTP 200 is not a delivery unless the answer lists the instance ----------------

NGINX = b"<html><head><title>Welcome to nginx!</title></head><body>Welcome to nginx!</body></html>"
OTHER = {  # a Store Instances Response that lists another instance only
    "00081199": {
        "vr": "SQ",
        "Value": [
            {
                "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.66.4"]},
                "00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]},
            }
        ],
    }
}


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (
            "application/dicom+json",
            b"",
            "HTTP 200 but the answer is not a Store Instances Response "
            "(application/dicom+json, empty body)",
        ),
        (
            "text/html",
            NGINX,
            "HTTP 200 but the answer is not a Store Instances Response (text/html)",
        ),
        (
            "application/dicom+json",
            b"{}",
            "HTTP 200 but the answer is not a Store Instances Response (application/dicom+json "
            "without ReferencedSOPSequence or FailedSOPSequence)",
        ),
        ("application/dicom+json", json.dumps(OTHER).encode(), "is not in ReferencedSOPSequence"),
        (
            "application/json",
            b'{"status": "ok"}',
            "HTTP 200 but the answer is not a Store Instances Response "
            "(application/json, not a DICOM JSON data set)",
        ),
    ],
    ids=["empty", "html", "empty-json", "other-uids", "plain-json"],
)
def test_http_200_without_a_store_instances_response_listing_it_is_not_delivered(
    tmp_path, db, origin, content_type, body, expected
):
    state, url = origin
    state.reply = lambda uids: (200, content_type, body)
    settings = node_settings(
        tmp_path,
        destinations=[
            {"name": "web", "kind": "dicomweb", "url": url, "auth": _basic("right-password")}
        ],
        dispatch={"retry_initial_s": 0.3, "retry_max_s": 0.3, "timeout_s": 10, "max_attempts": 2},
    )
    dispatcher = Dispatcher(db, {"web": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=8, phases="P", **SMALL)
    by_uid = _queue_files(db, study.series[0].files, "web")

    assert dispatcher.poll() == len(by_uid)
    rows = _rows(db)
    assert {(r.state, r.attempts, r.sent_at) for r in rows.values()} == {
        (OutboxState.PENDING, 1, None)
    }
    for uid, row in rows.items():
        assert expected in row.last_error
        if "ReferencedSOPSequence" in expected and "answer is not" not in expected:
            assert row.last_error == f"HTTP 200 but instance {uid} is not in ReferencedSOPSequence"
    reason = _health(db, settings, "web").reason
    assert reason.startswith("latest send not confirmed: HTTP 200 but") and expected in reason
    # Then failed by the outbox's policy (max_attempts 2), never counted as sent.
    wait_until(
        lambda: (
            dispatcher.poll() is not None
            and {r.state for r in _rows(db).values()} == {OutboxState.FAILED}
        ),
        20,
        "every row failed after its second attempt",
    )
    rows = _rows(db)
    assert {(r.state, r.sent_at) for r in rows.values()} == {(OutboxState.FAILED, None)}
    assert all(expected in r.last_error for r in rows.values())


def test_store_instances_response_in_xml_and_partial_listings(tmp_path, db, origin):
    state, url = origin
    state.media_type = "application/dicom+xml"  # the server answers XML though asked JSON
    settings = _settings(
        tmp_path,
        [{"name": "web", "kind": "dicomweb", "url": url, "auth": _basic("right-password")}],
    )
    dispatcher = Dispatcher(db, {"web": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=9, phases="P", **SMALL)
    by_uid = _queue_files(db, study.series[0].files, "web")
    refused, missing, *fine = sorted(by_uid)
    state.failures = {refused: 0xC000}

    def xml_leaving_one_out(uids: list[str]) -> tuple[int, str, bytes]:
        answer = Dataset()
        answer.ReferencedSOPSequence = [_item(u) for u in uids if u not in (refused, missing)]
        answer.FailedSOPSequence = [_item(refused, 0xC000)]
        return 202, "application/dicom+xml; charset=utf-8", render(answer, "application/dicom+xml")

    state.reply = xml_leaving_one_out
    assert dispatcher.poll() == len(by_uid)
    rows = _rows(db)
    assert {(rows[u].state, rows[u].last_status) for u in fine} == {(OutboxState.SENT, 0)}
    assert (rows[refused].state, rows[refused].last_status) == (OutboxState.FAILED, 0xC000)
    assert (rows[missing].state, rows[missing].attempts) == (OutboxState.PENDING, 1)
    assert rows[missing].last_error == (
        f"HTTP 202 but instance {missing} is not in ReferencedSOPSequence"
    )
    # The same server's full XML answer stores the one left out.
    state.reply, state.failures = None, {}
    wait_until(lambda: dispatcher.poll() and _rows(db)[missing].state == OutboxState.SENT, 20)
    assert state.received[-1] == [missing]


def test_store_answer_reader_takes_dicom_json_and_xml_only():
    answer = Dataset()
    answer.ReferencedSOPSequence = [_item("1.2.3")]
    answer.ReferencedSOPSequence[0].WarningReason = 0xB000
    answer.FailedSOPSequence = [_item("1.2.4", 0xA700)]
    for media in ("application/dicom+json", "application/dicom+xml"):
        read = parse_store_answer(render(answer, media), media)
        assert (read.referenced, read.failed) == ({"1.2.3": 0xB000}, {"1.2.4": 0xA700})
    wrapped = json.dumps([answer.to_json_dict()]).encode()  # one data set in an array
    assert parse_store_answer(wrapped, None).referenced == {"1.2.3": 0xB000}
    for body, media, why in [
        (b"<html><body>hi</body></html>", "text/html", "text/html"),
        (b"<html/>", "application/xml", "not a Native DICOM Model (<html>)"),
        (b"[]", "application/dicom+json", "not a DICOM JSON data set"),
        (b"{not json", "application/dicom+json", "not JSON"),
        (b'{"00081199": {"vr": "SQ", "Value": [5]}}', "application/dicom+json", "malformed"),
        (b"  ", None, "no Content-Type, empty body"),
    ]:
        with pytest.raises(NotAStoreResponse, match=why.replace("(", r"\(").replace(")", r"\)")):
            parse_store_answer(body, media)


# -- answers are read with a cap -------------------------------------------------------

BIG_BYTES = 64 << 20


class _FloodHandler(BaseHTTPRequestHandler):
    """Answers every request HTTP 200 ``application/dicom+json`` with ``mode``:
    ``announced``: 64 MiB of spaces with their Content-Length; ``until-close``: the same
    without a length (HTTP/1.0, ends when the connection closes); ``trickle``: a
    Content-Length of 1000 and one byte every 0.3 s."""

    mode = "announced"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        if self.mode != "until-close":
            size = 1000 if self.mode == "trickle" else BIG_BYTES
            self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b" " * (1 << 20)
        try:
            if self.mode == "trickle":
                for _ in range(1000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.3)
                return
            for _ in range(BIG_BYTES // len(block)):
                self.wfile.write(block)
        except OSError:  # the node stopped reading and closed the connection
            pass

    do_GET = do_POST = _answer


@pytest.mark.parametrize("mode", ["announced", "until-close", "trickle"])
def test_a_huge_or_endless_answer_is_not_read_whole(tmp_path, db, mode):
    handler = type("Flood", (_FloodHandler,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "web", "kind": "dicomweb", "url": url}],
        dispatch={"retry_initial_s": 0.5, "retry_max_s": 2.0, "timeout_s": 2},
        health={"echo_timeout_s": 2},
    )
    dispatcher = Dispatcher(db, {"web": settings.destinations[0]}, settings.dispatch, "NODE")
    study = generate_study(tmp_path / "study", seed=10, phases="P", **SMALL)
    by_uid = _queue_files(db, study.series[0].files, "web")
    try:
        started = time.monotonic()
        with peak_rss() as memory:
            assert dispatcher.poll() == len(by_uid)
            check = echo_destination(db, settings, "web", "manual")
        elapsed_s = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()

    expected = {
        "announced": "the answer is too large (64 MiB announced, at most 16 MiB is read)",
        "until-close": "the answer is too large (more than 16 MiB)",
        "trickle": "the answer was not complete within 2 s",
    }[mode]
    rows = _rows(db).values()
    assert {(r.state, r.attempts, r.sent_at) for r in rows} == {(OutboxState.PENDING, 1, None)}
    assert {r.last_error for r in rows} == {f"HTTP 200 but {expected}"}
    assert not check.ok
    if mode == "announced":
        assert "(64 MiB announced, at most 1 MiB is read)" in check.detail
    elif mode == "until-close":
        assert "the answer is too large (more than 1 MiB)" in check.detail
    else:
        assert expected in check.detail
    # The node read at most the caps (16 MiB for STOW-RS, 1 MiB for the check), not the
    # 64 MiB (which, read whole, took over 128 MiB: the body and its pieces).
    assert memory.growth_mb < 40, memory.growth_mb
    assert elapsed_s < 30  # the trickle is cut at timeout_s (2 s), twice


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ({"kind": "dicomweb"}, "a DICOMweb destination needs url"),
        ({"kind": "dicomweb", "url": "ftp://x/y"}, "must be an http:// or https:// URL"),
        ({"kind": "dicomweb", "url": "https://u:p@pacs/dw"}, "must not carry credentials"),
        (
            {"kind": "dicomweb", "url": "https://pacs/dw", "storage_commitment": True},
            "storage_commitment is a DIMSE service",
        ),
        ({"kind": "dicomweb", "url": "https://pacs/dw", "tls": {}}, "uses an https:// url"),
        (
            {"kind": "dicomweb", "url": "https://pacs/dw", "ae_title": "PACS"},
            "ae_title: DIMSE settings",
        ),
        ({"ae_title": "PACS", "host": "10.0.0.5"}, "a DIMSE destination needs port"),
        (
            {"ae_title": "PACS", "host": "10.0.0.5", "port": 104, "url": "https://pacs/dw"},
            "url: only for kind: dicomweb",
        ),
    ],
)
def test_destination_settings_name_what_is_wrong(destination, message):
    with pytest.raises(ConfigError, match="destinations.0") as err:
        load_settings(None, destinations=[{"name": "d", **destination}])
    assert message in str(err.value)


def test_dicomweb_destination_settings_from_a_file(tmp_path):
    (tmp_path / "ca.pem").write_text("not checked here\n")
    path = tmp_path / "node.yaml"
    path.write_text(
        "destinations:\n"
        "  - {name: cloud, kind: dicomweb, url: https://pacs.example/dicom-web/,\n"
        "     auth: {type: bearer, token: " + TOKEN + "}, ca_bundle: ca.pem}\n"
        "  - {name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
    )
    settings = load_settings(path)
    cloud, pacs = settings.destinations
    assert (cloud.kind, cloud.url, cloud.ca_bundle) == (
        "dicomweb",
        "https://pacs.example/dicom-web",
        tmp_path / "ca.pem",
    )
    assert (pacs.kind, pacs.address) == ("dimse", "10.0.0.5:104")
    assert TOKEN not in json.dumps(settings.model_dump(mode="json"))
