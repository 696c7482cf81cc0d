"""The DICOM listener's transport under pynetdicom: connection limits, TLS handshakes,
ARTIM and idle timeouts, and PDU lengths checked before a PDU is read.

What pynetdicom 3.0.4's own server (``AE.start_server``) does, measured with hostile
peers, and what this module does instead (``dicom_node.scp`` uses it for the plain and the
TLS port alike):

- Every TCP connection starts an association thread at once, and pynetdicom's
  association limit (``AE.maximum_associations``, default 10) counts those threads: ten
  connections that send nothing lock every sender out ("Local Limit Exceeded"). Here
  ``GuardedServer`` counts connections (``listener.max_connections``, negotiating ones
  included, the plain and the TLS port together) and closes one over that number at
  once; the association limit
  (``listener.max_associations``, ``AssociationSlots``) counts only requests the
  listener has decided to accept, and is answered with an A-ASSOCIATE-RJ by the
  listener's ``EVT_REQUESTED`` handler.
- The DUL thread reads a PDU with a blocking ``recv`` of the length the header declares,
  without a timeout: a peer that sends half an A-ASSOCIATE-RQ holds its connection (and
  slot) until it closes, and a header declaring 4 GiB makes the node buffer whatever
  follows, whatever Maximum Length was negotiated. Here ``PduReader`` takes over each
  connection's ``AssociationSocket.recv`` (the one place the DUL reads from: a 6-byte
  header, then the body): the A-ASSOCIATE-RQ must be complete ``listener.artim_timeout_s``
  after the connection opened (the ARTIM timer, PS3.8 9.1.5; pynetdicom's own ARTIM
  timer, set to the same value, closes connections that send nothing at all); later a
  read that waits ``listener.idle_timeout_s`` for the next bytes closes the connection;
  and a declared length above the limit is refused from the header alone: at most
  ``ASSOCIATE_RQ_MAX_BYTES`` for every PDU but P-DATA-TF, and at most the Maximum Length
  the node negotiated (``max_pdu_size``, PS3.8 D.1) for P-DATA-TF. The peer gets an
  A-ABORT (service provider, invalid-PDU-parameter-value, PS3.8 9.3.8) and the
  connection is closed; the DUL sees the transport close.
- With TLS, pynetdicom wraps accepted sockets in the accept loop, so one client that
  never completes its handshake stops the whole listener. Here the handshake runs in the
  connection's own thread, within ``listener.artim_timeout_s``, and a failure is logged
  with the peer and the reason in words (``dicom_node.tls.explain``).

- Both threads of an association poll: the DUL reader sleeps 1 ms whenever it found
  nothing to do, and the association's reactor sleeps 1 ms on every turn, so every
  request waits up to two sleeps before it is answered and each open association wakes
  ~2,000 times a second. Here ``Wakeups`` makes both wait for their work instead: the
  reader blocks in ``select`` on its socket and a wake-up pipe (written whenever another
  thread queues something for it to send), the reactor on an event set whenever
  something is queued for it (a DIMSE message, a release or abort indication); each
  still looks round every ``READER_WAIT_S`` / ``REACTOR_WAIT_S`` for its timers.

- pynetdicom reads each PDU with two ``recv`` calls (header, body), and selects the
  socket before each: ~18 system calls for a 512 KiB instance in 128 KiB PDUs, each one
  a hand-over of the interpreter lock among the connections of a process. Here
  ``PduReader`` reads up to ``_CHUNK_BYTES`` ahead once the association is requested
  (``ReadAhead``), and the reader skips ``select`` while a PDU is already here: ~5.
- pynetdicom then copies each PDU three times (into its buffer, to ``bytes``, into its
  PDU item objects), queues an event and turns its state machine, only to hand the
  fragments to the DIMSE provider (DT-2). Here, in Sta6 with the event queue empty, a
  P-DATA-TF within the negotiated length whose items fill it exactly goes to the DIMSE
  provider straight from the read-ahead buffer, one copy per fragment
  (``Wakeups._deliver_p_data``). Every other PDU, and a P-DATA-TF that is malformed or
  too long, takes pynetdicom's path unchanged, so its errors and aborts stay as they
  were. One difference: a command set the DIMSE provider cannot decode ends the
  association with an A-ABORT (pynetdicom's loop sends it for an error in its reader),
  where the same error in DT-2 ended the reader thread and the peer saw only the close.
  Not raised on that path: ``EVT_DATA_RECV``, ``EVT_PDU_RECV`` and
  ``EVT_FSM_TRANSITION``; it is only taken while no handler other than pynetdicom's
  standard PDU logging (which logs nothing for P-DATA-TF) is bound to them.

Memory per connection is thereby bounded by one PDU while it is read: at most
``ASSOCIATE_RQ_MAX_BYTES`` until an association is accepted, at most ``max_pdu_size``
plus ``_CHUNK_BYTES`` read ahead (plus the DICOM message being assembled from the PDUs,
as large as the instance a peer admitted by ``peers`` sends) after; the read-ahead
buffer is kept between PDUs up to ``_KEEP_BYTES`` (~0.5 MiB with 128 KiB PDUs, 2 MiB at
the default 1 MiB Maximum Length: at most 128 MiB for 64 idle associations, the default
``max_associations``). ``max_pdu_size: 0`` (unlimited) lifts the P-DATA bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.reactor_gate import ReactorGate
from dicom_node.tls import explain
from kernel.settings import ListenerSettings

log = logging.getLogger("dicom_node.listener")

# PS3.8 9.3.1: PDU types, and P-DATA-TF, the only one whose length the Maximum Length
# negotiation (PS3.8 D.1) bounds.
PDU_TYPES = frozenset(range(0x01, 0x08))
A_ASSOCIATE_RQ_TYPE, P_DATA_TF_TYPE = 0x01, 0x04
# Room for any A-ASSOCIATE-RQ a real peer sends: 128 presentation contexts (the most
# PS3.8 9.3.2.2 context IDs allow) of 20 transfer syntaxes with 64-character UIDs are
# about 190 KiB, user identity and extended negotiation items included.
ASSOCIATE_RQ_MAX_BYTES = 256 * 1024
# The DUL thread of every connection polls its socket and queues in a loop that sleeps
# 1 ms when idle: 30 connections that send nothing kept one CPU core 84 % busy (measured
# on the 2-core test machine). Until a connection's A-ASSOCIATE-RQ has arrived its DUL
# sleeps this long instead: the request is answered at most this much later, and 256
# silent connections cost a few percent of a core.
NEGOTIATING_POLL_S = 0.02
# How long a connection's reader waits for data or a wake-up before it looks round its
# loop (ARTIM timer, stop requests), and how long an association's reactor waits for a
# message or an indication before it checks its timers (idle timeout) and its reader.
READER_WAIT_S = 0.05
REACTOR_WAIT_S = 0.05
# How long a receiving process ahead of another in connections leaves a new one to it
# (``GuardedServer.get_request``).
BALANCE_DEFER_S = 0.003
# How far ahead of the bytes read so far a PDU's buffer grows (the first recv_into asks
# the kernel for up to this much; pynetdicom's own loop reads 4 KiB at a time). Growth
# doubles from there, so a 512 KiB instance is read with a handful of system calls.
_CHUNK_BYTES = 256 * 1024
# A connection keeps its read-ahead buffer between PDUs up to this size (a 128 KiB PDU
# with its read-ahead needs ~0.5 MiB, a 1 MiB PDU, the default max_pdu_size, ~2 MiB); a
# larger one is let go as soon as what is left in it fits this size.
_KEEP_BYTES = 2 * 1024 * 1024
# Queued by ``Wakeups._deliver_p_data`` for the DUL's loop, and skipped by its state
# machine: a turn that handled a PDU, as an event queued for it would say.
_DELIVERED = "delivered"
# A-ABORT: source 2 (service provider), reason 6 (invalid PDU parameter value).
_ABORT_SOURCE_PROVIDER, _ABORT_INVALID_PARAMETER = 0x02, 0x06
# A-ABORT PDU, source 2 (service provider), reason 0 (not specified) (PS3.8 9.3.8).
A_ABORT_PROVIDER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, _ABORT_SOURCE_PROVIDER, 0x00])
# At most one "connection limit reached" line per this many seconds (a flood is one line).
_REFUSAL_LOG_INTERVAL_S = 10.0


def _peer_of(assoc: Any) -> str:
    """``calling AE@address:port`` of an association, for the log."""
    try:
        calling = assoc.requestor.ae_title or "?"
        return f"{calling}@{assoc.requestor.address}:{assoc.requestor.port}"
    except AttributeError:
        return "?"


def _peer(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)


class SharedCounts:
    """Connections and associations open in each receiving process, in shared memory, so
    that ``listener.max_connections`` and ``max_associations`` hold for all the processes
    on the port together (``dicom_node.receivers``).

    ``counts`` is a ``multiprocessing`` array of 2 ints per process; process ``index``
    writes its own pair only and reads the others'. A process's numbers are at most a
    publish interval old, so the limits are approximate by what changed meanwhile.
    """

    def __init__(self, counts: Any, index: int) -> None:
        self.counts = counts
        self.index = index

    def publish(self, connections: int | None = None, associations: int | None = None) -> None:
        if connections is not None:
            self.counts[2 * self.index] = connections
        if associations is not None:
            self.counts[2 * self.index + 1] = associations

    def others(self) -> tuple[int, int]:
        """(connections, associations) open in the other processes."""
        values = list(self.counts)
        mine = 2 * self.index
        connections = sum(values[0::2]) - values[mine]
        associations = sum(values[1::2]) - values[mine + 1]
        return connections, associations


class AssociationSlots:
    """The ``listener.max_associations`` limit: a slot per association the listener
    decided to accept, taken in ``EVT_REQUESTED`` and given back when it closes (or, should
    pynetdicom end one without a close event, when its thread is found ended). With
    ``shared``, the other receiving processes' associations count too."""

    def __init__(self, limit: int, shared: SharedCounts | None = None) -> None:
        self.limit = limit
        self.shared = shared
        self._held: dict[int, Any] = {}  # id -> the Association (a thread)
        self._lock = threading.Lock()

    def _elsewhere(self) -> int:
        return self.shared.others()[1] if self.shared is not None else 0

    def take(self, assoc: Any) -> bool:
        """Take a slot for ``assoc``; False when all are taken."""
        with self._lock:
            if id(assoc) in self._held:
                return True
            if len(self._held) + self._elsewhere() >= self.limit:
                for key in [k for k, a in self._held.items() if not a.is_alive()]:
                    del self._held[key]
            if len(self._held) + self._elsewhere() >= self.limit:
                return False
            self._held[id(assoc)] = assoc
            self._publish()
            return True

    def give_back(self, assoc: Any) -> None:
        with self._lock:
            self._held.pop(id(assoc), None)
            self._publish()

    def _publish(self) -> None:
        if self.shared is not None:
            self.shared.publish(associations=len(self._held))

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._held)


def split_pdvs(body: memoryview | bytes) -> list[tuple[int, bytes]] | None:
    """The presentation data values of a P-DATA-TF PDU's body (the bytes after its 6-byte
    header) as pynetdicom's P-DATA primitive lists them: (presentation context ID, message
    control header + fragment), each a copy. None when the items do not fill the body
    exactly or one is shorter than its context ID and control header (PS3.8 9.3.5.1,
    Table 9-23: 4-byte item length, context ID, presentation data value).
    """
    pdvs: list[tuple[int, bytes]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        (item_length,) = struct.unpack_from(">L", body, offset)
        if item_length < 2 or item_length > end - offset - 4:
            return None
        pdvs.append((body[offset + 4], bytes(body[offset + 5 : offset + 4 + item_length])))
        offset += 4 + item_length
    return pdvs or None


class ReadAhead:
    """Bytes read from one connection and not yet handed to its DUL, in one buffer that
    the connection keeps (``PduReader``).

    ``room(size)`` is a view of ``size`` free bytes after the data (moving the data to
    the front, or into a larger buffer, when the end has no room), ``added(count)`` takes
    in what a read put there, ``take(n)`` hands out up to ``n`` bytes from the front as a
    view that stays valid until the buffer is written again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def room(self, size: int) -> memoryview:
        have = self._end - self._start
        need, capacity = have + size, len(self._buf)
        if capacity > _KEEP_BYTES and need <= _KEEP_BYTES:
            self._move_to(bytearray(need))  # a buffer grown for a huge PDU goes
        elif capacity - self._end < size:
            if need <= capacity:
                # Same length on both sides: allowed while a view handed out is alive.
                self._buf[0:have] = self._buf[self._start : self._end]
                self._start, self._end = 0, have
            else:
                # Double: a PDU arriving a segment at a time costs a few allocations,
                # not one (and a copy of all read so far) per segment; past
                # _KEEP_BYTES only for a PDU that needs it (``need`` does not shrink
                # while one PDU is read, so this never undoes the branch above).
                doubled = 2 * capacity if need > _KEEP_BYTES else min(2 * capacity, _KEEP_BYTES)
                self._move_to(bytearray(max(need, doubled)))
        with memoryview(self._buf) as whole:
            return whole[self._end : self._end + size]

    def _move_to(self, bigger_or_smaller: bytearray) -> None:
        have = self._end - self._start
        with memoryview(self._buf) as whole:
            bigger_or_smaller[0:have] = whole[self._start : self._end]
        self._buf = bigger_or_smaller
        self._start, self._end = 0, have

    def added(self, count: int) -> None:
        self._end += count

    def peek(self, n: int) -> memoryview:
        """Up to ``n`` bytes from the front, left here."""
        with memoryview(self._buf) as whole:
            return whole[self._start : self._start + min(n, self._end - self._start)]

    def take(self, n: int) -> memoryview:
        n = min(n, self._end - self._start)
        with memoryview(self._buf) as whole:
            view = whole[self._start : self._start + n]
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > _KEEP_BYTES:
                self._buf = bytearray()  # after a huge PDU (max_pdu_size: 0)
        return view


class PduReader:
    """Reads the PDUs of one connection for its DUL within the limits (module docstring).

    Installed as the connection's ``AssociationSocket.recv``; the DUL asks for a 6-byte
    header, then for the body the header declared. Nothing but the DUL thread calls it.
    """

    def __init__(self, assoc: Any, limits: ListenerSettings, max_pdu_bytes: int, peer: str):
        self.assoc = assoc
        self.limits = limits
        self.max_pdu_bytes = max_pdu_bytes
        self.peer = peer
        self.deadline = time.monotonic() + limits.artim_timeout_s
        self.requested = False  # the A-ASSOCIATE-RQ has been read
        self.refused: str | None = None
        self._body: tuple[int, int] | None = None  # (type, length) of the header just read
        self._timeout: float | None = None  # the socket timeout last set, on ``_timed``
        self._timed: Any = None
        self._ahead = ReadAhead()

    def install(self) -> None:
        self.assoc.dul.socket.recv = self.recv
        self.assoc.bind(evt.EVT_CONN_CLOSE, self._on_conn_close)
        # Until its request is read, the connection's DUL polls at NEGOTIATING_POLL_S
        # instead of pynetdicom's 1 ms (see the constant); then at pynetdicom's pace.
        self._poll_s = self.assoc.dul._run_loop_delay
        self.assoc.dul._run_loop_delay = NEGOTIATING_POLL_S

    def _on_conn_close(self, event: evt.Event) -> None:
        """The connection closed before its request arrived: end the association thread
        now. pynetdicom's acceptor thread waits for the request on the DUL's queue for
        the whole ARTIM time even when the connection is gone; an empty item is what it
        gets when that wait times out, so it stops the same way, at once. Without this a
        peer that connects and closes again keeps a thread (and a place under
        ``max_connections``) for ``artim_timeout_s``."""
        if not self.requested:
            self.assoc.dul.to_user_queue.put(None)

    def limit_for(self, pdu_type: int) -> int:
        """The largest length a PDU of ``pdu_type`` may declare now (0: no limit)."""
        if pdu_type == P_DATA_TF_TYPE and self.requested:
            return self.max_pdu_bytes
        return ASSOCIATE_RQ_MAX_BYTES

    def recv(self, nr_bytes: int) -> bytearray | memoryview:
        if self.refused is not None:
            return bytearray()
        body, self._body = self._body, None
        data = self._read(nr_bytes)
        if body is None:
            if len(data) == 6 and data[0] in PDU_TYPES:
                pdu_type, _, length = struct.unpack(">BBL", data)
                limit = self.limit_for(pdu_type)
                if limit and length > limit:
                    self._refuse(pdu_type, length, limit)
                else:
                    self._body = (pdu_type, length)
        elif body[0] == A_ASSOCIATE_RQ_TYPE and len(data) == body[1]:
            self.requested = True
            self.assoc.dul._run_loop_delay = self._poll_s
        return data

    def buffered(self) -> bool:
        """Whether bytes read ahead wait here (the socket may then have none to select)."""
        return len(self._ahead) > 0

    def _read(self, nr_bytes: int) -> bytearray | memoryview:
        """``nr_bytes`` of the connection, fewer when it closed, stalled or was refused.

        Bytes read ahead come first (``_fill``). A body comes back as a view of the
        buffer, valid until the next call (pynetdicom copies it at once); the 6-byte
        header as a copy.
        """
        self._fill(nr_bytes)
        if nr_bytes <= 6:
            return bytearray(self._ahead.take(nr_bytes))
        return self._ahead.take(nr_bytes)

    def _fill(self, nr_bytes: int) -> bool:
        """Read until ``nr_bytes`` are here; False when the connection closed, stalled
        (``_expired``) or has no socket first.

        Once the association is requested each system call asks for up to
        ``_CHUNK_BYTES`` more than is needed, so a PDU header and the next PDUs usually
        come with the body before them (a 512 KiB instance in 128 KiB PDUs: ~3 reads
        instead of 12, and no ``select`` for a PDU already here).
        """
        ahead = self._ahead
        while len(ahead) < nr_bytes:
            sock = self.assoc.dul.socket.socket
            if sock is None:
                return False
            timeout = (
                self.limits.idle_timeout_s if self.requested else self.deadline - time.monotonic()
            )
            have = len(ahead)
            # Memory follows the bytes that arrive: room for at most twice what is here
            # (a declared length alone allocates no more), and no read-ahead before the
            # request: a connection that sends nothing holds no buffer.
            wanted = min(nr_bytes - have, max(have, _CHUNK_BYTES))
            if self.requested:
                wanted += _CHUNK_BYTES
            try:
                if timeout <= 0:
                    raise TimeoutError
                if timeout != self._timeout or sock is not self._timed:
                    # A system call each time: only when it changes (the idle timeout
                    # stays the same once the association is up).
                    sock.settimeout(timeout)
                    self._timeout, self._timed = timeout, sock
                with ahead.room(wanted) as view:
                    count = sock.recv_into(view)
            except TimeoutError:
                self._expired(have, nr_bytes)
                return False
            except (OSError, ValueError):
                return False  # reset or closed: the DUL sees a short read (closed)
            if not count:
                return False
            ahead.added(count)
        return True

    def next_p_data(self, wait: bool) -> list[tuple[int, bytes]] | None:
        """The presentation data values of the next PDU when it is a P-DATA-TF within
        the negotiated length whose items fill it exactly (``split_pdvs``), the PDU
        consumed; None, and nothing consumed, for anything else (another PDU type, a
        length over the limit, malformed items, a closed or stalled connection), which
        pynetdicom's own reading then meets through ``recv`` as before.

        ``wait``: read the PDU's bytes as they come (within ``idle_timeout_s``);
        otherwise only a PDU wholly read ahead already is taken.
        """
        if self.refused is not None or not self.requested:
            return None
        ahead = self._ahead
        if len(ahead) < 6 and not (wait and self._fill(6)):
            return None
        pdu_type, _, length = struct.unpack(">BBL", ahead.peek(6))
        if pdu_type != P_DATA_TF_TYPE or (self.max_pdu_bytes and length > self.max_pdu_bytes):
            return None
        if len(ahead) < 6 + length and not (wait and self._fill(6 + length)):
            return None
        pdvs = split_pdvs(ahead.peek(6 + length)[6:])
        if pdvs is not None:
            ahead.take(6 + length)
        return pdvs

    def _expired(self, got: int, wanted: int) -> None:
        if self.requested:
            self.refused = (
                f"stalled {self.limits.idle_timeout_s:g} s in the middle of a PDU "
                f"({got} of {wanted} bytes read; listener.idle_timeout_s)"
            )
        else:
            self.refused = (
                f"no complete A-ASSOCIATE-RQ within {self.limits.artim_timeout_s:g} s of "
                "connecting (ARTIM timer, PS3.8 9.1.5; listener.artim_timeout_s)"
            )
        log.warning("closed the DICOM connection from %s: %s", self.peer, self.refused)
        self._close()

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        what = (
            "the Maximum Length negotiated (max_pdu_size)"
            if pdu_type == P_DATA_TF_TYPE and self.requested
            else "the limit for this PDU before an association is accepted"
            if not self.requested
            else "the limit for a PDU other than P-DATA-TF"
        )
        self.refused = (
            f"PDU type 0x{pdu_type:02X} declares {length} bytes, more than {limit} "
            f"({what}, PS3.8 9.3.1); refused before reading it"
        )
        log.warning(
            "aborted the DICOM connection from %s: %s; sent A-ABORT", self.peer, self.refused
        )
        abort = A_ABORT_RQ()
        abort.source = _ABORT_SOURCE_PROVIDER
        abort.reason_diagnostic = _ABORT_INVALID_PARAMETER
        sock = self.assoc.dul.socket.socket
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(1.0)
                sock.sendall(abort.encode())
        self._close()

    def _close(self) -> None:
        sock = self.assoc.dul.socket.socket
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(socket.SHUT_RDWR)


class _WakingQueue(queue.Queue):
    """A ``queue.Queue`` that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None], replaces: queue.Queue | None = None) -> None:
        super().__init__()
        self._wake = wake
        if replaces is not None:  # e.g. the transport connection event already queued
            self.queue.extend(replaces.queue)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class Wakeups:
    """Event-driven waiting for one connection's two threads (module docstring).

    ``install`` (before the association thread starts) replaces the queues the reader
    and the reactor poll with ones that wake their consumer, the reactor's checkpoint
    with a ``ReactorGate``, and the reader's transport check with one that first waits
    in ``select`` for the socket or the wake-up pipe. The pipe is closed when the reader
    thread ends; a wake-up after that is a no-op.
    """

    def __init__(self, assoc: Any, reader: PduReader | None = None) -> None:
        self.assoc = assoc
        self.reader = reader
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False
        self._reader: int | None = None  # thread ident of the connection's reader
        self.gate = ReactorGate(REACTOR_WAIT_S)

    def install(self) -> None:
        assoc, dul = self.assoc, self.assoc.dul
        dul.event_queue = _WakingQueue(self.wake_reader, dul.event_queue)
        dul.to_provider_queue = _WakingQueue(self.wake_reader, dul.to_provider_queue)
        dul.to_user_queue = _WakingQueue(self.gate.nudge, dul.to_user_queue)
        assoc.dimse.msg_queue = _WakingQueue(self.gate.nudge, assoc.dimse.msg_queue)
        assoc._reactor_checkpoint = self.gate
        check = dul._is_transport_event
        stop = dul.stop_dul

        def transport_event() -> bool:
            here = self.reader is not None and self.reader.buffered()
            if (here or self._wait_for_reader()) and dul.state_machine.current_state != "Sta13":
                # Readable, or read ahead already: read the PDU now (pynetdicom's own
                # check would only ask select again whether the socket is readable).
                if not self._deliver_p_data():
                    dul._read_pdu_data()
                return True
            return check()

        def stop_dul() -> bool:
            # pynetdicom sets the stop flag and waits for the reader to see it: let it
            # see it now rather than at the end of its wait.
            if dul.state_machine.current_state == "Sta1":
                dul._kill_thread = True
                self.wake_reader()
            return stop()

        def run() -> None:
            self._reader = threading.get_ident()
            try:
                type(dul).run(dul)
            except Exception:
                log.exception("the reader of the association from %s failed", _peer_of(assoc))
                self._send_abort()
            finally:
                self._end_unreported()
                self.close()

        dul._is_transport_event = transport_event
        dul.stop_dul = stop_dul
        dul.run = run
        do_action = dul.state_machine.do_action

        def do_action_unless_delivered(event: str) -> None:
            if event is not _DELIVERED:
                do_action(event)

        dul.state_machine.do_action = do_action_unless_delivered

    def _send_abort(self) -> None:
        """A-ABORT, source service provider, reason not specified (PS3.8 9.3.8), as
        pynetdicom's reader sends it for an error it catches; best effort."""
        sock = self.assoc.dul.socket.socket if self.assoc.dul.socket is not None else None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.sendall(A_ABORT_PROVIDER)

    def _end_unreported(self) -> None:
        """When the reader ends with the connection still open, the association failed:
        pynetdicom's reader caught an error (and sent an A-ABORT) or the reader thread
        raised. pynetdicom then neither closes the socket nor reports anything, so the
        listener would count the association as open and the series it stored as still
        arriving until the next association came. Close it and trigger EVT_ABORTED."""
        transport = self.assoc.dul.socket
        if transport is None or transport.socket is None:
            return  # closed the normal way (EVT_CONN_CLOSE, released or aborted)
        if self.assoc.dul.state_machine.current_state == "Sta1":
            # Also the normal way: the peer closed the connection after the release (or
            # at any time, AA-4): pynetdicom shuts the socket and kills the reader in
            # Sta1 without setting it to None. An error leaves the state it happened in.
            return
        if self.reader is None or self.reader.refused is None:
            # (When the listener refused the connection itself, it has said why.)
            log.warning(
                "association from %s ended on an error in its reader; closed and "
                "reported as aborted",
                _peer_of(self.assoc),
            )
        with contextlib.suppress(OSError, ValueError):
            transport.close()
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        evt.trigger(self.assoc, evt.EVT_ABORTED, {})

    def _deliver_p_data(self) -> bool:
        """Hand the next P-DATA-TF PDUs to the association's DIMSE provider directly, as
        pynetdicom's DT-2 action does in Sta6 (PS3.8 9.2.3: Sta6 + Evt10 stays Sta6), but
        without its PDU objects, event queue and state machine turn, and with one copy
        of each fragment instead of three. False, with nothing read, when the next PDU
        is anything else or something else comes first (module docstring)."""
        dul, reader = self.assoc.dul, self.reader
        if (
            reader is None
            or dul.state_machine.current_state != "Sta6"
            or dul.event_queue.queue
            or dul._recv_pdu.queue
            or not _plain_pdu_events(self.assoc)
        ):
            return False
        pdvs = reader.next_p_data(wait=True)
        if pdvs is None:
            return False
        while pdvs is not None:
            primitive = P_DATA()
            primitive.presentation_data_value_list.extend(pdvs)
            self.assoc.dimse.receive_primitive(primitive)
            if (
                dul.event_queue.queue
                or dul.to_provider_queue.queue
                or dul._kill_thread
                or dul.state_machine.current_state != "Sta6"
            ):
                break
            pdvs = reader.next_p_data(wait=False)  # more, only when wholly read ahead
        # pynetdicom's loop sleeps (1 ms; with 0 it still yields the CPU) after a turn
        # that queued no event: this one queues a no-op, so the next turn starts at once.
        dul.event_queue.put(_DELIVERED)
        return True

    def wake_reader(self) -> None:
        if threading.get_ident() == self._reader:
            # Queued by the reader itself (e.g. a C-STORE-RSP): it looks at its queues
            # before it waits again, and a byte in the pipe would only end that wait
            # early, for nothing, and cost pynetdicom's 1 ms idle sleep on top.
            return
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # full pipe: it is awake anyway
                    os.write(self._write_fd, b"\0")

    def _wait_for_reader(self) -> bool:
        """Wait until the socket is readable (True) or something else needs the reader
        (False: queued work, a wake-up, the wait ran out, no socket)."""
        dul = self.assoc.dul
        if dul.event_queue.queue or dul.to_provider_queue.queue or dul._kill_thread:
            return False  # work is waiting: no reason to sleep
        sock = dul.socket.socket if dul.socket is not None else None
        if sock is None:
            return False  # pynetdicom's loop sleeps its own delay while the socket is gone
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False  # decrypted bytes select cannot see: pynetdicom's check reads them
        try:
            ready, _, _ = select.select([sock, self._read_fd], [], [], READER_WAIT_S)
        except (OSError, ValueError):
            return False  # closed under us: pynetdicom's own check reports it
        if self._read_fd in ready:
            with contextlib.suppress(OSError):
                os.read(self._read_fd, 4096)
        return sock in ready and not dul.to_provider_queue.queue

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._read_fd)
            os.close(self._write_fd)


def _plain_pdu_events(assoc: Any) -> bool:
    """Whether nothing but pynetdicom's standard logging (which logs nothing for a
    P-DATA-TF) listens to the PDUs an association receives and to its state machine: the
    notifications ``Wakeups._deliver_p_data`` does not raise."""
    return (
        not assoc.get_handlers(evt.EVT_DATA_RECV)
        and not assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        and all(h is standard_pdu_recv_handler for h, _ in assoc.get_handlers(evt.EVT_PDU_RECV))
    )


class SharedContexts(list):
    """The listener's supported presentation contexts, shared by every association.

    pynetdicom's request handler deep-copies the server's contexts into each new
    association (``RequestHandler._create_association``): with every storage SOP class
    and 13 transfer syntaxes that is ~90 ms of CPU and ~0.5 MiB per connection, before a
    single byte was read, which is what a connection flood costs the node. Negotiation
    (``presentation.negotiate_as_acceptor``) only reads them and builds new result
    contexts, so one copy serves all: ``deepcopy`` returns the list itself.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a ``PduReader`` on every connection."""

    server: GuardedServer

    def handle(self) -> None:
        assoc = self._create_association()
        if self.server.dimse_factory is not None:
            assoc.dimse = self.server.dimse_factory(assoc)
        reader = PduReader(
            assoc, self.server.limits, self.server.max_pdu_bytes, _peer(self.client_address)
        )
        reader.install()
        Wakeups(assoc, reader).install()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        self.server.handed_over()  # from here on counted as a running association
        assoc.start()


class GuardedServer(ThreadedAssociationServer):
    """A pynetdicom association server with the limits of the module docstring.

    ``tls_context``: serve DICOM TLS with this context (handshake in the connection's
    thread); None: plain DICOM. ``name`` appears in log lines ("DICOM", "DICOM TLS").
    ``dimse_factory(assoc)``, when given, makes each association's DIMSE provider (e.g.
    ``dicom_node.store_path.StoreDIMSE``) before its threads start. ``inherited``: a
    listening socket the node process bound, shared by several receiving processes
    (``dicom_node.receivers``); ``shared``: their connection and association counts
    (``SharedCounts``), which the limits include.
    """

    daemon_threads = True
    # The kernel's queue of connections not yet accepted (socketserver's default is 5:
    # a burst of six connections had the seventh's SYN dropped and retried a second
    # later).
    request_queue_size = 128

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: ListenerSettings,
        max_pdu_bytes: int,
        tls_context: ssl.SSLContext | None = None,
        name: str = "DICOM",
        dimse_factory: Callable[[Any], Any] | None = None,
        shared: SharedCounts | None = None,
        inherited: socket.socket | None = None,
    ) -> None:
        self.limits = limits
        self.dimse_factory = dimse_factory
        self.shared = shared
        self.inherited = inherited
        self.max_pdu_bytes = max_pdu_bytes
        self.tls_context = tls_context or ssl_context
        self.name = name
        self._negotiating = 0  # accepted, association thread not started yet
        self._count_lock = threading.Lock()
        self._local = threading.local()
        self._refused_since_log = 0
        self._last_refusal_log = 0.0
        self.connections_refused = 0
        # pynetdicom's own wrapping (in the accept loop) stays off: see _handshake.
        super().__init__(
            ae,
            address,
            ae_title,
            SharedContexts(contexts),
            None,
            evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )

    def server_bind(self) -> None:
        if self.inherited is None:
            super().server_bind()
            return
        # One listening socket, bound by the node process, that every receiving process
        # accepts from: whichever is free first takes a connection (a busy one comes back
        # to accept later), the way pre-forking servers share their port. Non-blocking:
        # a process that loses the race to another gets EAGAIN instead of waiting.
        self.socket.close()
        self.socket = self.inherited
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited is None:
            super().server_activate()  # an inherited socket listens already

    def server_close(self) -> None:
        if self.inherited is None:
            super().server_close()
        else:
            # No shutdown(): it would stop the other processes' listening too.
            self.socket.close()

    def get_request(self) -> tuple[Any, Any]:
        """Accept the next connection; a receiving process that holds more connections
        than another first leaves it ``BALANCE_DEFER_S`` to that one (EAGAIN here if it
        took it), so a burst of associations spreads evenly over the processes instead
        of by which process woke first (seen: 5 and 3 of 8, the run then as slow as the
        process with 5)."""
        if self.shared is not None and self._ahead():
            time.sleep(BALANCE_DEFER_S)
        return super().get_request()

    def _ahead(self) -> bool:
        """Whether this process holds more connections than some other receiving
        process has published (a count published at that process's last accept: at
        worst too high, which only makes this process take the connection itself)."""
        assert self.shared is not None
        mine = self._own_connections()
        values = list(self.shared.counts)
        others = [c for i, c in enumerate(values[0::2]) if i != self.shared.index]
        return bool(others) and mine > min(others)

    def _own_connections(self) -> int:
        servers = [s for s in self.ae._servers if isinstance(s, GuardedServer)]
        if self not in servers:
            servers.append(self)
        negotiating = 0
        for server in servers:
            with server._count_lock:
                negotiating += server._negotiating
        return negotiating + sum(a.is_acceptor for a in self.ae.active_associations)

    def open_connections(self) -> int:
        """Connections open now on every port of this AE (plain and TLS together):
        negotiating ones and running association threads; with ``shared``, those of the
        other receiving processes too (and this process's number is published)."""
        mine = self._own_connections()
        if self.shared is None:
            return mine
        self.shared.publish(connections=mine)
        return mine + self.shared.others()[0]

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accept loop: refuse a connection over ``max_connections``, else hand it
        to its own thread."""
        if self.open_connections() >= self.limits.max_connections:
            self.connections_refused += 1
            self._log_refusal(client_address)
            self.shutdown_request(request)
            return
        with self._count_lock:
            self._negotiating += 1
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._count_lock:
                self._negotiating -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self._local.negotiating = True
        try:
            if self.tls_context is not None:
                request = self._handshake(request, client_address)
                if request is None:
                    return
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self.handed_over()

    def handed_over(self) -> None:
        """This thread's connection is no longer negotiating: it became an association
        (counted as a running thread from now on) or it is gone. Counted once."""
        if getattr(self._local, "negotiating", False):
            self._local.negotiating = False
            with self._count_lock:
                self._negotiating -= 1

    def _handshake(self, request: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.tls_context is not None
        request.settimeout(self.limits.artim_timeout_s)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            log.warning(
                "refused the DICOM TLS connection from %s: TLS handshake failed: %s",
                _peer(client_address),
                explain(exc),
            )
            self.shutdown_request(request)
            return None
        tls.settimeout(None)
        return tls

    def _log_refusal(self, client_address: Any) -> None:
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_refusal_log < _REFUSAL_LOG_INTERVAL_S:
            return
        log.warning(
            "%s listener: %d connections open (listener.max_connections); closed %d new "
            "connection(s) at once, latest from %s",
            self.name,
            self.limits.max_connections,
            self._refused_since_log,
            _peer(client_address),
        )
        self._refused_since_log = 0
        self._last_refusal_log = now


def start_server(
    ae: Any,
    address: tuple[str, int],
    evt_handlers: list[Any],
    limits: ListenerSettings,
    max_pdu_bytes: int,
    tls_context: ssl.SSLContext | None = None,
    dimse_factory: Callable[[Any], Any] | None = None,
    shared: SharedCounts | None = None,
    inherited: socket.socket | None = None,
) -> GuardedServer:
    """Listen on ``address`` in a background thread (as ``AE.start_server(block=False)``
    does, with ``GuardedServer``). Stop it with ``server.shutdown()``.
    ``dimse_factory``, ``shared``, ``inherited``: see ``GuardedServer``."""
    name = "DICOM TLS" if tls_context is not None else "DICOM"
    server = ae.make_server(
        address,
        evt_handlers=evt_handlers,
        server_class=GuardedServer,
        limits=limits,
        max_pdu_bytes=max_pdu_bytes,
        tls_context=tls_context,
        name=name,
        dimse_factory=dimse_factory,
        shared=shared,
        inherited=inherited,
    )
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"{name} listener", daemon=True
    )
    thread.start()
    # AssociationServer.shutdown() takes itself off this list, as for start_server's.
    ae._servers.append(server)
    return server
