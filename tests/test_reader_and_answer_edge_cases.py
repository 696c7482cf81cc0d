"""Edge cases an adversarial review found in three fixes of 2026-12-01: a data set cut
inside its last element header on the full-parse path (``instance.parse_header``: group
length wrong or missing, a sequence cut short), answers that come twice or late
(``store_send.FileStore``), and a released association taken for a failed reader
(``listener.Wakeups``)."""

from __future__ import annotations

import io
import logging
import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.instance import CorruptDatasetError, parse_header
from dicom_node.store_path import file_meta
from dicom_node.store_send import StoreResponse
from tests.conftest import storescu, wait_until
from tests.dicom_factory import ct_series, ct_slice
from tests.test_listener_hardening import listener as listener  # the fixture
from tests.test_store_send_adversarial import _command, _files, _Node, _Peer, _RawPeer, _ui, _us


def _file(syntax: str) -> tuple[pydicom.Dataset, bytes, bytes]:
    ds = ct_slice(generate_uid(), generate_uid(), 3, rows=4)
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buf, ds)
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    return ds, meta, buf.getvalue()


def _meta_variants(meta: bytes) -> dict[str, bytes]:
    """The same File Meta Information with its (0002,0000) Group Length wrong or absent:
    pydicom and DCMTK read such a file (they find the data set where group 0002 ends)."""
    length = struct.unpack("<L", meta[140:144])[0]
    variants = {"absent": meta[:132] + meta[144:]}
    for delta in (-2, 2, 8, 10_000):
        variants[f"{delta:+d}"] = meta[:140] + struct.pack("<L", length + delta) + meta[144:]
    return variants


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_a_cut_last_element_header_is_refused_whatever_the_meta_group_length_says(syntax):
    """d04c12b walked the element headers from where (0002,0000) points. With that group
    length wrong or missing (pydicom reads the file all the same) the walk started off
    the data set (or not at all) and a file cut inside its Pixel Data header was accepted,
    stored without its pixels. The walk must start where pydicom's data set starts."""
    ds, meta, body = _file(syntax)
    long_header = syntax != ImplicitVRLittleEndian
    pixel_header_at = len(body) - len(ds.PixelData) - (12 if long_header else 8)
    for name, variant in _meta_variants(meta).items():
        whole = pydicom.dcmread(io.BytesIO(variant + body))
        assert "PixelData" in whole, name  # a file pydicom reads whole ...
        assert parse_header(variant + body).sop_uid == ds.SOPInstanceUID, name  # ... passes
        for kept in (1, 4, 7):
            cut = variant + body[: pixel_header_at + kept]
            assert "PixelData" not in pydicom.dcmread(io.BytesIO(cut)), name
            with pytest.raises(CorruptDatasetError, match="truncated"):
                parse_header(cut)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_a_cut_undefined_length_sequence_is_corrupt_not_an_os_error(syntax):
    """A data set that ends in a sequence of undefined length, cut anywhere inside it:
    pydicom raises OSError ("No tag to read at file position ..."), which escaped
    parse_header (ingest.receive, which must never raise for bad data, raised it to the
    STOW-RS / retrieval caller; the listener answered 0xC211). It is a corrupt data set."""
    ds = ct_slice(generate_uid(), generate_uid(), 3, rows=4)
    del ds.PixelData
    item = pydicom.Dataset()
    item.CodeValue = "123"
    item.CodeMeaning = "x" * 10
    ds.add_new(0x00400260, "SQ", pydicom.Sequence([item, item]))
    ds[0x00400260].is_undefined_length = True
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = True
    write_dataset(buf, ds)
    body = buf.getvalue()
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    assert parse_header(meta + body).sop_uid == ds.SOPInstanceUID
    for cut in (1, 8, 20, 40):
        data = meta + body[:-cut]
        with pytest.raises(CorruptDatasetError):
            parse_header(data)
        with pytest.raises(CorruptDatasetError):
            parse_header(data, transfer_syntax_uid=syntax, dataset_offset=len(meta))


def test_a_duplicate_answer_left_queued_is_not_taken_for_a_foreign_one_later(tmp_path):
    """04a40e7 drops a second answer to one of the last 64 messages, but only looks at
    pynetdicom's queue while an answer is late (> 50 ms). A duplicate that arrives
    while the answers come fast stays at the queue's head; 64 messages later, the first
    answer that is late found it there, no longer 'recent', and the association was
    aborted as if the destination had answered a message the node never sent."""
    count = 70

    def script(peer: _Peer) -> None:
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context_id, fields, _ = peer.read_message()
        peer.answer_store(context_id, fields)
        first = fields
        context_id, fields, _ = peer.read_message()
        peer.answer_store(context_id, first)  # the first answer once more, then this one's
        peer.answer_store(context_id, fields)
        for _ in range(count - 3):
            context_id, fields, _ = peer.read_message()
            peer.answer_store(context_id, fields)
        context_id, fields, _ = peer.read_message()
        assert _us(fields[0x0100]) == 0x0001
        time.sleep(0.3)  # the last answer is late: the sender looks at the queue
        peer.answer_store(context_id, fields)
        peer.serve_stores()

    _all_answered_with_success(_RawPeer(script), tmp_path, count, timeout_s=10.0)


def test_a_released_association_is_not_reported_as_ended_on_a_reader_error(
    listener, tmp_path, caplog
):
    """72d7823 took a reader that ended with the socket object still set for a failed
    one; but pynetdicom ends every association whose peer closes the connection after
    the release that way (Sta13 + Evt17 shuts the socket, leaves it set, and stops the
    reader in Sta1). Each released association then logged 'ended on an error in its
    reader' and was aborted once more (EVT_ABORTED after EVT_RELEASED, or before it,
    which would report a release as an abort)."""
    lst = listener()
    with caplog.at_level(logging.WARNING, logger="dicom_node.listener"):
        sent = storescu(ct_series(tmp_path / "s", 3), lst.port)
        assert sent.returncode == 0, sent.stderr
        facts = wait_until(lambda: lst.closed and lst.closed[0], 10, "the association reported")
        assert facts.ended == "released"
        wait_until(lambda: lst.scp.slots.in_use == 0, 10, "the slot given back")
        time.sleep(0.5)  # the reader ends after the peer closes the connection
    assert "error in its reader" not in caplog.text
    assert len(lst.closed) == 1


def test_a_second_answer_read_at_once_does_not_replace_the_first(tmp_path):
    """Each C-STORE answered twice in one TCP segment (success, then 0xA700): the reader
    took the second for the message still on the wire and overwrote the first before
    the sender read it (89 of 100 answers came out 0xA700 here). The first answer is the
    answer; the second is a duplicate."""
    count = 60

    def script(peer: _Peer) -> None:
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            context_id, fields, _ = peer.read_message()
            both = b""
            for status in (0x0000, 0xA700):
                answer = {
                    0x0002: _ui(fields[0x0002]), 0x0100: 0x8001, 0x0120: _us(fields[0x0110]),
                    0x0800: 0x0101, 0x0900: status, 0x1000: _ui(fields[0x1000]),
                }  # fmt: skip
                value = _command(answer)
                both += struct.pack(">BBLLBB", 4, 0, len(value) + 6, len(value) + 2, context_id, 3)
                both += value
            peer.sock.sendall(both)
        peer.serve_stores()

    _all_answered_with_success(_RawPeer(script), tmp_path, count)


def _all_answered_with_success(
    destination: _RawPeer, tmp_path: Path, count: int, **node_kw: float
) -> None:
    """``count`` C-STOREs to ``destination`` over one association, with TCP_NODELAY as
    dispatch's EVT_CONN_OPEN handler sets it (answers come within a millisecond): each
    answered with success, the association never aborted, the script without errors."""
    node = _Node(destination.port, **node_kw)
    node.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        answers = [node.send(ds, path) for ds, path in _files(tmp_path, count, rows=4)]
        assert not node.assoc.is_aborted
    finally:
        node.close()
    assert destination.finish() == []
    assert answers == [StoreResponse(0x0000)] * count
