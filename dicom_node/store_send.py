"""C-STORE of a stored file, written by the sender's own thread.

Why: pynetdicom 3.0.4's ``send_c_store`` builds the command set with pydicom, hands every
P-DATA-TF PDU (32 of them for a 0.5 MB instance to a PACS with 16 KiB PDUs, as Orthanc
has) from the caller to the connection's DUL thread through a queue and its state
machine, and the answer reaches the caller through two more threads that look for work
every millisecond. Measured on 2 cores (bench/README.md, "Send throughput"), that is
about 3 ms per instance more than DCMTK's ``storescu`` takes to send the same file to the
same PACS, which kept the node's forwarding at ~0.5x ``storescu``'s over one association.

Here the association (negotiation, release, abort, storage commitment and every other
message) stays pynetdicom's. Only a C-STORE of a file whose transfer syntax the
destination accepted as stored goes this way (``FileStore.store``):

- the C-STORE-RQ command set (PS3.7 9.3.1.1) is encoded here, implicit VR little endian
  with its group length (PS3.7 6.3.1);
- it is written to the association's socket in one P-DATA-TF PDU (more if the peer's
  limit is smaller), then the data set is read from the file in fragments that fill the
  PDU length the destination accepts
  (PS3.8 9.3.5 and E.2: one presentation data value per PDU, the control header saying
  command or data set and last fragment; the Maximum Length Received of PS3.8 D.1 bounds
  the PDU's variable field, so a fragment carries at most that minus 6 bytes);
- the C-STORE-RSP is taken from the connection's reader thread as soon as pynetdicom has
  read its PDU (``FileStore`` stands in front of the association's DIMSE provider) and its
  command set read with ``store_path.parse_command``; every other message goes on to
  pynetdicom as before.

The DUL writes PDUs of its own (an A-RELEASE-RQ, an A-ABORT, the answer to an
N-EVENT-REPORT) with the same lock the sender holds while it writes one message's
fragments, so nothing the DUL writes lands between them (a peer assembles a message
from its fragments in order, PS3.8 E.2); the command set is fragmented to the peer's
limit like the data set. The answer is
waited for at most ``timeout_s``; no answer (the association aborted, the connection
lost, the wait ran out) returns ``None``, which the dispatcher retries, and the
association is aborted when it is still up.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

from pynetdicom.pdu_primitives import P_DATA

from dicom_node.reactor_gate import ReactorGate
from dicom_node.store_path import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    ERROR_COMMENT,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    NO_DATA_SET,
    PRIORITY,
    STATUS,
    CommandSetError,
    command_element,
    parse_command,
    read_us,
)

log = logging.getLogger("dicom_node.store_send")

DATA_SET_PRESENT = 0x0001  # CommandDataSetType: anything but 0x0101 (PS3.7 E.1-1)
PRIORITY_MEDIUM = 0x0000
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02  # PS3.8 E.2 message control header
_P_DATA_TF = 0x04
# A destination with no PDU limit (Maximum Length Received 0, PS3.8 D.1) still gets the
# data set in pieces of this size, so a large object is never read into memory at once.
UNLIMITED_FRAGMENT_BYTES = 4 * 1024 * 1024
# How often a wait for an answer looks whether the association is still there.
_ALIVE_CHECK_S = 0.05
# How long the DUL's reader waits in ``select`` for the socket before it looks at its
# queues again (``FileStore.install``); a primitive queued meanwhile waits at most this.
_READER_WAIT_S = 0.02
# How long the association's reactor waits for work before it looks anyway (it also
# notices that the DUL ended); a release or abort queued for it wakes it at once.
_REACTOR_WAIT_S = 0.05


class NotStorable(ValueError):
    """The file cannot go this way (no File Meta Information, no data set offset)."""


@dataclass(frozen=True)
class StoreResponse:
    """A C-STORE-RSP as received: its Status (PS3.7 9.3.1.2) and Error Comment, if any."""

    status: int
    error_comment: str | None = None


def data_set_offset(path: str | os.PathLike[str]) -> int:
    """Where the data set starts in a DICOM file (PS3.10 7.1): after the 128-byte
    preamble, ``DICM`` and the File Meta Information group, whose length is the value of
    (0002,0000). Raises ``NotStorable`` for a file without them, ``OSError`` when it
    cannot be read."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise NotStorable(f"{os.fspath(path)}: no DICOM preamble and File Meta Information")
    group, element, vr, length = struct.unpack_from("<HH2sH", head, 132)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise NotStorable(f"{os.fspath(path)}: no File Meta Information Group Length")
    (group_length,) = struct.unpack_from("<L", head, 140)
    return 144 + group_length


def encode_store_request(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1), priority
    medium, implicit VR little endian with its Command Group Length (PS3.7 6.3.1)."""
    body = b"".join(
        (
            command_element(AFFECTED_SOP_CLASS_UID, sop_class_uid.encode("ascii")),
            command_element(COMMAND_FIELD, struct.pack("<H", C_STORE_RQ)),
            command_element(MESSAGE_ID, struct.pack("<H", message_id)),
            command_element(PRIORITY, struct.pack("<H", PRIORITY_MEDIUM)),
            command_element(COMMAND_DATA_SET_TYPE, struct.pack("<H", DATA_SET_PRESENT)),
            command_element(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid.encode("ascii")),
        )
    )
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def p_data_tf(context_id: int, control: int, data: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value (PS3.8 9.3.5, E.2)."""
    return (
        struct.pack(">BBLLBB", _P_DATA_TF, 0x00, len(data) + 6, len(data) + 2, context_id, control)
        + data
    )


class FileStore:
    """C-STORE of stored files over one established pynetdicom association (module
    docstring). ``install`` once, right after the association is established, then
    ``store`` per file from one thread."""

    def __init__(self, assoc: Any, timeout_s: float) -> None:
        self.assoc = assoc
        self.timeout_s = timeout_s
        self._write_lock = threading.Lock()
        self._answered = threading.Event()
        self._waiting_for: int | None = None  # message ID of the C-STORE on the wire
        self._answer: StoreResponse | None = None
        self._message_id = 0
        # Message IDs answered lately: a second answer to one of them is a duplicate to
        # drop; an answer to any other ID than the one on the wire is a protocol error.
        self._answered_ids: collections.deque[int] = collections.deque(maxlen=64)

    def install(self) -> None:
        """Put the lock on the DUL's writes, this object in front of the association's
        DIMSE provider, and let the DUL's reader wait in ``select`` for the socket
        instead of sleeping 1 ms between looks (an answer is read when it arrives)."""
        assoc, dul = self.assoc, self.assoc.dul
        keep_answers_for_the_caller(assoc)
        transport = dul.socket
        # pynetdicom leaves a connected socket blocking without a limit: a destination
        # that stops reading would hold the sender in sendall for ever. With a timeout,
        # a write (and a PDU the DUL has begun to read) that does not finish within
        # timeout_s raises, and the C-STORE counts as not answered.
        transport.socket.settimeout(self.timeout_s)
        send = transport.send

        def locked_send(bytestream: bytes) -> None:
            with self._write_lock:
                send(bytestream)

        transport.send = locked_send
        dimse = assoc.dimse
        passed_on = dimse.receive_primitive

        def receive_primitive(primitive: P_DATA) -> None:
            if not self._take(primitive):
                passed_on(primitive)

        dimse.receive_primitive = receive_primitive
        check = dul._is_transport_event

        def transport_event() -> bool:
            sock = transport.socket
            if sock is None:
                time.sleep(0.001)  # closed: the loop must not spin until it ends
            elif (
                not dul.event_queue.queue
                and not dul.to_provider_queue.queue
                and not dul._kill_thread
                and not (isinstance(sock, ssl.SSLSocket) and sock.pending())
            ):
                with contextlib.suppress(OSError, ValueError):
                    select.select([sock], [], [], _READER_WAIT_S)
            return check()

        dul._is_transport_event = transport_event
        dul._run_loop_delay = 0  # the select above is the loop's pause now
        # The association's reactor (it serves the peer's requests, sees a release or an
        # abort) looked every 1 ms; now it waits until one of those is queued for it.
        gate = ReactorGate(_REACTOR_WAIT_S)
        for waiting in (dul.to_user_queue, dimse.msg_queue):
            waiting.put = _nudging(waiting.put, gate.nudge)
        assoc._reactor_checkpoint = gate

    def next_message_id(self) -> int:
        """1..65535, then round again (PS3.7 9.1.1.1: unique among outstanding ones)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def store(
        self,
        path: str | os.PathLike[str],
        offset: int,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> StoreResponse | None:
        """C-STORE the data set of ``path`` (from byte ``offset`` to the end, sent as
        stored: the context's transfer syntax must be the file's) on presentation
        context ``context_id``. Returns the answer, or None when none came: the
        association is aborted, lost, or did not answer within ``timeout_s`` (then it is
        aborted here). Raises ``OSError`` when the file cannot be read (nothing was
        written then: the file is opened first)."""
        message_id = self.next_message_id()
        command = encode_store_request(sop_class_uid, sop_instance_uid, message_id)
        with open(path, "rb") as fh:
            fh.seek(offset)
            self._answered.clear()
            self._answer = None
            self._waiting_for = message_id
            try:
                # The whole message under the lock: a PDU the DUL writes meanwhile (the
                # answer to an N-EVENT-REPORT) must not land inside this message's
                # fragments, which a peer assembles in order (PS3.8 E.2).
                with self._write_lock:
                    self._write_fragments(io.BytesIO(command), context_id, _COMMAND_BIT)
                    self._write_fragments(fh, context_id, 0x00)
            except OSError as exc:
                self._waiting_for = None
                log.warning(
                    "C-STORE %s: writing to the destination failed: %s", sop_instance_uid, exc
                )
                self._abort()
                return None
        return self._wait(message_id, sop_instance_uid)

    def _write_fragments(self, fh: BinaryIO, context_id: int, kind: int) -> None:
        """Write what ``fh`` holds from where it stands as P-DATA-TF PDUs of the command
        (``kind`` ``_COMMAND_BIT``) or the data set (0): fragments that fill the PDU
        length the destination accepts, also for a command set (PS3.8 D.1 bounds every
        P-DATA-TF), the last one flagged. The caller holds ``_write_lock``."""
        max_length = int(self.assoc.acceptor.maximum_length or 0)
        fragment = max_length - 6 if max_length > 6 else UNLIMITED_FRAGMENT_BYTES
        data = fh.read(fragment)
        while True:
            following = fh.read(fragment) if len(data) == fragment else b""
            control = kind if following else kind | _LAST_BIT
            self._write(p_data_tf(context_id, control, data))
            if not following:
                return
            data = following

    def _write(self, pdu: bytes) -> None:
        if not self.assoc.is_established:
            raise ConnectionError("the association is no longer established")
        sock = self.assoc.dul.socket.socket
        if sock is None:  # closed by the DUL between the check and here
            raise ConnectionError("the connection is closed")
        sock.sendall(pdu)
        # Data going out is activity too: pynetdicom's network idle timer (network_timeout,
        # which the dispatcher sets to timeout_s) counts only PDUs received, and its
        # reactor aborted a destination that reads a large data set steadily but takes
        # longer than that to take it all; a stalled write ends by the socket timeout.
        self.assoc.dul._idle_timer.restart()

    def _wait(self, message_id: int, sop_instance_uid: str) -> StoreResponse | None:
        deadline = time.monotonic() + self.timeout_s
        # A duplicate queued while answers came fast (the queue is looked at only while
        # one is late) is dropped now, while its message is still among the recent ones:
        # found 64 messages later, it would read as an answer to a message never sent.
        self._drop_duplicates()
        try:
            while not self._answered.wait(_ALIVE_CHECK_S):
                try:
                    answer = self._answer_from_pynetdicom(message_id)
                except _ForeignAnswerError as exc:
                    log.warning(
                        "C-STORE %s: the destination answered message ID %d, which the node "
                        "did not send (it waits for %d; PS3.7 9.3.1.2); aborting the "
                        "association, the instance counts as not answered",
                        sop_instance_uid, exc.message_id, message_id,
                    )  # fmt: skip
                    self._abort()
                    return None
                if answer is not None:
                    self._answered_ids.append(message_id)
                    return answer
                if not self.assoc.is_established:
                    return None  # aborted or lost: pynetdicom has closed it
                if time.monotonic() >= deadline:
                    log.warning(
                        "C-STORE %s: no answer within %.0f s; aborting the association",
                        sop_instance_uid, self.timeout_s,
                    )  # fmt: skip
                    self._abort()
                    return None
            self._answered_ids.append(message_id)
            return self._answer
        finally:
            self._waiting_for = None

    def _drop_duplicates(self) -> None:
        """Drop the answers at the head of pynetdicom's queue to messages answered lately."""
        while True:
            _, msg = self.assoc.dimse.peek_msg()
            answered = getattr(msg, "MessageIDBeingRespondedTo", None)
            if answered is None or answered not in self._answered_ids:
                return
            log.info("dropped a second answer to message ID %d", answered)
            try:
                self.assoc.dimse.msg_queue.get_nowait()
            except queue.Empty:
                return

    def _answer_from_pynetdicom(self, message_id: int) -> StoreResponse | None:
        """An answer pynetdicom assembled itself (a command set the destination split
        over several PDUs, which ``_take`` leaves to it, and any answer ``_take`` did not
        match). A second answer to a message answered lately is dropped; raises
        ``_ForeignAnswerError`` for an answer to any other message ID."""
        self._drop_duplicates()
        _, msg = self.assoc.dimse.peek_msg()
        answered = getattr(msg, "MessageIDBeingRespondedTo", None)
        if msg is None or answered is None:  # nothing, or a request: the reactor's
            return None
        if answered != message_id:
            raise _ForeignAnswerError(int(answered))
        with contextlib.suppress(queue.Empty):  # not get_msg: it leaves answers queued
            self.assoc.dimse.msg_queue.get_nowait()
        status = getattr(msg, "Status", None)
        if status is None:
            return None
        return StoreResponse(int(status), getattr(msg, "ErrorComment", None))

    def _take(self, primitive: P_DATA) -> bool:
        """In the reader thread: is this P-DATA the whole answer to the C-STORE on the
        wire? Then keep it and wake the sender (True); else it is pynetdicom's (False)."""
        message_id = self._waiting_for
        values = primitive.presentation_data_value_list
        if message_id is None or len(values) != 1:
            return False
        if self._answered.is_set():
            # Answered already: a second answer (read before the sender took the first)
            # must not replace it; pynetdicom queues it and ``_wait`` drops it.
            return False
        if self.assoc.dimse.message is not None:
            return False  # pynetdicom holds the first fragments of a message: the rest too
        _, data = values[0]
        if not data or data[0] & (_COMMAND_BIT | _LAST_BIT) != (_COMMAND_BIT | _LAST_BIT):
            return False
        try:
            fields = parse_command(bytes(memoryview(data)[1:]))
        except CommandSetError:
            return False
        if read_us(fields.get(COMMAND_FIELD)) != C_STORE_RSP:
            return False
        if read_us(fields.get(MESSAGE_ID_BEING_RESPONDED_TO)) != message_id:
            return False
        if read_us(fields.get(COMMAND_DATA_SET_TYPE)) != NO_DATA_SET:
            # A data set follows (not allowed, PS3.7 9.3.1.2, yet sent by some): the whole
            # message is pynetdicom's to assemble, and the waiting sender takes it from
            # there; taken here, its data set would reach pynetdicom without a command.
            return False
        status = read_us(fields.get(STATUS))
        if status is None:
            return False
        comment = fields.get(ERROR_COMMENT)
        self._answer = StoreResponse(
            status, comment.decode("ascii", "replace").strip("\x00 ") if comment else None
        )
        self._answered.set()
        return True

    def _abort(self) -> None:
        if self.assoc.is_established:
            with contextlib.suppress(Exception):
                self.assoc.abort()


class _ForeignAnswerError(Exception):
    """A response to a Message ID the node has not sent (or not lately)."""

    def __init__(self, message_id: int) -> None:
        super().__init__(message_id)
        self.message_id = message_id


def _nudging(put: Any, nudge: Any) -> Any:
    def put_and_nudge(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        nudge()

    return put_and_nudge


def keep_answers_for_the_caller(assoc: Any) -> None:
    """Keep DIMSE responses for the ``send_*`` call that waits for them.

    pynetdicom's association reactor looks for incoming requests with a non-blocking
    ``get_msg`` between pauses; a ``send_c_store`` that pauses it can slip through the
    moment between the reactor passing its checkpoint and taking a message, and the
    reactor then takes the C-STORE-RSP, drops it as "unexpected" and the sender waits
    ``dispatch.timeout_s`` for nothing (and aborts the association). Seen about once in
    fifteen 300-instance runs once answers came within a millisecond. Here the reactor
    only ever takes requests; responses stay queued for the blocking caller."""
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            _, msg = dimse.peek_msg()
            if msg is not None and getattr(msg, "MessageIDBeingRespondedTo", None) is not None:
                return None, None
        return take(block)

    dimse.get_msg = get_msg
