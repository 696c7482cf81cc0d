"""Odd AE titles in an A-ASSOCIATE-RQ (issue 13, kind 10).

The request is built with pynetdicom's PDU classes, its 16-byte AE title fields are then
overwritten with the odd bytes, and it is sent over a real socket to the running listener:
the reply must be an A-ASSOCIATE-RJ (PDU type 0x03) with the PS3.8 9.3.4 fields, never an
A-ABORT (0x07), the log must show the bytes, and the listener must go on serving (DCMTK
storescu right after). DCMTK echoscu sends the odd titles it lets through too.
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Series
from db.session import Database
from devkit.dcmtk import dcmtk_tool
from dicom_node.assembler import AssociationTracker
from dicom_node.scp import CALLED_AE_FIELD, CALLING_AE_FIELD, StorageSCP, ae_title_problem
from dicom_node.spool import Spool
from tests.conftest import node_settings, storescu
from tests.dicom_factory import ct_series

REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
CALLING_NOT_RECOGNISED, CALLED_NOT_RECOGNISED = 0x03, 0x07

ODD_TITLES = {
    "korean_euc_kr": "병원CT".encode("euc-kr"),
    "korean_utf8": "병원CT".encode(),
    "latin1_accent": "CAMÉRA".encode("latin-1"),
    "iso2022_escape": b"\x1b$)C\xba\xb4CT",  # an ISO 2022 IR 149 designation, then EUC-KR
    "all_spaces": b" " * 16,
    "all_nul": b"\x00" * 16,
    "nul_padded": b"CT_SCANNER" + b"\x00" * 6,
    "backslash": b"CT\\SCANNER",
    "bell": b"CT\x07SCAN",
    "tab": b"CT\tSCAN",
    "newline": b"CT\nSCAN",
    "delete": b"CT\x7fSCAN",
}


def _listener(folder: Path, **overrides) -> tuple[StorageSCP, Database]:
    """A running listener on SQLite (the database plays no part here)."""
    url = f"sqlite:///{folder / 'node.db'}"
    upgrade(url)
    db = Database(url)
    settings = node_settings(folder, **overrides)
    server = StorageSCP(
        settings, db, Spool(settings.spool_dir, settings.min_free_bytes), AssociationTracker()
    )
    server.start()
    return server, db


@pytest.fixture(scope="module")
def listener(tmp_path_factory) -> Iterator[StorageSCP]:
    """One listener for the module, peers ``*`` from 127.0.0.1: every test also shows it
    serves on after the odd requests before it."""
    server, db = _listener(tmp_path_factory.mktemp("listener"))
    yield server
    server.stop()
    db.dispose()


def association_rq(calling: bytes = b"TEST_SCU", called: bytes = b"DICOM_NODE") -> bytes:
    """An A-ASSOCIATE-RQ for Verification whose AE title fields hold exactly these bytes
    (space-padded to 16)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "PLACEHOLDER", "PLACEHOLDER"
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = bytearray(pdu.encode())
    data[CALLING_AE_FIELD] = calling.ljust(16, b" ")
    data[CALLED_AE_FIELD] = called.ljust(16, b" ")
    return bytes(data)


def exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request``; returns (the reply PDU, what follows it until the peer closes).

    After an A-ASSOCIATE-AC the association is released (A-RELEASE-RQ / RP) politely.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        head = _read(sock, 6)
        reply = head + _read(sock, struct.unpack(">I", head[2:6])[0])
        if reply[0] == 0x02:
            sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    return reply, rest


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def assert_rejected(reply: bytes, rest: bytes, reason: int) -> None:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): type 0x03, length 4, then reserved, result, source,
    reason; and nothing after it (no A-ABORT) before the node closes the connection."""
    assert reply[0] == 0x03, f"PDU type 0x{reply[0]:02x}, not an A-ASSOCIATE-RJ: {reply!r}"
    assert struct.unpack(">I", reply[2:6])[0] == 4
    assert tuple(reply[7:10]) == (REJECTED_PERMANENT, SERVICE_USER, reason)
    assert rest == b""


def still_serving(server: StorageSCP, tmp_path) -> None:
    proc = storescu(ct_series(tmp_path / "after", n=1), server.port)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kind", list(ODD_TITLES))
def test_odd_calling_ae_title_is_rejected_not_aborted(listener, tmp_path, caplog, kind):
    server = listener
    field = ODD_TITLES[kind].ljust(16, b" ")
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        reply, rest = exchange(server.port, association_rq(calling=field))
    assert_rejected(reply, rest, CALLING_NOT_RECOGNISED)
    logged = [r.getMessage() for r in caplog.records if r.name == "dicom_node.scp"]
    assert any(repr(field) in m and "calling AE title" in m for m in logged), logged
    still_serving(server, tmp_path)


@pytest.mark.parametrize("kind", ["korean_utf8", "all_spaces", "backslash", "bell"])
def test_odd_called_ae_title_is_rejected_as_called_not_recognised(listener, tmp_path, caplog, kind):
    server = listener  # require_called_ae is off: any valid called AE title would do
    field = ODD_TITLES[kind].ljust(16, b" ")
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        reply, rest = exchange(server.port, association_rq(called=field))
    assert_rejected(reply, rest, CALLED_NOT_RECOGNISED)
    assert any(repr(field) in r.getMessage() for r in caplog.records)
    still_serving(server, tmp_path)


def test_both_fields_odd_answers_for_the_calling_one_and_logs_both(listener, caplog):
    server = listener
    calling, called = b"\xba\xb4CT".ljust(16), b" " * 16
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        reply, rest = exchange(server.port, association_rq(calling, called))
    assert_rejected(reply, rest, CALLING_NOT_RECOGNISED)
    text = caplog.text
    assert repr(calling) in text and repr(called) in text


def test_odd_title_is_rejected_under_a_named_peer_list_too(tmp_path):
    server, db = _listener(tmp_path, peers=[{"ae_title": "KNOWN_CT", "host": "127.0.0.1"}])
    try:
        reply, rest = exchange(server.port, association_rq(calling="병원".encode()))
        assert_rejected(reply, rest, CALLING_NOT_RECOGNISED)
        reply, _ = exchange(server.port, association_rq(calling=b"KNOWN_CT"))
        assert reply[0] == 0x02
    finally:
        server.stop()
        db.dispose()


def test_a_peer_named_with_a_non_ascii_title_admits_exactly_that_title(tmp_path):
    """A site that typed its modality's Korean title into ``peers`` gets it accepted, in
    UTF-8 or EUC-KR, from that host; the series record the title. Anything else odd is
    still rejected, and ``*`` would not have admitted it."""
    peers = [{"ae_title": "병원CT", "host": "127.0.0.1"}]
    server, db = _listener(tmp_path, peers=peers)
    try:
        for spelled in ("병원CT".encode(), "병원CT".encode("euc-kr")):
            reply, _ = exchange(server.port, association_rq(calling=spelled))
            assert reply[0] == 0x02, (spelled, reply)
        for other in ("병원MR".encode(), b"CT\x07", b"OTHER"):
            reply, rest = exchange(server.port, association_rq(calling=other))
            assert_rejected(reply, rest, CALLING_NOT_RECOGNISED)
        proc = storescu(ct_series(tmp_path / "in", n=2), server.port, calling_ae="병원CT")
        assert proc.returncode == 0, proc.stderr
        with db.session() as s:
            assert [x.calling_ae for x in s.scalars(select(Series))] == ["병원CT"]
    finally:
        server.stop()
        db.dispose()


@pytest.mark.parametrize(
    "calling", [b"TEST_SCU", b"  LEADING", b"CT SCANNER 01", b"A" * 16, b"~!@#$%^&*()_+-=."]
)
def test_valid_titles_with_spaces_and_punctuation_are_accepted(listener, calling):
    server = listener
    reply, rest = exchange(server.port, association_rq(calling=calling))
    assert reply[0] == 0x02, reply  # A-ASSOCIATE-AC
    assert rest[:1] == b"\x06"  # A-RELEASE-RP to our A-RELEASE-RQ


@pytest.mark.parametrize(
    "field, problem",
    [
        (b"GOOD".ljust(16), None),
        (b" " * 16, "all spaces"),
        ("병원".encode().ljust(16), "outside ISO 646"),
        (b"CT\\1".ljust(16), "backslash"),
        (b"CT\x00".ljust(16, b"\x00"), "control characters"),
    ],
)
def test_ae_title_problem_names_the_rule(field, problem):
    found = ae_title_problem(field)
    assert (found is None) if problem is None else (problem in found)


def _echoscu(port: int, calling: str, called: str = "DICOM_NODE") -> subprocess.CompletedProcess:
    exe = dcmtk_tool("echoscu")
    if exe is None:
        pytest.fail("DCMTK echoscu is not installed (apt-get install dcmtk)")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("calling", ["병원CT", "   ", "CT\\1", "CT\x07X", "CT\tX"])
def test_echoscu_with_an_odd_calling_title_is_told_why(listener, tmp_path, calling):
    server = listener
    proc = _echoscu(server.port, calling)
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr, proc.stderr
    assert "Calling AE Title Not Recognized" in proc.stderr, proc.stderr
    still_serving(server, tmp_path)


def test_echoscu_with_an_odd_called_title_is_told_why(listener, tmp_path):
    server = listener
    proc = _echoscu(server.port, "TEST_SCU", called="노드")
    assert "Called AE Title Not Recognized" in proc.stderr, proc.stderr
    still_serving(server, tmp_path)


def test_echoscu_over_long_and_empty_titles(listener, tmp_path):
    """DCMTK cuts a 20-character title to 16 (a valid title: accepted) and refuses to send
    an empty one; the listener serves on after the connection that brought nothing."""
    server = listener
    assert _echoscu(server.port, "A" * 20).returncode == 0
    empty = _echoscu(server.port, "")
    assert empty.returncode != 0 and "Calling AP Title" in empty.stderr
    still_serving(server, tmp_path)
