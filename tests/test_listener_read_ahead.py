"""The listener reads ahead of the PDU its DUL asks for (``listener.PduReader`` with a
``ReadAhead`` buffer): whatever way the sender's bytes are cut into TCP segments, every
PDU reaches pynetdicom whole and in order, and the stored instance is the one sent.

A raw-socket sender drives the real listener, so that the test decides where the
segments end: a whole C-STORE in one write (command and data PDUs together), the same
bytes dribbled a few at a time, and PDU headers cut across writes.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage

from dicom_node.listener import ReadAhead
from dicom_node.store_path import STATUS, parse_command, read_us
from dicom_node.store_send import encode_store_request, p_data_tf
from tests.dicom_factory import ct_series
from tests.scp_helpers import dataset_bytes
from tests.test_listener_hardening import Listener, read_pdu

EXPLICIT_LE = "1.2.840.10008.1.2.1"
COMMAND_LAST, DATA, DATA_LAST = 0x03, 0x00, 0x02
A_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def test_read_ahead_hands_out_bytes_in_order_and_lets_a_huge_buffer_go():
    ahead = ReadAhead()
    with ahead.room(10) as view:
        view[:6] = b"abcdef"
    ahead.added(6)
    assert bytes(ahead.take(2)) == b"ab" and len(ahead) == 4
    # No room left at the end: the 3 bytes left move to the front.
    assert bytes(ahead.take(1)) == b"c"
    with ahead.room(7) as view:
        view[:3] = b"ghi"
    ahead.added(3)
    assert len(ahead._buf) == 10
    assert bytes(ahead.take(100)) == b"defghi" and len(ahead) == 0
    # A buffer grown for a huge PDU is let go once it is emptied.
    with ahead.room(3 * 1024 * 1024) as view:
        view[:4] = b"wxyz"
    ahead.added(4)
    held = ahead.take(4)
    assert bytes(held) == b"wxyz" and len(ahead._buf) == 0


def association_rq(
    max_pdu: int, contexts: tuple[tuple[int, str], ...] = ((1, CTImageStorage),)
) -> bytes:
    """An A-ASSOCIATE-RQ proposing each (context ID, abstract syntax) with explicit VR
    little endian, and ``max_pdu`` as its Maximum Length."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "TEST_SCU", "DICOM_NODE"
    proposed = []
    for context_id, abstract in contexts:
        context = build_context(abstract, [EXPLICIT_LE])
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def c_store_pdus(path: Path, message_id: int, fragment_bytes: int) -> tuple[list[bytes], str]:
    """The PDUs of one C-STORE-RQ of ``path``, its data set in fragments of at most
    ``fragment_bytes``; and the SOP Instance UID."""
    ds = pydicom.dcmread(path)
    command = encode_store_request(ds.SOPClassUID, ds.SOPInstanceUID, message_id)
    data = dataset_bytes(ds)
    pdus = [p_data_tf(1, COMMAND_LAST, command)]
    for start in range(0, len(data), fragment_bytes):
        last = start + fragment_bytes >= len(data)
        pdus.append(p_data_tf(1, DATA_LAST if last else DATA, data[start : start + fragment_bytes]))
    return pdus, ds.SOPInstanceUID


def whole(pdus: list[bytes]) -> Iterator[bytes]:
    yield b"".join(pdus)


def dribbled(pdus: list[bytes]) -> Iterator[bytes]:
    stream, sizes, offset = b"".join(pdus), (1, 2, 3, 5, 7, 11), 0
    for n, size in enumerate(sizes * (len(stream) // 2 + 1)):
        if offset >= len(stream):
            return
        yield stream[offset : offset + size]
        offset += size
        if n % 40 == 0:
            time.sleep(0.002)  # let the reader find a part of a PDU, not the rest


def headers_cut(pdus: list[bytes]) -> Iterator[bytes]:
    # Each PDU's header ends in the next write, together with the start of the next
    # PDU's: the reader must keep bytes of two PDUs at once.
    carry = b""
    for pdu in pdus:
        yield carry + pdu[:3]
        time.sleep(0.003)
        carry = pdu[3:]
    yield carry


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Listener]:
    listener = Listener(tmp_path)
    yield listener
    listener.stop()


@pytest.mark.parametrize("segments", [whole, dribbled, headers_cut])
def test_every_segmentation_of_the_stream_stores_the_instances_sent(node, tmp_path, segments):
    files = ct_series(tmp_path / "sent", n=2, rows=48)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in segments([association_rq(max_pdu=16384)]):
            sock.sendall(chunk)
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sent: dict[str, Path] = {}
        for message_id, path in enumerate(files, start=1):
            pdus, sop_uid = c_store_pdus(path, message_id, fragment_bytes=1000)
            sent[sop_uid] = path
            for chunk in segments(pdus):
                sock.sendall(chunk)
            answer = read_pdu(sock)
            assert answer[0] == 0x04  # P-DATA-TF: the C-STORE-RSP
            command = parse_command(answer[12:])  # after the PDU and PDV headers
            assert read_us(command.get(STATUS)) == 0x0000
        for chunk in segments([A_RELEASE_RQ]):
            sock.sendall(chunk)
        assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP

    stored = {p: pydicom.dcmread(p) for p in node.scp.spool.root.rglob("*.dcm") if p.is_file()}
    assert sorted(ds.SOPInstanceUID for ds in stored.values()) == sorted(sent)
    for ds in stored.values():
        original = pydicom.dcmread(sent[ds.SOPInstanceUID])
        assert ds.PixelData == original.PixelData
        assert ds.ImagePositionPatient == original.ImagePositionPatient


def open_association(node: Listener) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    sock.sendall(association_rq(max_pdu=16384))
    assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
    return sock


def test_a_p_data_tf_whose_item_overruns_it_is_refused_as_before(node, tmp_path):
    # Not taken directly (split_pdvs refuses it): pynetdicom decodes it, fails, and
    # aborts the association, as it did before the direct path existed.
    path = ct_series(tmp_path / "sent", n=1)[0]
    pdus, _ = c_store_pdus(path, 1, fragment_bytes=1000)
    body = pdus[1][6:]
    overrun = struct.pack(">L", len(body) + 100) + body[4:]
    with open_association(node) as sock:
        sock.sendall(pdus[0] + struct.pack(">BBL", 0x04, 0, len(overrun)) + overrun)
        answer = read_pdu(sock)
        assert answer[0] == 0x07  # A-ABORT
    assert not list(node.scp.spool.root.rglob("*.dcm"))


def test_handlers_on_received_pdus_still_see_every_p_data_tf(node, tmp_path):
    # A handler on EVT_PDU_RECV turns the direct path off for the association, so
    # pynetdicom raises the event for each PDU as before.
    seen: list[int] = []
    node.scp._servers["plain"].bind(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu.pdu_type))
    path = ct_series(tmp_path / "sent", n=1, rows=48)[0]
    pdus, sop_uid = c_store_pdus(path, 1, fragment_bytes=1000)
    with open_association(node) as sock:
        sock.sendall(b"".join(pdus))
        assert read_pdu(sock)[0] == 0x04
        sock.sendall(A_RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06
    assert seen.count(0x04) == len(pdus)
    stored = [pydicom.dcmread(p) for p in node.scp.spool.root.rglob("*.dcm")]
    assert [ds.SOPInstanceUID for ds in stored] == [sop_uid]
