"""C-STORE on the listener's fast path: each request is assembled, stored and answered in
the connection's own reader thread, without pynetdicom's message objects.

Why: pynetdicom 3.0.4 receives a C-STORE in three threads (the DUL reader decodes the
PDUs, the association's reactor polls a queue every 1 ms for the assembled message,
decodes the command set into a pydicom Dataset, builds the file meta with pydicom, runs
the handler, encodes the C-STORE-RSP through pydicom again, and the DUL, itself polling
every 1 ms, sends it). Measured on 2 cores, that costs ~3 ms of CPU and 1-3 ms of polling
latency per instance before the node does anything (bench/README.md, "per-instance
budget"), and 8 associations keep 16 threads waking 1,000 times a second each.

Here ``StoreDIMSE`` stands in for an association's ``DIMSEServiceProvider`` (pynetdicom
calls ``receive_primitive`` from the reader thread for every P-DATA it gets). A C-STORE-RQ
on an accepted presentation context is handled right there: the command set is read with
a small parser of its fixed elements (PS3.7 9.3.1.1, implicit VR little endian, group
0000), the data set fragments are collected and handed to ``on_store`` as one request,
and the C-STORE-RSP (PS3.7 9.3.1.2) is encoded here and queued to the same thread's
sender. Every other message (C-ECHO, N-EVENT-REPORT, C-CANCEL, anything unexpected, or a
C-STORE on a context that was not accepted) goes to pynetdicom's own provider unchanged,
fragment by fragment, so its handling and its errors stay as they were.

The peer sees the same protocol as before: one response per request (we never negotiate
asynchronous operations, so a peer has one request outstanding, PS3.7 D.3.3.3), the
statuses of ``dicom_node.scp``, an Error Comment (0000,0902) with a failure.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("dicom_node.store_path")

# PS3.7 E.1-1 / 9.3.1: command elements (group 0000), as (element << 16 | group) keys
# are awkward: the parser keys by the element number alone (the group is always 0000).
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_ORIGINATOR_AE_TITLE = 0x1030
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
NO_DATA_SET = 0x0101
# PS3.8 E.2: the message control header of a presentation data value.
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02
# pynetdicom's answer to an exception in a C-STORE handler ("unable to process").
PROCESSING_FAILURE = 0xC211
_ERROR_COMMENT_MAX = 64  # LO


class CommandSetError(ValueError):
    """A command set that is not implicit VR little endian group 0000 elements."""


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of an encoded command set: element number -> value bytes.

    Implicit VR little endian, group 0000 only (PS3.7 6.3.1). Raises ``CommandSetError``
    for anything else (another group, a length past the end).
    """
    out: dict[int, bytes] = {}
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise CommandSetError(f"{end - offset} bytes left after the last element")
        group, element, length = struct.unpack_from("<HHL", view, offset)
        offset += 8
        if group != 0x0000:
            raise CommandSetError(f"element ({group:04X},{element:04X}) outside group 0000")
        if length > end - offset:
            raise CommandSetError(f"element (0000,{element:04X}) runs past the end")
        out[element] = bytes(view[offset : offset + length])
        offset += length
    return out


def read_us(value: bytes | None) -> int | None:
    """A US command value (little endian), or None when absent or short."""
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def _ui(value: bytes | None) -> str:
    return value.decode("ascii", "replace").rstrip("\x00 ") if value else ""


def command_element(element: int, value: bytes) -> bytes:
    """One group 0000 element, implicit VR little endian, padded to even length."""
    if len(value) % 2:
        value += b"\x00"  # UI pads with NUL; LO / AE with a space are passed padded
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def encode_store_response(
    sop_class_uid: str,
    message_id: int,
    sop_instance_uid: str,
    status: int,
    error_comment: str | None = None,
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), implicit VR little endian."""
    body = [
        command_element(AFFECTED_SOP_CLASS_UID, sop_class_uid.encode("ascii")),
        command_element(COMMAND_FIELD, struct.pack("<H", C_STORE_RSP)),
        command_element(MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", message_id)),
        command_element(COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        command_element(STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        comment = error_comment.encode("ascii", "replace")[:_ERROR_COMMENT_MAX]
        if len(comment) % 2:
            comment += b" "
        body.append(command_element(ERROR_COMMENT, comment))
    body.append(command_element(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid.encode("ascii")))
    encoded = b"".join(body)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(encoded)) + encoded


_PREAMBLE = b"\x00" * 128 + b"DICM"
_LONG_LENGTH_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT")


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian (PS3.5 7.1.2)."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str | None,
) -> bytes:
    """The preamble, ``DICM`` and File Meta Information (PS3.10 7.1) of a received
    instance, to be followed by its data set as received: the same elements pynetdicom's
    ``Event.file_meta`` gives it."""
    body = [
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _explicit(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _explicit(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
        _explicit(0x0012, b"UI", implementation_class_uid.encode("ascii")),
    ]
    if implementation_version_name:
        body.append(_explicit(0x0013, b"SH", implementation_version_name.encode("ascii")))
    encoded = b"".join(body)
    return _PREAMBLE + _explicit(0x0000, b"UL", struct.pack("<L", len(encoded))) + encoded


@dataclass
class StoreRequest:
    """One C-STORE-RQ as received: the command's fields and the data set's bytes, encoded
    in ``transfer_syntax_uid`` (the presentation context's) exactly as the peer sent them.

    ``data`` is a list of fragments (bytes or memoryviews), joined by whoever writes them,
    so a 500 KB instance is not copied once more only to be written out.
    """

    assoc: Any
    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    priority: int
    data: list[Any]
    received_at: float  # time.monotonic() when the last fragment arrived

    @property
    def size_bytes(self) -> int:
        return sum(len(part) for part in self.data)


@dataclass(frozen=True)
class StoreAnswer:
    """What ``on_store`` answers: a Storage status (PS3.4 B.2.3) and, with a failure, the
    reason for the peer's log (Error Comment)."""

    status: int
    error_comment: str | None = None


StoreHandler = Callable[[StoreRequest], StoreAnswer]


class StoreDIMSE(DIMSEServiceProvider):
    """An association's DIMSE provider that serves C-STORE itself (module docstring).

    ``on_store`` runs in the connection's reader thread and must answer; an exception is
    logged and answered 0xC211 (as pynetdicom answers an exception in a handler).
    """

    def __init__(self, assoc: Any, on_store: StoreHandler) -> None:
        super().__init__(assoc)
        self.on_store = on_store
        self._pending: list[tuple[int, Any]] = []  # command PDVs of the message so far
        self._command = bytearray()
        self._store: StoreRequest | None = None  # a C-STORE-RQ whose data set is arriving
        self._passing = False  # the current message is pynetdicom's

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._fragment(context_id, data)

    def _pass(self, context_id: int, data: Any) -> None:
        """One fragment to pynetdicom's provider; it says when its message is complete
        (``self.message`` back to None)."""
        forwarded = P_DATA()
        forwarded.presentation_data_value_list.append([context_id, bytes(data)])
        super().receive_primitive(forwarded)
        self._passing = self.message is not None

    def _fragment(self, context_id: int, data: Any) -> None:
        if self._passing or not data:
            self._pass(context_id, data)
            return
        header = data[0]
        is_command, is_last = bool(header & _COMMAND_BIT), bool(header & _LAST_BIT)
        if self._store is not None:
            if is_command or context_id != self._store.context_id:
                # PS3.8 E.2: the fragments of one message are sent in order, on one
                # context; anything else is an invalid PDU (A-ABORT, as pynetdicom does).
                log.warning(
                    "C-STORE %s: data set interrupted by another message; aborting",
                    self._store.sop_instance_uid,
                )
                self._store = None
                self.dul.event_queue.put("Evt19")
                return
            self._store.data.append(memoryview(data)[1:])
            if is_last:
                request, self._store = self._store, None
                request.received_at = time.monotonic()
                self._answer(request)
            return
        if not is_command:  # a data set fragment that no command announced
            self._pass(context_id, data)
            return
        self._pending.append((context_id, data))
        self._command += memoryview(data)[1:]
        if not is_last:
            return
        command, self._command = bytes(self._command), bytearray()
        pending, self._pending = self._pending, []
        request = self._store_request(context_id, command)
        if request is not None:
            self._store = request
            return
        # Not a C-STORE we serve: pynetdicom gets the message from its first fragment.
        for pending_id, pending_data in pending:
            self._pass(pending_id, pending_data)

    def _store_request(self, context_id: int, command: bytes) -> StoreRequest | None:
        """The C-STORE-RQ this command set starts, or None when it is not one we serve."""
        try:
            fields = parse_command(command)
        except CommandSetError:
            return None
        if read_us(fields.get(COMMAND_FIELD)) != C_STORE_RQ:
            return None
        if read_us(fields.get(COMMAND_DATA_SET_TYPE)) in (None, NO_DATA_SET):
            return None
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or context.transfer_syntax is None:
            return None
        message_id = read_us(fields.get(MESSAGE_ID))
        if message_id is None:
            return None
        return StoreRequest(
            assoc=self.assoc,
            context_id=context_id,
            message_id=message_id,
            sop_class_uid=_ui(fields.get(AFFECTED_SOP_CLASS_UID)),
            sop_instance_uid=_ui(fields.get(AFFECTED_SOP_INSTANCE_UID)),
            transfer_syntax_uid=str(context.transfer_syntax[0]),
            priority=read_us(fields.get(PRIORITY)) or 0,
            data=[],
            received_at=0.0,
        )

    def _answer(self, request: StoreRequest) -> None:
        try:
            answer = self.on_store(request)
        except Exception:
            log.exception("C-STORE %s: the store handler failed", request.sop_instance_uid)
            answer = StoreAnswer(PROCESSING_FAILURE, "internal error while storing")
        finally:
            request.data = []
        if not self.assoc.is_established:
            return
        # An Error Comment belongs to failures (PS3.7 C.4.2.1.4), not to success or warnings.
        comment = answer.error_comment if answer.status >> 12 not in (0x0, 0xB) else None
        command = encode_store_response(
            request.sop_class_uid,
            request.message_id,
            request.sop_instance_uid,
            answer.status,
            comment,
        )
        # This is the reader thread, the one that sends every PDU of the association (the
        # DUL's state machine runs here): the P-DATA-TF goes out at once, as pynetdicom's
        # DT-1 would send it a turn of the loop later (PS3.8 9.3.5; Sta6 stays Sta6).
        item = struct.pack(">LBB", len(command) + 2, request.context_id, _COMMAND_BIT | _LAST_BIT)
        pdu = struct.pack(">BBL", 0x04, 0x00, len(item) + len(command)) + item + command
        self.dul.socket.send(pdu)
