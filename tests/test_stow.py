"""STOW-RS receive (issue 19): ``POST /dicomweb/studies[/{study}]`` to a running node.

Instances arrive over real HTTP (the node's own web server), from a streamed body and from
dicomweb-client, and go through the listener's receive path: rows in the database, spool
files byte-identical to what was sent, series held open while the request runs, then
complete and routed. Bad parts fail one by one with PS3.18 Failure Reasons; a full spool
stores nothing; a node killed with -9 in the middle of an upload keeps no partial
instance and is consistent after its restart.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Event, Instance, Series, Study
from db.session import Database
from devkit.memwatch import peak_rss
from devkit.net import free_port, wait_for_port
from devkit.synth import generate_study
from dicom_node.stow_parts import PartReader
from dicom_node.web.users import add_user, create_token
from kernel.settings import REPO_ROOT
from kernel.vocabulary import EventKind, SeriesState
from tests.conftest import wait_until
from tests.dicom_factory import ct_slice, encoded
from tests.security_helpers import audit_rows, role_users, running_node
from tests.web_helpers import PASSWORD, client_for, login, modelless_settings

BOUNDARY = "dicom-node-stow-test"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
END = f"--{BOUNDARY}--\r\n".encode()


def part(data: bytes, content_type: str = "application/dicom") -> bytes:
    """One body part (RFC 2046: the CRLF before the next boundary belongs to it)."""
    return f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(part(p) for p in parts) + END


@dataclass
class Site:
    node: Any
    base: str  # http://127.0.0.1:<web port>
    headers: dict[str, dict[str, str]]  # bearer header by role

    def stow(self, data: bytes | Iterable[bytes], study_uid: str | None = None, **kw: Any):
        url = f"{self.base}/dicomweb/studies" + (f"/{study_uid}" if study_uid else "")
        headers = {**self.headers["operator"], "Content-Type": CONTENT_TYPE, **kw.pop("h", {})}
        return requests.post(url, data=data, headers=headers, timeout=60, **kw)


STOW_IDLE_S = 3.0  # web.stow_idle_timeout_s of the module's node


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    web = {"host": "127.0.0.1", "port": 0, "stow_idle_timeout_s": STOW_IDLE_S}
    with running_node(tmp_path_factory.mktemp("stow"), web=web) as node:
        yield Site(node, f"http://127.0.0.1:{node.web_port}", role_users(node))


def _instances(node: Any, sop_uids: Iterable[str]) -> dict[str, Instance]:
    with node.db.session() as s:
        rows = s.scalars(select(Instance).where(Instance.sop_uid.in_(list(sop_uids))))
        return {row.sop_uid: row for row in rows}


def _series(node: Any, study_uid: str) -> list[Series]:
    with node.db.session() as s:
        return list(s.scalars(select(Series).join(Study).where(Study.study_uid == study_uid)))


def _routed(node: Any, series_uids: set[str]) -> bool:
    with node.db.session() as s:
        done = set(
            s.scalars(
                select(Event.series_uid).where(
                    Event.kind == EventKind.ROUTED, Event.series_uid.in_(series_uids)
                )
            )
        )
    return done == series_uids


def _answer(response: requests.Response) -> Dataset:
    assert response.headers["content-type"] == "application/dicom+json", response.headers
    return Dataset.from_json(response.json())


def _referenced(ds: Dataset) -> set[tuple[str, str]]:
    return {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
        for i in ds.get("ReferencedSOPSequence", [])
    }


def _failed(ds: Dataset) -> dict[str, int]:
    return {i.ReferencedSOPInstanceUID: i.FailureReason for i in ds.get("FailedSOPSequence", [])}


def test_a_study_is_stored_held_open_while_it_arrives_then_complete_and_routed(site, tmp_path):
    study = generate_study(
        tmp_path / "study", seed=11, phases="AP", rows=64, columns=64, pixel_spacing_mm=6.0,
        slices=8,
    )  # fmt: skip
    first, second = study.series
    seen_while_open: list[tuple[str, int]] = []

    def streamed() -> Iterator[bytes]:
        for f in first.files:
            yield part(f.read_bytes())
        delimiter = f"--{BOUNDARY}\r\n".encode()  # ends the last part of the first series
        yield delimiter
        # Well past quiet_period_s (0.5 s): the first series is recorded but held open.
        time.sleep(1.5)
        for s in _series(site.node, study.study_uid):
            seen_while_open.append((s.state, s.instance_count))
        rest = b"".join(part(f.read_bytes()) for f in second.files)
        yield rest[len(delimiter) :]
        yield END

    r = site.stow(streamed())
    assert r.status_code == 200, (r.status_code, r.text, r.headers)
    answer = _answer(r)
    files = {f: pydicom.dcmread(f, stop_before_pixels=True) for s in study.series for f in s.files}
    assert _referenced(answer) == {(d.SOPClassUID, d.SOPInstanceUID) for d in files.values()}
    assert "FailedSOPSequence" not in answer and "RetrieveURL" in answer
    assert seen_while_open == [(SeriesState.RECEIVING, len(first.files))]

    rows = _instances(site.node, [d.SOPInstanceUID for d in files.values()])
    assert len(rows) == len(files) == 16
    for f, d in files.items():  # the spool holds exactly the bytes that were sent
        assert Path(rows[d.SOPInstanceUID].path).read_bytes() == f.read_bytes()
    series_uids = {first.series_uid, second.series_uid}
    wait_until(lambda: _routed(site.node, series_uids), 30, "both series routed")
    series = _series(site.node, study.study_uid)
    assert {s.state for s in series} == {SeriesState.COMPLETE}
    # The series say who sent them: the token's user, to the node, from the client.
    assert {(s.calling_ae, s.called_ae, s.source_address) for s in series} == {
        ("operator-user", "DICOM_NODE", "127.0.0.1")
    }
    trail = audit_rows(site.node, action="stow_received", study_uid=study.study_uid)
    assert [(t.actor, t.outcome, t.detail["stored"], t.detail["status"]) for t in trail] == [
        ("operator-user", "success", 16, 200)
    ]
    assert trail[0].patient_id == study.patient_id and trail[0].detail["token"]


def test_dicomweb_client_stores_a_series_with_json_and_xml_answers(site):
    from dicomweb_client import DICOMwebClient

    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [ct_slice(study_uid, series_uid, i) for i in range(4)]
    url = f"{site.base}/dicomweb"
    client = DICOMwebClient(url, headers=site.headers["operator"])
    answer = client.store_instances(datasets[:2])
    assert _referenced(answer) == {(d.SOPClassUID, d.SOPInstanceUID) for d in datasets[:2]}

    xml_client = DICOMwebClient(
        url, headers={**site.headers["operator"], "Accept": "application/dicom+xml"}
    )
    answer = xml_client.store_instances(datasets[2:], study_instance_uid=study_uid)
    assert _referenced(answer) == {(d.SOPClassUID, d.SOPInstanceUID) for d in datasets[2:]}

    rows = _instances(site.node, [d.SOPInstanceUID for d in datasets])
    assert len(rows) == 4
    for d in datasets:
        # The client wrote these in-memory data sets without the PS3.10 preamble; the
        # node added it (zeros and "DICM"), the rest is the client's bytes.
        sent = Path(rows[d.SOPInstanceUID].path).read_bytes()
        assert sent[:132] == bytes(128) + b"DICM"
        stored = pydicom.dcmread(rows[d.SOPInstanceUID].path)
        assert stored.PixelData == d.PixelData and stored.SeriesInstanceUID == series_uid

    viewer = DICOMwebClient(url, headers=site.headers["viewer"])
    with pytest.raises(requests.HTTPError) as refused:
        viewer.store_instances(datasets[:1])
    assert refused.value.response.status_code == 403


def test_a_mixed_body_stores_the_good_instance_and_names_why_each_other_failed(site):
    study_uid, other_study = generate_uid(), generate_uid()
    good = ct_slice(study_uid, generate_uid(), 0)
    other = ct_slice(other_study, generate_uid(), 0)
    cut = ct_slice(study_uid, generate_uid(), 1)
    parts = [
        part(encoded(good)),
        part(b"this is not a DICOM file" * 20),
        part(encoded(other)),
        part(encoded(cut)[:-300]),  # truncated inside its pixel data
        part(encoded(ct_slice(study_uid, generate_uid(), 2)), "application/octet-stream"),
    ]
    r = site.stow(b"".join(parts) + END, study_uid)
    assert r.status_code == 202, r.text
    answer = _answer(r)
    assert _referenced(answer) == {(good.SOPClassUID, good.SOPInstanceUID)}
    failed = _failed(answer)
    assert failed.pop("") == 0xC000  # the text part names no instance
    assert failed.pop(other.SOPInstanceUID) == 0xC409  # another study than the URL's
    assert failed.pop(cut.SOPInstanceUID) == 0xC000  # truncated, named by its header
    assert list(failed.values()) == [0xC000]  # not application/dicom
    warnings = r.headers["warning"]
    assert (
        "C409 part 3: instance" in warnings
        and f"not to the study asked for ({study_uid})" in warnings
    )
    assert "C000 part 2: instance refused: " in warnings
    assert "part 5" in warnings and "application/octet-stream, not application/dicom" in warnings

    stored = _instances(site.node, [good.SOPInstanceUID, other.SOPInstanceUID, cut.SOPInstanceUID])
    assert list(stored) == [good.SOPInstanceUID]
    spool = site.node.spool.root
    assert not list(spool.glob(f"{other_study}/**/*.dcm"))
    assert not list(spool.rglob(f"{cut.SOPInstanceUID}.dcm"))

    # Nothing stored at all: 409 with the reasons.
    r = site.stow(body(encoded(other)), study_uid)
    assert r.status_code == 409 and _failed(_answer(r)) == {other.SOPInstanceUID: 0xC409}


def test_requests_that_cannot_be_taken_get_a_clear_answer(site):
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    data = body(encoded(ds))
    url = f"{site.base}/dicomweb/studies"
    operator = site.headers["operator"]
    cases = [
        ({"Content-Type": CONTENT_TYPE}, data, 401, "bearer token required"),
        ({**site.headers["viewer"], "Content-Type": CONTENT_TYPE}, data, 403, "only operator"),
        ({**operator, "Content-Type": "application/dicom"}, encoded(ds), 415, "multipart/related"),
        (
            {**operator, "Content-Type": 'multipart/related; type="application/dicom+json"; '
             f"boundary={BOUNDARY}"},
            data, 415, "only type=",
        ),
        ({**operator, "Content-Type": 'multipart/related; type="application/dicom"'}, data, 400,
         "no boundary"),
        ({**operator, "Content-Type": CONTENT_TYPE}, b"garbage", 400, "cannot be parsed"),
        ({**operator, "Content-Type": CONTENT_TYPE}, END, 400, "holds no part"),
        ({**operator, "Content-Type": CONTENT_TYPE, "Accept": "image/png"}, data, 406, "+json"),
    ]  # fmt: skip
    for headers, payload, status, words in cases:
        r = requests.post(url, data=payload, headers=headers, timeout=30)
        assert r.status_code == status and words in r.json()["detail"], (headers, r.text)
    r = site.stow(data, "1.2.abc")
    assert r.status_code == 400 and "not a DICOM UID" in r.json()["detail"]
    assert not _instances(site.node, [ds.SOPInstanceUID])

    # A body that breaks off: the complete part is stored, the broken one is not.
    second = ct_slice(generate_uid(), generate_uid(), 0)
    r = site.stow(part(encoded(ds)) + part(encoded(second))[:-500])
    assert r.status_code == 202, r.text
    assert _referenced(_answer(r)) == {(ds.SOPClassUID, ds.SOPInstanceUID)}
    assert "ended inside part 2, without its closing boundary" in r.headers["warning"]
    assert list(_instances(site.node, [ds.SOPInstanceUID, second.SOPInstanceUID])) == [
        ds.SOPInstanceUID
    ]

    # A browser session needs its CSRF token, as every POST does.
    client = client_for(site.node)
    csrf = login(client, "operator-user", PASSWORD)
    fresh = ct_slice(generate_uid(), generate_uid(), 0)
    headers = {"Content-Type": CONTENT_TYPE}
    r = client.post("/dicomweb/studies", content=body(encoded(fresh)), headers=headers)
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = client.post(
        "/dicomweb/studies", content=body(encoded(fresh)), headers={**headers, "X-CSRF-Token": csrf}
    )
    assert r.status_code == 200, r.text


def test_a_full_spool_answers_out_of_resources_and_stores_nothing(tmp_path):
    datasets = [ct_slice(generate_uid(), generate_uid(), i) for i in range(3)]
    with running_node(tmp_path, min_free_bytes=2**62) as node:
        token = role_users(node)["operator"]
        r = requests.post(
            f"http://127.0.0.1:{node.web_port}/dicomweb/studies",
            data=body(*(encoded(d) for d in datasets)),
            headers={**token, "Content-Type": CONTENT_TYPE},
            timeout=30,
        )
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert _failed(_answer(r)) == {d.SOPInstanceUID: 0xA700 for d in datasets}
        assert re.search(
            r'"A700 part 1 \(SOP Instance [0-9.]+\): spool full: ', r.headers["warning"]
        )
        assert not _instances(node, [d.SOPInstanceUID for d in datasets])
        assert not list(node.spool.root.rglob("*.dcm"))
        assert not [p for p in node.spool.tmp_dir.iterdir()]  # nothing half-written either


def test_a_client_that_disconnects_keeps_what_was_stored_and_releases_its_series(site):
    study_uid, series_uid = generate_uid(), generate_uid()
    sets = [ct_slice(study_uid, series_uid, i) for i in range(3)]
    head = part(encoded(sets[0])) + part(encoded(sets[1]))
    last = part(encoded(sets[2]))
    token = site.headers["operator"]["Authorization"].split()[1]
    conn = _post_head(site.node.web_port, token, len(head) + len(last) + len(END))
    conn.send(head + last[:100])
    wait_until(
        lambda: len(_instances(site.node, [sets[0].SOPInstanceUID, sets[1].SOPInstanceUID])) == 2,
        10,
        "two parts stored",
    )
    conn.close()  # gone in the middle of the third part
    trail = wait_until(
        lambda: audit_rows(site.node, action="stow_received", study_uid=study_uid), 10, "audit"
    )
    assert trail[0].detail["disconnected"] and trail[0].detail["stored"] == 2
    stored = _instances(site.node, [s.SOPInstanceUID for s in sets])
    assert set(stored) == {sets[0].SOPInstanceUID, sets[1].SOPInstanceUID}
    wait_until(lambda: _routed(site.node, {series_uid}), 30, "the series released and routed")


def test_a_client_that_stalls_mid_part_is_cut_off_and_its_series_released(site):
    """Two parts, then 100 bytes of the third, then silence with the connection open: after
    web.stow_idle_timeout_s the request ends (202: two stored, the body broke off), the
    series is released and routed; nothing of the third part is kept."""
    study_uid, series_uid = generate_uid(), generate_uid()
    sets = [ct_slice(study_uid, series_uid, i) for i in range(3)]
    head = part(encoded(sets[0])) + part(encoded(sets[1]))
    last = part(encoded(sets[2]))
    token = site.headers["operator"]["Authorization"].split()[1]
    conn = _post_head(site.node.web_port, token, len(head) + len(last) + len(END))
    started = time.monotonic()
    conn.send(head + last[:100])
    answer = conn.getresponse()  # the node answers although the body never ended
    waited = time.monotonic() - started
    try:
        assert answer.status == 202, answer.read()
        assert STOW_IDLE_S <= waited < STOW_IDLE_S + 20
        assert "sent nothing for 3 s" in " ".join(answer.headers.get_all("Warning") or [])
    finally:
        conn.close()
    (trail,) = audit_rows(site.node, action="stow_received", study_uid=study_uid)
    assert trail.detail["disconnected"] and trail.detail["stored"] == 2
    stored = _instances(site.node, [s.SOPInstanceUID for s in sets])
    assert set(stored) == {sets[0].SOPInstanceUID, sets[1].SOPInstanceUID}
    wait_until(lambda: _routed(site.node, {series_uid}), 30, "the series released and routed")


def test_a_large_part_goes_through_a_temporary_file_and_an_oversized_one_is_refused(site, tmp_path):
    big = ct_slice(generate_uid(), generate_uid(), 0, rows=1100)  # 2.4 MB: past MEMORY_BYTES
    r = site.stow(body(encoded(big)))
    assert r.status_code == 200, r.text
    (row,) = _instances(site.node, [big.SOPInstanceUID]).values()
    assert Path(row.path).read_bytes() == encoded(big)

    # The reader alone, small limits: parts kept in memory, in an anonymous file, refused.
    small, middle, large = (encoded(ct_slice(generate_uid(), generate_uid(), 0, rows=n))
                            for n in (32, 300, 800))  # fmt: skip
    reader = PartReader(BOUNDARY.encode(), tmp_path, max_part_bytes=1 << 20, memory_bytes=64 << 10)
    data = body(middle, large, small)
    parts, offset, size = [], 0, 1
    while offset < len(data):  # chunks of every size, so boundaries fall across them
        parts += reader.feed(data[offset : offset + size])
        offset, size = offset + size, size * 3 % 70001 or 1
        assert not list(tmp_path.iterdir())  # a spilled part has no name on disk
    reader.finish()
    assert [p.index for p in parts] == [1, 2, 3]
    assert parts[0].data() == middle and parts[0]._file is not None
    assert parts[1].problem and "larger than 1048576 bytes" in parts[1].problem
    assert parts[1].head == large[: 64 << 10]
    assert parts[2].data() == small and parts[2]._file is None
    for p in parts:
        p.close()


def test_memory_stays_bounded_while_a_large_study_streams_in(site):
    """300 CT images of 512 x 512 (0.5 MiB each, 150 MiB in all) in one request."""
    study_uid, series_uid = generate_uid(), generate_uid()
    count = 300
    sent: list[str] = []

    def streamed() -> Iterator[bytes]:
        for i in range(count):
            ds = ct_slice(study_uid, series_uid, i, rows=512)
            sent.append(ds.SOPInstanceUID)
            yield part(encoded(ds))
        yield END

    started = time.monotonic()
    with peak_rss() as rss:
        r = site.stow(streamed(), study_uid)
    seconds = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert len(_referenced(_answer(r))) == count
    assert len(_instances(site.node, sent)) == count
    print(f"STOW-RS of {count} x 0.5 MiB: {seconds:.1f} s, peak RSS growth {rss.growth_mb:.1f} MiB")
    # Client and node share this process: one image being encoded, sent, parsed and
    # written at a time, never the 150 MiB body.
    assert rss.growth_mb < 64, rss.growth_mb


def test_the_readme_example_stores_a_study(site, tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## DICOMweb: STOW-RS receive", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "curl" in script and "http://node:8080" in script
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = tmp_path / "study"
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i}.dcm").write_bytes(encoded(ct_slice(study_uid, series_uid, i)))
    token = site.headers["operator"]["Authorization"].split()[1]
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace("http://node:8080", site.base)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "TOKEN": token},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    answer = Dataset.from_json(json.loads(proc.stdout))
    assert len(_referenced(answer)) == 3 and "FailedSOPSequence" not in answer


# -- kill -9 in the middle of an upload --------------------------------------------------


def _serve(env: dict[str, str], log: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve"], env=env, stdout=log, stderr=log
    )


def _post_head(port: int, token: str, length: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/dicomweb/studies")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", CONTENT_TYPE)
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    return conn


def test_kill_9_during_an_upload_keeps_no_partial_instance(tmp_path):
    web_port = free_port()
    data_dir = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")},
        "DICOM_NODE_BIND_ADDRESS": "127.0.0.1",
        "DICOM_NODE_PORT": str(free_port()),
        "DICOM_NODE_DATA_DIR": str(data_dir),
        "DICOM_NODE_MIN_FREE_BYTES": "0",
        "DICOM_NODE_QUIET_PERIOD_S": "0.5",
        "DICOM_NODE_WEB__PORT": str(web_port),
        **{
            f"DICOM_NODE_{k.upper()}": json.dumps(v) if isinstance(v, dict) else str(v)
            for k, v in modelless_settings(tmp_path).items()
        },
    }
    study_uid, series_uid = generate_uid(), generate_uid()
    sets = [ct_slice(study_uid, series_uid, i, rows=64) for i in range(9)]
    acknowledged, complete, broken = sets[:2], sets[2:8], sets[8]
    log = (tmp_path / "node.log").open("ab")
    node = _serve(env, log)
    db = Database(f"sqlite:///{data_dir / 'node.db'}")
    try:
        wait_for_port("127.0.0.1", web_port, 60)
        add_user(db, "modality", PASSWORD, "operator")
        token = create_token(db, "modality", "stow")
        r = requests.post(
            f"http://127.0.0.1:{web_port}/dicomweb/studies",
            data=body(*(encoded(d) for d in acknowledged)),
            headers={"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE},
            timeout=30,
        )
        assert r.status_code == 200, r.text

        # Six complete parts, then half of the seventh; the node dies before the rest.
        head = b"".join(part(encoded(d)) for d in complete)
        last = part(encoded(broken))
        conn = _post_head(web_port, token, len(head) + len(last) + len(END))
        conn.send(head + last[: len(last) // 2])
        wanted = [d.SOPInstanceUID for d in acknowledged + complete]

        def recorded() -> dict[str, Instance]:
            with db.session() as s:
                rows = s.scalars(select(Instance))
                return {row.sop_uid: row for row in rows}

        wait_until(lambda: len(recorded()) == len(wanted), 30, "the complete parts recorded")
        time.sleep(0.3)  # the half part is in the node's hands
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        conn.close()

        def consistent() -> None:
            rows = recorded()
            assert sorted(rows) == sorted(wanted)  # no row of the broken part
            for d in acknowledged + complete:  # every file whole, under its final name
                assert Path(rows[d.SOPInstanceUID].path).read_bytes() == encoded(d)
            spool = data_dir / "spool"
            assert sorted(p.stem for p in spool.rglob("*.dcm")) == sorted(wanted)

        consistent()
        node = _serve(env, log)
        wait_for_port("127.0.0.1", web_port, 60)
        consistent()
        assert not [p for p in (data_dir / "spool").rglob("*.part")]
        with db.session() as s:
            series = s.scalars(select(Series)).one()
        assert series.instance_count == len(wanted)

        # Held by nothing after the restart: the series completes and is routed.
        def routed() -> bool:
            with db.session() as s:
                return bool(
                    s.scalar(
                        select(Event.id).where(
                            Event.kind == EventKind.ROUTED, Event.series_uid == series_uid
                        )
                    )
                )

        wait_until(routed, 30, "the series routed after the restart")
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        db.dispose()
