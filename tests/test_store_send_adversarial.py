"""dicom_node.store_send against destinations that misbehave.

The destination here is a DICOM upper layer acceptor on a raw socket (``_RawPeer``): it
negotiates like any SCP (PS3.8 9.3.2-9.3.3) and then does what a script says, so it can
send an N-EVENT-REPORT while a data set is arriving, answer a C-STORE with a data set
attached, answer twice or with the wrong message ID, and it checks what it receives
the way a strict peer does (a message's fragments in order, none over its PDU limit).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from devkit.net import free_port
from dicom_node.store_path import parse_command
from dicom_node.store_send import FileStore, StoreResponse, data_set_offset
from tests.dicom_factory import ct_slice, write

_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # Storage Commitment Push Model SOP Instance


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _command(fields: dict[int, int | str]) -> bytes:
    """An implicit VR little endian command set (PS3.7 6.3.1): element -> US or UI."""
    body = b""
    for element, value in sorted(fields.items()):
        raw = struct.pack("<H", value) if isinstance(value, int) else value.encode("ascii")
        raw += b"\x00" * (len(raw) % 2)
        body += struct.pack("<HHL", 0x0000, element, len(raw)) + raw
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _us(value: bytes) -> int:
    return int(struct.unpack("<H", value[:2])[0])


def _ui(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii")


class _Peer:
    """One accepted association, seen from the destination's side."""

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        self.sock = sock
        self.max_pdu = max_pdu
        self.contexts: dict[str, int] = {}  # abstract syntax -> context ID
        self.pdvs: list[tuple[int, int, int]] = []  # context ID, control header, length
        self.others: list[dict[int, bytes]] = []  # messages other than C-STORE-RQs

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the node closed the connection")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBL", self._exact(6))
        if self.max_pdu and pdu_type == 0x04 and length > self.max_pdu:
            raise AssertionError(f"P-DATA-TF of {length} bytes, over our limit {self.max_pdu}")
        return pdu_type, self._exact(length)

    def read_message(
        self, on_fragment: Callable[[int], None] | None = None
    ) -> tuple[int, dict[int, bytes], bytes]:
        """The next DIMSE message (context ID, command elements, data set), assembled as a
        strict peer does (PS3.8 E.2): command fragments, then its data set's; a fragment
        of anything else in between is a protocol error. ``on_fragment(n)`` after the
        n-th data set fragment."""
        command, data, context_id, fields, fragments = b"", b"", 0, None, 0
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                raise ConnectionError(f"PDU type 0x{pdu_type:02X} instead of a P-DATA-TF")
            offset = 0
            while offset < len(body):
                (length,) = struct.unpack_from(">L", body, offset)
                pdv_context, control = body[offset + 4], body[offset + 5]
                value = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                self.pdvs.append((pdv_context, control, len(value)))
                if fields is not None and (control & 0x01 or pdv_context != context_id):
                    raise AssertionError("a fragment of another message inside a data set")
                if control & 0x01:
                    command, context_id = command + value, pdv_context
                    if control & 0x02:
                        fields = parse_command(command)
                        if _us(fields[0x0800]) == 0x0101:
                            return context_id, fields, b""
                    continue
                data, fragments = data + value, fragments + 1
                if on_fragment is not None:
                    on_fragment(fragments)
                if control & 0x02:
                    return context_id, fields or {}, data

    def send_pdv(self, context_id: int, control: int, value: bytes) -> None:
        header = struct.pack(
            ">BBLLBB", 0x04, 0, len(value) + 6, len(value) + 2, context_id, control
        )
        self.sock.sendall(header + value)

    def answer_store(
        self, context_id: int, request: dict[int, bytes], message_id: int | None = None,
        status: int = 0x0000, data_set: bytes | None = None,
    ) -> None:  # fmt: skip
        """A C-STORE-RSP (PS3.7 9.3.1.2); with ``data_set`` one follows (non-conformant)."""
        fields: dict[int, int | str] = {
            0x0002: _ui(request[0x0002]),
            0x0100: 0x8001,
            0x0120: _us(request[0x0110]) if message_id is None else message_id,
            0x0800: 0x0101 if data_set is None else 0x0000,
            0x0900: status,
            0x1000: _ui(request[0x1000]),
        }
        self.send_pdv(context_id, 0x03, _command(fields))
        if data_set is not None:
            self.send_pdv(context_id, 0x02, data_set)

    def serve_stores(self) -> None:
        """Answer every C-STORE with success until the node releases (answered)."""
        while True:
            try:
                context_id, fields, _ = self.read_message()
            except ConnectionError:  # an A-RELEASE-RQ, or the node closed
                break
            if _us(fields[0x0100]) == 0x0001:
                self.answer_store(context_id, fields)
            else:
                self.others.append(fields)
        with _quiet():
            self.sock.sendall(struct.pack(">BBLL", 0x06, 0, 4, 0))  # A-RELEASE-RP


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


class _RawPeer:
    """Accepts associations on 127.0.0.1 (each context with the first transfer syntax
    proposed, our ``max_pdu``) and runs ``script(peer)`` on each; its failures are kept
    in ``errors``."""

    def __init__(self, script: Callable[[_Peer], None], max_pdu: int = 16384) -> None:
        self.script, self.max_pdu = script, max_pdu
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener, _quiet():
            sock, _ = self.listener.accept()
            with sock:
                try:
                    self.script(self._accept(sock))
                except BaseException as exc:  # reported by the test
                    self.errors.append(exc)
                finally:
                    self.done.set()

    def _accept(self, sock: socket.socket) -> _Peer:
        peer = _Peer(sock, self.max_pdu)
        pdu_type, body = peer.read_pdu()
        assert pdu_type == 0x01, pdu_type
        offset, accepted = 68, b""
        while offset < len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4 : offset + 4 + length]
            offset += 4 + length
            if item_type != 0x20:  # presentation context (PS3.8 9.3.2.2)
                continue
            sub, abstract, syntaxes = 4, "", []
            while sub < len(value):
                sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub)
                uid = _ui(value[sub + 4 : sub + 4 + sub_length])
                abstract = uid if sub_type == 0x30 else abstract
                syntaxes += [uid] if sub_type == 0x40 else []
                sub += 4 + sub_length
            peer.contexts[abstract] = value[0]
            accepted += _item(0x21, bytes([value[0], 0, 0, 0]) + _item(0x40, syntaxes[0].encode()))
        user = _item(0x51, struct.pack(">L", self.max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9")
        ac = (
            struct.pack(">HH", 1, 0) + body[4:36] + bytes(32)
            + _item(0x10, _APPLICATION_CONTEXT) + accepted + _item(0x50, user)
        )  # fmt: skip
        sock.sendall(struct.pack(">BBL", 0x02, 0, len(ac)) + ac)
        return peer

    def finish(self) -> list[BaseException]:
        assert self.done.wait(10), "the destination's script did not end"
        return self.errors


class _Node:
    """The node's side: a pynetdicom association (with the storage commitment context
    and an N-EVENT-REPORT handler, as ``dispatch`` asks for it) and its FileStore."""

    def __init__(self, port: int, timeout_s: float = 10.0, max_pdu: int = 16384) -> None:
        ae = AE(ae_title="NODE")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(StorageCommitmentPushModel)
        self.reports: list[int] = []
        handlers = [(evt.EVT_N_EVENT_REPORT, self._report)]
        self.assoc = ae.associate(
            "127.0.0.1", port, ae_title="SCP", evt_handlers=handlers, max_pdu=max_pdu
        )
        assert self.assoc.is_established
        self.store = FileStore(self.assoc, timeout_s)
        self.store.install()
        self.context_id = next(
            int(cx.context_id)
            for cx in self.assoc.accepted_contexts
            if cx.abstract_syntax == CTImageStorage
        )

    def _report(self, event: evt.Event) -> tuple[int, None]:
        self.reports.append(int(event.request.EventTypeID))
        return 0x0000, None

    def send(self, ds: Dataset, path: Path) -> StoreResponse | None:
        return self.store.store(
            path, data_set_offset(path), self.context_id, CTImageStorage, ds.SOPInstanceUID
        )

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _files(tmp_path: Path, count: int, rows: int) -> list[tuple[Dataset, Path]]:
    out = []
    for index in range(count):
        ds = ct_slice(generate_uid(), generate_uid(), index, rows=rows)
        out.append((ds, write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")))
    return out


def test_an_n_event_report_answer_does_not_land_inside_a_data_set(tmp_path):
    """A PACS reports a storage commitment result on the association while the next
    8 MB data set is arriving and reads on only after a pause: the node answers the
    N-EVENT-REPORT after that data set's last fragment, not between two of them (the
    destination assembles a message from its fragments in order, PS3.8 E.2)."""

    def script(peer: _Peer) -> None:
        context_id, fields, _ = peer.read_message()
        peer.answer_store(context_id, fields)

        def report(fragments: int) -> None:
            if fragments == 3:
                peer.send_pdv(
                    peer.contexts[StorageCommitmentPushModel], 0x03,
                    _command({
                        0x0002: StorageCommitmentPushModel, 0x0100: 0x0100, 0x0110: 77,
                        0x0800: 0x0101, 0x1000: _COMMITMENT_INSTANCE, 0x1002: 1,
                    }),
                )  # fmt: skip
                time.sleep(0.3)  # a busy destination: the node's writes wait meanwhile

        context_id, fields, _ = peer.read_message(on_fragment=report)
        peer.answer_store(context_id, fields)
        peer.serve_stores()
        answers = [(_us(f[0x0100]), _us(f[0x0120]), _us(f[0x0900])) for f in peer.others]
        assert answers == [(0x8100, 77, 0x0000)]  # the N-EVENT-REPORT-RSP, once

    destination = _RawPeer(script)
    node = _Node(destination.port)
    try:
        answers = [node.send(ds, path) for ds, path in _files(tmp_path, 3, rows=2048)]
    finally:
        node.close()
    assert destination.finish() == []
    assert answers == [StoreResponse(0x0000)] * 3
    assert node.reports == [1]


def test_a_c_store_rsp_with_a_data_set_attached_is_read_whole(tmp_path):
    """A destination that attaches a data set to its C-STORE-RSP (PS3.7 9.3.1.2 says
    none): the answer counts and the association stays up for the next instances (the
    data set used to reach pynetdicom without its command, which aborted the
    association after every first instance)."""
    attached = b"\x08\x00\x18\x00UI\x04\x001.2\x00"  # (0008,0018) explicit VR LE

    def script(peer: _Peer) -> None:
        for _ in range(3):
            context_id, fields, _ = peer.read_message()
            peer.answer_store(context_id, fields, status=0xB000, data_set=attached)
        peer.serve_stores()

    destination = _RawPeer(script)
    node = _Node(destination.port)
    try:
        answers = [node.send(ds, path) for ds, path in _files(tmp_path, 3, rows=16)]
        assert node.assoc.is_established
    finally:
        node.close()
    assert destination.finish() == []
    assert answers == [StoreResponse(0xB000)] * 3


def test_every_p_data_tf_fits_the_destinations_pdu_limit(tmp_path):
    """A destination accepting PDUs of at most 64 bytes gets the command set too in
    fragments that fit (PS3.8 D.1; the command set is ~160 bytes), byte for byte."""
    received: list[bytes] = []

    def script(peer: _Peer) -> None:
        for _ in range(2):
            context_id, fields, data = peer.read_message()
            received.append(data)
            peer.answer_store(context_id, fields)
        assert max(length for _, _, length in peer.pdvs) <= 64 - 6
        peer.serve_stores()

    destination = _RawPeer(script, max_pdu=64)
    node = _Node(destination.port)
    files = _files(tmp_path, 2, rows=8)
    try:
        answers = [node.send(ds, path) for ds, path in files]
    finally:
        node.close()
    assert destination.finish() == []
    assert answers == [StoreResponse(0x0000)] * 2
    assert received == [path.read_bytes()[data_set_offset(path) :] for _, path in files]


def test_an_answer_twice_is_not_taken_for_the_next_instance(tmp_path):
    """Each C-STORE answered twice (success, then 0xA700): the duplicate of one is
    not the answer to the next, which gets its own."""

    def script(peer: _Peer) -> None:
        for _ in range(3):
            context_id, fields, _ = peer.read_message()
            peer.answer_store(context_id, fields)
            peer.answer_store(context_id, fields, status=0xA700)
        peer.serve_stores()

    destination = _RawPeer(script)
    node = _Node(destination.port)
    try:
        answers = [node.send(ds, path) for ds, path in _files(tmp_path, 3, rows=16)]
    finally:
        node.close()
    assert destination.finish() == []
    assert answers == [StoreResponse(0x0000)] * 3


def test_an_answer_to_another_message_id_is_no_answer(tmp_path):
    """A C-STORE-RSP naming a message ID the node did not send answers nothing: the
    association is aborted at once (a protocol error, not a slow destination: no wait
    for the timeout) and the instance counts as not answered (retried)."""

    def script(peer: _Peer) -> None:
        context_id, fields, _ = peer.read_message()
        peer.answer_store(context_id, fields, message_id=999)
        with _quiet():
            assert peer.read_pdu()[0] == 0x07  # A-ABORT

    destination = _RawPeer(script)
    node = _Node(destination.port, timeout_s=30.0)
    try:
        ((ds, path),) = _files(tmp_path, 1, rows=16)
        started = time.monotonic()
        assert node.send(ds, path) is None
        assert time.monotonic() - started < 5.0  # not the 30 s timeout
        assert node.assoc.is_aborted
    finally:
        node.close()
    assert destination.finish() == []


def test_a_destination_reading_slowly_but_steadily_is_not_aborted(tmp_path):
    """An 8 MB data set taken at ~2.5 MB/s (about 3 s) with a 1.5 s timeout: every PDU
    goes out well within the timeout, so the store is answered; pynetdicom's network
    idle timer (network_timeout = the dispatcher's timeout_s) counted only PDUs received
    and aborted the association 1.5 s into the write, at every attempt."""

    def script(peer: _Peer) -> None:
        read = peer._exact

        def slowly(count: int) -> bytes:
            time.sleep(count / 2.5e6)
            return read(count)

        peer._exact = slowly  # type: ignore[method-assign]
        context_id, fields, _ = peer.read_message()
        peer.answer_store(context_id, fields)
        peer.serve_stores()

    destination = _RawPeer(script)
    node = _Node(destination.port, timeout_s=1.5)
    node.assoc.network_timeout = 1.5  # as the dispatcher sets it
    # A small send buffer: the write, not the kernel, waits for the destination.
    node.assoc.dul.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
    try:
        ((ds, path),) = _files(tmp_path, 1, rows=2048)
        started = time.monotonic()
        assert node.send(ds, path) == StoreResponse(0x0000)
        assert time.monotonic() - started > 2.0  # it did take longer than the timeout
        assert node.assoc.is_established
    finally:
        node.close()
    assert destination.finish() == []
