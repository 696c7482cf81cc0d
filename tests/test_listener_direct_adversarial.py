"""The listener's read-ahead (``listener.PduReader`` / ``ReadAhead``) and its direct
P-DATA path (``Wakeups._deliver_p_data``) against hostile or odd peers on raw sockets.

Most tests guard what the direct path must keep as pynetdicom's path had it: several
PDVs in one P-DATA-TF, empty fragments and empty PDUs, a message split over two
presentation contexts or interrupted by another one (A-ABORT, nothing stored), A-RELEASE
/ A-ABORT in the same segment as the last data PDU, the Maximum Length exactly and one
byte over, a malformed PDV item, a peer that stalls or closes inside a PDU.

Two tests guard defects the read-ahead buffer had (fixed in ``ReadAhead.room``):
- ``test_a_large_pdu_arriving_a_segment_at_a_time_is_not_copied_once_per_segment``: a
  P-DATA-TF over 256 KiB whose bytes arrive a TCP segment at a time (any WAN link, or a
  peer sending small writes) made ``ReadAhead.room`` allocate and copy a new buffer for
  every segment: quadratic CPU. Now the buffer doubles.
- ``test_a_buffer_grown_for_a_large_pdu_is_not_kept_while_the_stream_goes_on``: after a
  PDU larger than ``_KEEP_BYTES``, the grown buffer stayed with the connection for as
  long as some bytes of a next PDU were in it, which a streaming peer makes always true.
  Now it is let go as soon as what is left fits ``_KEEP_BYTES``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from dicom_node.listener import _KEEP_BYTES, PduReader
from dicom_node.store_path import STATUS, command_element, parse_command, read_us
from dicom_node.store_send import encode_store_request
from kernel.settings import ListenerSettings
from tests import test_listener_read_ahead as read_ahead_tests
from tests.dicom_factory import ct_series
from tests.scp_helpers import dataset_bytes
from tests.test_listener_hardening import Listener

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT, ECHO, MR = 1, 3, 5  # presentation context IDs the requests below propose
COMMAND_LAST, DATA, DATA_LAST = 0x03, 0x00, 0x02
A_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
A_ABORT_RQ = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
P_DATA_TF, A_ASSOCIATE_AC, A_RELEASE_RP, A_ABORT = 0x04, 0x02, 0x06, 0x07
C_STORE_RSP, C_ECHO_RSP = 0x8001, 0x8030
MAX_PDU = 16384


def association_rq(max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ proposing CT (ID 1), Verification (3) and MR (5) storage."""
    return read_ahead_tests.association_rq(
        max_pdu, ((CT, CTImageStorage), (ECHO, Verification), (MR, MRImageStorage))
    )


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1)."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*items: bytes) -> bytes:
    """A P-DATA-TF PDU holding ``items``."""
    body = b"".join(items)
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


def echo_command(message_id: int) -> bytes:
    body = b"".join(
        (
            command_element(0x0002, b"1.2.840.10008.1.1"),
            command_element(0x0100, struct.pack("<H", 0x0030)),
            command_element(0x0110, struct.pack("<H", message_id)),
            command_element(0x0800, struct.pack("<H", 0x0101)),
        )
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def read_pdu(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """The next PDU; EOFError when the node closed the connection first."""
    sock.settimeout(timeout_s)

    def exact(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    head = exact(6)
    return head + exact(struct.unpack(">L", head[2:])[0])


def answer(sock: socket.socket, timeout_s: float = 5.0) -> tuple[int, int | None, int | None]:
    """(PDU type, DIMSE command field, status) of the next PDU; the last two None for a
    PDU other than P-DATA-TF."""
    pdu = read_pdu(sock, timeout_s)
    if pdu[0] != P_DATA_TF:
        return pdu[0], None, None
    command = parse_command(pdu[12:])
    return pdu[0], read_us(command.get(0x0100)), read_us(command.get(STATUS))


def closed_without_answer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the node closed ``sock`` within ``timeout_s`` with nothing but (at most)
    an A-ABORT sent first."""
    try:
        first = read_pdu(sock, timeout_s)
    except (EOFError, ConnectionResetError):
        return True
    if first[0] != A_ABORT:
        return False
    try:
        read_pdu(sock, timeout_s)
    except (EOFError, ConnectionResetError):
        return True
    return False


class Instance:
    """One CT instance as a sender puts it on the wire."""

    def __init__(self, path: Path, message_id: int) -> None:
        ds = pydicom.dcmread(path)
        self.sop_uid = ds.SOPInstanceUID
        self.pixels = ds.PixelData
        self.command = encode_store_request(ds.SOPClassUID, ds.SOPInstanceUID, message_id)
        self.data = dataset_bytes(ds)

    def pdus(self, fragment: int) -> bytes:
        """Command PDU, then the data set in PDUs of ``fragment`` bytes of data each."""
        out = [p_data(pdv(CT, COMMAND_LAST, self.command))]
        for start in range(0, len(self.data), fragment):
            last = start + fragment >= len(self.data)
            chunk = self.data[start : start + fragment]
            out.append(p_data(pdv(CT, DATA_LAST if last else DATA, chunk)))
        return b"".join(out)


def stored(node: Listener) -> dict[str, pydicom.Dataset]:
    found = {}
    for path in node.scp.spool.root.rglob("*.dcm"):
        if path.is_file():
            ds = pydicom.dcmread(path)
            found[ds.SOPInstanceUID] = ds
    return found


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Listener]:
    listener = Listener(tmp_path, max_pdu_size=MAX_PDU, listener={"idle_timeout_s": 1.0})
    yield listener
    listener.stop()


@pytest.fixture
def instances(tmp_path: Path) -> list[Instance]:
    paths = ct_series(tmp_path / "sent", n=2, rows=64)  # ~8 KiB of pixels each
    return [Instance(path, message_id) for message_id, path in enumerate(paths, start=1)]


def open_association(node: Listener, max_pdu: int = MAX_PDU) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(association_rq(max_pdu))
    assert read_pdu(sock)[0] == A_ASSOCIATE_AC
    return sock


# -- defects -------------------------------------------------------------------------


class _OneSegmentPerRead:
    """A connected socket whose every read returns at most one TCP segment (1448 bytes),
    as reads do when the reader keeps up with a sender on a real network."""

    def __init__(self, sock: socket.socket, on_read: Callable[[], None]) -> None:
        self.sock = sock
        self.on_read = on_read

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def recv_into(self, view: memoryview) -> int:
        self.on_read()
        return self.sock.recv_into(view[:1448])


def test_a_large_pdu_arriving_a_segment_at_a_time_is_not_copied_once_per_segment():
    """A sender (or just a WAN link) delivers a 1 MiB P-DATA-TF - the node's default
    Maximum Length - one TCP segment per read. ``PduReader._fill`` asks ``ReadAhead.room``
    for ``min(rest, max(have, 256 KiB)) + 256 KiB`` free bytes on every read; after a
    read that returned less than that, the free space is short again, so ``room``
    allocates a new, zeroed buffer of ``have + wanted`` and copies everything read so far,
    once per segment: ~725 buffers of 0.5-1.5 MiB for one 1 MiB PDU (~1 GB of memory
    traffic, 0.1 s CPU per MiB at 1448-byte segments, 1.3 s at 100-byte segments, 3 s
    for a 4 MiB PDU; before the read-ahead: 0.00-0.04 s). Quadratic in the PDU size, in
    the reader thread, holding the GIL for every other association of the process.
    Correct: the buffer grows geometrically, a few allocations per PDU."""
    pdu_bytes = 1024 * 1024
    body = bytes(range(256)) * (pdu_bytes // 256)
    ours, theirs = socket.socketpair()
    allocations: list[int] = []
    reader: PduReader | None = None
    last: list[bytearray] = []

    def note_buffer() -> None:
        buf = reader._ahead._buf
        if not last or buf is not last[0]:
            allocations.append(len(buf))
            last[:] = [buf]

    dul = types.SimpleNamespace(socket=types.SimpleNamespace(socket=None), _run_loop_delay=0.001)
    dul.socket.socket = _OneSegmentPerRead(ours, note_buffer)
    reader = PduReader(types.SimpleNamespace(dul=dul), ListenerSettings(), pdu_bytes, "peer")
    reader.requested = True  # the A-ASSOCIATE-RQ was read: read-ahead is on
    with ours, theirs:
        writer = threading.Thread(
            target=theirs.sendall, args=(struct.pack(">BBL", P_DATA_TF, 0, pdu_bytes) + body,)
        )
        writer.start()
        header = reader.recv(6)
        got = bytes(reader.recv(pdu_bytes))
        writer.join()
    assert bytes(header[:1]) == b"\x04" and got == body
    allocated = sum(allocations)
    assert allocated <= 4 * pdu_bytes, (
        f"{len(allocations)} buffers ({allocated / 2**20:.0f} MiB) allocated to read one "
        f"{pdu_bytes / 2**20:.0f} MiB PDU"
    )


def test_a_buffer_grown_for_a_large_pdu_is_not_kept_while_the_stream_goes_on(tmp_path):
    """With ``max_pdu_size`` 8 MiB (or 0, unlimited) a sender stores one instance in an
    8 MiB P-DATA-TF and goes on storing small instances, its next PDU's first bytes in
    the same write as the end of the previous one (any streaming sender does this). The
    connection's read-ahead buffer, grown to >8 MiB for the large PDU, is only let go
    once it is empty (``ReadAhead.take``), which it never is while bytes of a next PDU
    are in it: the association keeps >8 MiB for its whole life instead of at most
    ``_KEEP_BYTES`` between PDUs, as the module docstring promises (before the
    read-ahead nothing was kept). Correct: a buffer over ``_KEEP_BYTES`` is shrunk once
    the large PDU is consumed, whatever is left in it."""
    node = Listener(tmp_path, max_pdu_size=8 * 1024 * 1024)
    try:
        small = [Instance(p, i) for i, p in enumerate(ct_series(tmp_path / "s", n=4), start=2)]
        large = Instance(ct_series(tmp_path / "l", n=1, rows=2000)[0], 1)  # 7.6 MiB pixels
        with open_association(node, max_pdu=8 * 1024 * 1024) as sock:
            stream = large.pdus(fragment=len(large.data))
            for instance in small:
                stream += instance.pdus(fragment=4096)
                cut = len(stream) - 3  # the last 3 bytes go with the next write
                sock.sendall(stream[:cut])
                stream = stream[cut:]
                assert answer(sock)[1:] == (C_STORE_RSP, 0x0000)
            (assoc,) = node.scp.ae.active_associations
            kept = len(assoc.dul.socket.recv.__self__._ahead._buf)
            assert kept <= _KEEP_BYTES, (
                f"read-ahead buffer of {kept / 2**20:.1f} MiB kept between small PDUs"
            )
            sock.sendall(stream)  # the end of the last small instance
            assert answer(sock)[1:] == (C_STORE_RSP, 0x0000)
            sock.sendall(A_RELEASE_RQ)
            assert answer(sock)[0] == A_RELEASE_RP
        assert len(stored(node)) == 5
    finally:
        node.stop()


# -- guards: what the direct path must keep as pynetdicom's path had it ----------------


def test_command_and_data_set_in_one_pdu_store_the_instance_exactly(node, instances):
    """A sender packs a C-STORE's command and its whole data set into one P-DATA-TF (two
    PDVs): stored byte for byte, answered once with success."""
    first = instances[0]
    with open_association(node) as sock:
        sock.sendall(p_data(pdv(CT, COMMAND_LAST, first.command), pdv(CT, DATA, first.data[:8000])))
        sock.sendall(p_data(pdv(CT, DATA_LAST, first.data[8000:])))
        assert answer(sock)[1:] == (C_STORE_RSP, 0x0000)
        sock.sendall(A_RELEASE_RQ)
        assert answer(sock)[0] == A_RELEASE_RP
    found = stored(node)
    assert list(found) == [first.sop_uid] and found[first.sop_uid].PixelData == first.pixels


def test_two_c_stores_in_one_pdu_are_both_stored_and_answered_in_order(tmp_path):
    """Two whole C-STOREs (command and data set each) in one P-DATA-TF of 4 PDVs: both
    stored, answered in the order sent."""
    node = Listener(tmp_path, max_pdu_size=65536)
    try:
        first, second = (
            Instance(p, i) for i, p in enumerate(ct_series(tmp_path / "s", n=2), start=1)
        )
        with open_association(node, max_pdu=65536) as sock:
            sock.sendall(
                p_data(
                    pdv(CT, COMMAND_LAST, first.command),
                    pdv(CT, DATA_LAST, first.data),
                    pdv(CT, COMMAND_LAST, second.command),
                    pdv(CT, DATA_LAST, second.data),
                )
            )
            answers = [read_pdu(sock), read_pdu(sock)]
            ids = [read_us(parse_command(a[12:]).get(0x0120)) for a in answers]
            statuses = [read_us(parse_command(a[12:]).get(STATUS)) for a in answers]
            sock.sendall(A_RELEASE_RQ)
            assert answer(sock)[0] == A_RELEASE_RP
        assert ids == [1, 2] and statuses == [0, 0]
        assert set(stored(node)) == {first.sop_uid, second.sop_uid}
    finally:
        node.stop()


def test_an_empty_last_fragment_and_an_empty_pdu_still_store_the_instance(node, instances):
    """The data set's last fragment is a PDV with no data (item length 2), and a
    P-DATA-TF of length 0 comes in between: stored exactly, answered once."""
    first = instances[0]
    with open_association(node) as sock:
        sock.sendall(
            p_data(pdv(CT, COMMAND_LAST, first.command))
            + p_data(pdv(CT, DATA, first.data[:5000]))
            + struct.pack(">BBL", P_DATA_TF, 0, 0)
            + p_data(pdv(CT, DATA, first.data[5000:]))
            + p_data(pdv(CT, DATA_LAST, b""))
        )
        assert answer(sock)[1:] == (C_STORE_RSP, 0x0000)
        sock.sendall(A_RELEASE_RQ)
        assert answer(sock)[0] == A_RELEASE_RP
    assert stored(node)[first.sop_uid].PixelData == first.pixels


@pytest.mark.parametrize("interruption", ["other context", "c-echo"])
def test_a_data_set_split_or_interrupted_is_aborted_and_not_stored(node, instances, interruption):
    """A data set whose fragments continue on another presentation context (in the same
    PDU), or that a C-ECHO command interrupts (PS3.8 E.2: one message's fragments in
    order on one context): A-ABORT (StoreDIMSE's Evt19), nothing stored or answered."""
    first = instances[0]
    if interruption == "other context":
        stream = p_data(
            pdv(CT, COMMAND_LAST, first.command),
            pdv(CT, DATA, first.data[:100]),
            pdv(MR, DATA_LAST, first.data[100:]),
        )
    else:
        stream = (
            p_data(pdv(CT, COMMAND_LAST, first.command))
            + p_data(pdv(CT, DATA, first.data[:100]))
            + p_data(pdv(ECHO, COMMAND_LAST, echo_command(2)))
            + p_data(pdv(CT, DATA_LAST, first.data[100:]))
        )
    with open_association(node) as sock:
        sock.sendall(stream)
        assert answer(sock)[0] == A_ABORT
        assert closed_without_answer(sock, 3)
    time.sleep(0.2)
    assert stored(node) == {}


@pytest.mark.parametrize("after", ["release", "abort"])
def test_release_or_abort_in_the_segment_of_the_last_data_pdu(node, instances, after):
    """The last data PDU and an A-RELEASE-RQ / A-ABORT in one TCP segment: the instance is
    stored and answered first, then released (or the association ends aborted)."""
    first = instances[0]
    with open_association(node) as sock:
        sock.sendall(first.pdus(4096) + (A_RELEASE_RQ if after == "release" else A_ABORT_RQ))
        assert answer(sock)[1:] == (C_STORE_RSP, 0x0000)
        if after == "release":
            assert answer(sock)[0] == A_RELEASE_RP
        assert closed_without_answer(sock, 3)
    assert stored(node)[first.sop_uid].PixelData == first.pixels
    deadline = time.monotonic() + 5
    while not node.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.closed[0].ended == ("released" if after == "release" else "aborted")


@pytest.mark.parametrize("over", [0, 1])
def test_p_data_at_the_maximum_length_is_stored_and_one_byte_over_aborted(tmp_path, over):
    """Data PDUs of exactly the negotiated Maximum Length are stored; one of a byte more
    is refused from its header (A-ABORT, invalid PDU parameter value) and nothing is
    stored or acknowledged."""
    node = Listener(tmp_path, max_pdu_size=MAX_PDU)
    try:
        first = Instance(ct_series(tmp_path / "s", n=1, rows=128)[0], 1)  # 32 KiB pixels
        with open_association(node) as sock:
            sock.sendall(first.pdus(fragment=MAX_PDU - 6 + over))
            if over:
                assert read_pdu(sock) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
            else:
                assert answer(sock)[1:] == (C_STORE_RSP, 0x0000)
                sock.sendall(A_RELEASE_RQ)
                assert answer(sock)[0] == A_RELEASE_RP
        time.sleep(0.2)
        assert list(stored(node)) == ([] if over else [first.sop_uid])
    finally:
        node.stop()


# pynetdicom's DUL thread dies on the empty PDV (IndexError), as it did before.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_one_byte_pdv_item_is_not_acknowledged(node, instances):
    """The data set's last PDV item has length 1 (a context ID, no message control
    header): not taken directly (``split_pdvs``); pynetdicom's path ends the association
    as before. Nothing stored, no C-STORE-RSP."""
    first = instances[0]
    with open_association(node) as sock:
        sock.sendall(
            p_data(pdv(CT, COMMAND_LAST, first.command))
            + p_data(pdv(CT, DATA, first.data))
            + struct.pack(">BBLLB", P_DATA_TF, 0, 5, 1, CT)
        )
        assert closed_without_answer(sock, 3)
    assert stored(node) == {}


@pytest.mark.parametrize("where", ["header", "body"])
def test_a_peer_stalling_inside_a_pdu_is_closed_after_the_idle_timeout(node, instances, where):
    """A sender stops in the middle of a data PDU's header or body, the part before in
    the same segment as whole PDUs the direct path has taken: the connection is closed
    ``listener.idle_timeout_s`` (1 s) later, nothing acknowledged or stored."""
    first = instances[0]
    data_pdu = p_data(pdv(CT, DATA_LAST, first.data))
    cut = 3 if where == "header" else len(data_pdu) // 2
    with open_association(node) as sock:
        started = time.monotonic()
        sock.sendall(p_data(pdv(CT, COMMAND_LAST, first.command)) + data_pdu[:cut])
        assert closed_without_answer(sock, 4)
        assert 0.8 < time.monotonic() - started < 3
    assert stored(node) == {}


def test_a_peer_closing_inside_a_pdu_ends_the_association(node, instances):
    """A sender closes its connection in the middle of the last data PDU: nothing
    stored, the association reported ended, its threads gone."""
    first = instances[0]
    data_pdu = p_data(pdv(CT, DATA_LAST, first.data))
    sock = open_association(node)
    sock.sendall(p_data(pdv(CT, COMMAND_LAST, first.command)) + data_pdu[:-10])
    time.sleep(0.1)
    sock.close()
    deadline = time.monotonic() + 5
    while (node.scp.ae.active_associations or not node.closed) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not node.scp.ae.active_associations
    assert node.closed and node.closed[0].ended == "aborted"
    assert stored(node) == {}
