"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class.

Handlers are small: access control at association time, then spool + record per
instance. Nothing is decoded beyond the header; the encoded bytes go straight to disk.

Contract (what a peer sees; pynetdicom's ``doc_handle_store`` is the model):

Connection (``dicom_node.listener``): plain DICOM on ``port`` and, with ``tls.enabled``,
DICOM TLS on ``tls.port`` (``tls.serve_plain: false``: TLS only). Before any association:

- a TLS handshake that fails (no client certificate when ``tls.client_certificate`` is
  ``required``, one ``tls.ca_bundle`` does not verify, an expired one, a plain DICOM
  client, no common version or cipher) closes the connection; the log names the peer's
  address and the problem in words;
- a connection over ``listener.max_connections`` is closed at once, nothing read;
- no complete TLS handshake, then no complete A-ASSOCIATE-RQ, within
  ``listener.artim_timeout_s`` each (ARTIM, PS3.8 9.1.5): the connection is closed;
- a PDU whose header declares more than 256 KiB before the association is accepted, or
  a P-DATA-TF longer than the negotiated ``max_pdu_size`` after: A-ABORT (source 2,
  reason 6, invalid PDU parameter value), unread; an association silent for
  ``listener.idle_timeout_s``: A-ABORT; one stalled that long inside a PDU: closed.

Association (PS3.8 7.1.1.9):

- accepted when the calling AE title and address match an entry of ``peers``
  (``require_called_ae`` also checks the called AE title), over TLS where the entry asks
  for it (``require_tls``) and with a verified client certificate whose subject has the
  entry's ``certificate_subject`` attributes where it names one;
- A-ASSOCIATE-RJ rejected-permanent / service-user / calling-AE-title-not-recognised
  (result 1, source 1, reason 3) for an unknown peer, and for a known one over plain
  DICOM or with another certificate subject than its entry admits (the log says which);
  pynetdicom itself answers the called-AE reason (7) when ``require_called_ae`` is on
  and the title is not ours;
- A-ASSOCIATE-RJ rejected-transient / service-provider (presentation) /
  local-limit-exceeded (result 2, source 3, reason 2) when ``listener.max_associations``
  associations are open: the sender may retry;
- the same A-ASSOCIATE-RJ, reason 3, when the calling AE title field is not an AE title
  at all: bytes outside ISO 646 (non-ASCII, e.g. a Korean title in EUC-KR or UTF-8),
  control characters, a backslash, or 16 spaces (PS3.8 9.3.2, PS3.5 6.2). ``*`` in
  ``peers`` means any AE title, not any 16 bytes. One exception: a ``peers`` entry that
  names a non-ASCII title itself (``ae_title: 병원CT``) admits, from its host, a field
  holding exactly that title in UTF-8, EUC-KR or Latin-1; the association is accepted
  and the series record that title. Reason 7 (called-AE-title-not-recognised) when the
  called AE title field is not an AE title, whatever ``require_called_ae`` says. The
  log line shows the field's bytes with ``repr``. Left to pynetdicom 3.0.4, such a
  request cannot be decoded and is answered with an A-ABORT; ``_screen_ae_titles`` is
  the hook that lets it reach this decision instead. The listener serves the next
  association as usual.

C-ECHO (PS3.4 A.2.2): ``0x0000`` Success, always.

C-STORE (PS3.4 B.2.3), answered only after the instance is durable on disk (served on
the connection's reader thread by ``dicom_node.store_path``):

- ``0x0000`` Success: written (fsync of file and folder) to
  ``spool/<study>/<series>/<sop>.dcm``; the spool file is the record of truth and its
  database row follows within one batch of the recorder (``records.RecordQueue``; a file
  whose row is lost in a crash is recorded by the start-up re-scan). A re-sent SOP
  instance replaces the earlier file and is recorded once. When the sender releases the
  association, the A-RELEASE-RP waits (up to ``RELEASE_FLUSH_S``) until every instance it
  stored is recorded, so a sender that sees "released" finds them all in the database;
- ``0xA700`` Refused: Out of Resources: free space below ``min_free_bytes`` or the disk
  is full, the file could not be written, the database cannot say whether a series new
  to the node belongs to another study, or more than ``MAX_RECORD_BACKLOG`` received
  instances wait to be recorded (the database is behind). Nothing the sender must
  change: retry later;
- ``0xC000`` Error: Cannot Understand: the dataset cannot be parsed, is truncated, lacks
  or has invalid Study / Series / SOP Instance / SOP Class UIDs, or its SOP Instance UID
  differs from the request's, or its Series Instance UID already belongs to another study
  (nothing is written; an event says so). A resend of the same bytes fails the same way.

Failures carry an Error Comment (0000,0902) saying why.

N-EVENT-REPORT (Storage Commitment Push Model, PS3.4 J.3.3): see
``dicom_node.commitment.event_report_handler``.

Every requested association leaves one INFO line when it ends (``AssociationFacts``:
peer address and port, AE titles, plain or TLS with the certificate subject, accepted
or rejected and why, released or aborted, instances stored, Study Instance UIDs; patient
names only with ``log_patient_names``).
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.status import Status

from db.models import utcnow
from db.session import Database
from dicom_node import audit, listener, tls
from dicom_node.assembler import AssociationTracker
from dicom_node.commitment import event_report_handler
from dicom_node.instance import CorruptDatasetError, parse_header
from dicom_node.records import Origin, Received, RecordQueue
from dicom_node.spool import Spool, SpoolFullError
from dicom_node.store_path import StoreAnswer, StoreDIMSE, StoreRequest, file_meta
from kernel.settings import NodeSettings
from kernel.uids import InvalidUIDError

log = logging.getLogger("dicom_node.scp")

# Everything the volume reader (SimpleITK/GDCM, pydicom + pylibjpeg) can decode.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# PS3.8 9.3.2 (Table 9-11): the fixed fields of an A-ASSOCIATE-RQ PDU, after the PDU type,
# a reserved byte, the PDU length (4), the protocol version (2) and two reserved bytes.
CALLED_AE_FIELD = slice(10, 26)
CALLING_AE_FIELD = slice(26, 42)
# What the screened request carries instead of a field that is no AE title, so that
# pynetdicom can decode the rest; the association is rejected before anything reads it.
_STAND_IN_AE_TITLE = b"INVALID AE TITLE"
# How a site may have typed a non-ASCII title its modality sends (tried in this order).
_TITLE_ENCODINGS = ("utf-8", "euc_kr", "latin-1")


def ae_title_problem(field: bytes) -> str | None:
    """Why the 16-byte AE title field of an A-ASSOCIATE-RQ is not an AE title, or None.

    PS3.8 9.3.2: 16 characters of ISO 646 (the basic G0 set: 0x20..0x7E), leading and
    trailing spaces not significant, 16 spaces not allowed; PS3.5 6.2 (AE): no backslash
    and no control characters.
    """
    problems = []
    if not field.strip(b" "):
        problems.append("is all spaces (no AE title; PS3.8 9.3.2 forbids 16 spaces)")
    if any(b > 0x7F for b in field):
        problems.append("has bytes outside ISO 646 / ASCII")
    if any(b < 0x20 or b == 0x7F for b in field):
        problems.append("has control characters")
    if b"\\" in field:
        problems.append("has a backslash")
    return ", ".join(problems) or None


# How long an A-RELEASE-RP waits for the association's instances to be recorded; after
# that it goes anyway (they are durable; completeness waits for their rows regardless).
RELEASE_FLUSH_S = 5.0
# Received instances waiting for the database beyond which new ones are refused (0xA700):
# the queue holds headers only (~2 KB each), so this bounds it to a few tens of MB.
MAX_RECORD_BACKLOG = 20_000

# Storage Service Class statuses (PS3.4 B.2.3) that pynetdicom's Status does not name:
# registered with its own mechanism rather than kept as local copies.
Status.add("OUT_OF_RESOURCES", 0xA700)
Status.add("CANNOT_UNDERSTAND", 0xC000)


@dataclass(frozen=True)
class AssociationFacts:
    """One association as the listener saw it, built when it closes (the log line; the
    audit trail records the same facts).

    ``transport`` is ``"plain"`` or ``"TLS"``; ``tls_subject`` the subject of the client
    certificate the node verified (RFC 4514, e.g. ``"CN=CT1, O=Hospital"``), None over
    plain DICOM or without one. ``outcome`` is ``"accepted"`` or ``"rejected: <why>"``;
    ``ended`` how it ended (``released``, ``aborted``, ``closed``). No patient data: UIDs
    of the studies only.
    """

    peer_address: str
    peer_port: int
    calling_ae: str
    called_ae: str
    transport: str
    tls_subject: str | None
    outcome: str
    ended: str
    instances_stored: int
    study_uids: tuple[str, ...]
    requested_at: datetime
    closed_at: datetime

    def describe(self) -> str:
        via = (
            "plain DICOM"
            if self.transport == "plain"
            else f"TLS ({self.tls_subject or 'no client certificate'})"
        )
        studies = f", studies {', '.join(self.study_uids)}" if self.study_uids else ""
        return (
            f"association from {self.calling_ae}@{self.peer_address}:{self.peer_port} to "
            f"{self.called_ae} over {via}: {self.outcome}, {self.ended} after "
            f"{(self.closed_at - self.requested_at).total_seconds():.1f} s, "
            f"{self.instances_stored} instances stored{studies}"
        )


@dataclass
class _OpenAssociation:
    """What the listener keeps of an association from its request until it closes."""

    assoc: Any
    requested_at: datetime
    calling_ae: str
    called_ae: str
    address: str
    port: int
    over_tls: bool
    subject: tuple[tuple[str, str], ...] | None
    key: Any = None  # the association's key in the completeness tracker
    rejected: str | None = None
    accepted: bool = False
    instances: int = 0
    studies: set[str] = field(default_factory=set)
    patients: set[str] = field(default_factory=set)

    def facts(self, calling_ae: str, ended: str) -> AssociationFacts:
        return AssociationFacts(
            peer_address=self.address,
            peer_port=self.port,
            calling_ae=calling_ae,
            called_ae=self.called_ae,
            transport="TLS" if self.over_tls else "plain",
            tls_subject=tls.format_subject(self.subject) if self.subject else None,
            outcome="accepted"
            if self.accepted
            else f"rejected: {self.rejected or 'by pynetdicom (e.g. called AE title)'}",
            ended=ended,
            instances_stored=self.instances,
            study_uids=tuple(sorted(self.studies)),
            requested_at=self.requested_at,
            closed_at=datetime.now(UTC),
        )


class StorageSCP:
    """Owns the pynetdicom AE; ``start()`` listens in background threads: plain DICOM on
    ``port`` and, with ``tls.enabled``, DICOM TLS on ``tls.port`` (either may be off),
    through ``dicom_node.listener`` (connection and association limits, timeouts, PDU
    lengths).

    ``on_stored(series_uid)`` is called after each stored instance (tests, benchmarks).
    ``on_closed(facts)`` after each association closes (tests; ``AssociationFacts``).
    ``recorder``: the ``RecordQueue`` received instances go to (the node's); without one
    the listener starts and stops its own.
    ``carrier`` names this listener's associations in the completeness tracker (several
    receiving processes feed one tracker). ``shared`` and ``sockets``: this is one of
    several receiving processes (``dicom_node.receivers``): it accepts from the listening
    sockets the node process bound (``"plain"``, ``"tls"``) and its limits count the other
    processes' connections and associations too.
    """

    def __init__(
        self,
        settings: NodeSettings,
        db: Database,
        spool: Spool,
        tracker: AssociationTracker,
        on_stored: Callable[[str], None] | None = None,
        on_closed: Callable[[AssociationFacts], None] | None = None,
        recorder: RecordQueue | None = None,
        carrier: str = "scp",
        shared: listener.SharedCounts | None = None,
        sockets: dict[str, socket.socket] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.tracker = tracker
        self.on_stored = on_stored
        self.on_closed = on_closed
        self._own_recorder = recorder is None
        self.recorder = recorder if recorder is not None else RecordQueue(db)
        self.carrier = carrier
        self.shared = shared
        self.sockets = sockets or {}
        self._keys = itertools.count(1)
        self._servers: dict[str, listener.GuardedServer] = {}  # "plain" / "tls" -> server
        self._lock = threading.Lock()
        # Per requested association (id of the pynetdicom Association): what it did.
        self._open: dict[int, _OpenAssociation] = {}
        # Per association whose request carried an AE title field that is no AE title:
        # field name ("calling", "called") -> (the 16 bytes, why).
        self._bad_ae_titles: dict[int, dict[str, tuple[bytes, str]]] = {}
        # Per association admitted with such a calling AE title: the peers entry's title.
        self._admitted_titles: dict[int, str] = {}
        self.associations_requested = 0
        limits = settings.listener
        self.slots = listener.AssociationSlots(limits.max_associations, shared)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu_size
        # pynetdicom's own limit counts connections still negotiating; the listener
        # bounds those itself (max_connections), so this one never decides.
        self.ae.maximum_associations = limits.max_connections + 1
        # ARTIM (pynetdicom's timer closes a connection that sends nothing) and idle time.
        self.ae.acse_timeout = limits.artim_timeout_s
        self.ae.network_timeout = limits.idle_timeout_s
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        # Storage commitment reports (N-EVENT-REPORT) from destinations: they open the
        # association and act as the SCP of the SOP class (role selection), or do not
        # negotiate roles at all.
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.ae.require_called_aet = settings.require_called_ae
        # Read the TLS files now, so that a node with unusable ones stops before it starts.
        self._tls_context = tls.server_context(settings.tls) if settings.tls.enabled else None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Listen; raises OSError when a port cannot be bound (nothing is left listening
        then). The constructor raises ``tls.TlsSetupError`` for unusable TLS files."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._screen_ae_titles),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACSE_RECV, self._on_acse_received),
            (evt.EVT_N_EVENT_REPORT, event_report_handler(self.db)),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        s = self.settings
        tls_context = self._tls_context
        if self._own_recorder:
            self.recorder.start()
        try:
            if s.tls.serve_plain or not s.tls.enabled:
                self._servers["plain"] = listener.start_server(
                    self.ae,
                    (s.bind_address, s.port),
                    handlers,
                    s.listener,
                    s.max_pdu_size,
                    dimse_factory=self._dimse,
                    shared=self.shared,
                    inherited=self.sockets.get("plain"),
                )
                log.info("listening as %s on %s:%d (DICOM)", s.ae_title, *self.address("plain"))
            if tls_context is not None:
                self._servers["tls"] = listener.start_server(
                    self.ae,
                    (s.bind_address, s.tls.port),
                    handlers,
                    s.listener,
                    s.max_pdu_size,
                    tls_context,
                    dimse_factory=self._dimse,
                    shared=self.shared,
                    inherited=self.sockets.get("tls"),
                )
                log.info(
                    "listening as %s on %s:%d (DICOM TLS %s+, client certificate %s)",
                    s.ae_title,
                    *self.address("tls"),
                    s.tls.min_version,
                    s.tls.client_certificate,
                )
        except OSError:
            self.stop()
            raise
        if self.shared is not None:
            threading.Thread(
                target=self._publish_counts, name="listener-counts", daemon=True
            ).start()

    def _publish_counts(self, interval_s: float = 0.5) -> None:
        """Keep this process's connection count fresh for the other receiving processes
        (it is also published on every new connection)."""
        while self._servers:
            server = next(iter(self._servers.values()), None)
            if server is not None:
                server.open_connections()
            time.sleep(interval_s)

    def stop(self) -> None:
        """Stop accepting; open associations are aborted (senders will retry). A
        listener's own recorder writes what it holds first."""
        for server in self._servers.values():
            server.shutdown()
        self._servers = {}
        if self._own_recorder:
            self.recorder.stop()

    def _dimse(self, assoc: Any) -> StoreDIMSE:
        """Each association's DIMSE provider: C-STORE on the fast path (``_store``)."""
        return StoreDIMSE(assoc, self._store)

    @property
    def port(self) -> int:
        """The plain DICOM port (the TLS port when only TLS is served)."""
        address = self.address()
        assert address is not None
        return address[1]

    @property
    def tls_port(self) -> int:
        address = self.address("tls")
        assert address is not None
        return address[1]

    def is_listening(self) -> bool:
        return bool(self._servers)

    def address(self, which: str | None = None) -> tuple[str, int] | None:
        """(host, port) the listener is bound to: ``which`` "plain" or "tls", default the
        plain one if served, else the TLS one; None when it is not listening."""
        servers = self._servers
        server = servers.get(which) if which else servers.get("plain") or servers.get("tls")
        if server is None:
            return None
        host, port = server.server_address[:2]
        return str(host), int(port)

    # -- handlers --------------------------------------------------------------------
    def _screen_ae_titles(self, event: evt.Event) -> None:
        """Let an A-ASSOCIATE-RQ whose AE title fields are not AE titles reach
        ``_on_requested``, which rejects it, instead of pynetdicom's A-ABORT.

        pynetdicom 3.0.4 decodes the AE title fields strictly (``pdu.A_ASSOCIATE_RQ``
        setters: ASCII only, ``_config.VALIDATORS["AE"]``, and 16 spaces raise); a PDU it
        cannot decode is event 19 of the state machine (PS3.8 9.2), answered with an
        A-ABORT. Its settings can widen neither: ``_config.CODECS`` would silently drop
        the non-ASCII bytes, and the 16-spaces check is not configurable. So, for each
        connection (EVT_CONN_OPEN runs before the DUL thread reads anything), the DUL's
        ``_decode_pdu`` is wrapped: such a field is noted with its bytes and replaced by
        a stand-in title, the request decodes, and ``_on_requested`` answers it with an
        A-ASSOCIATE-RJ. Every other PDU passes unchanged.
        """
        assoc = event.assoc
        dul = assoc.dul
        decode = dul._decode_pdu

        def screened(bytestream: bytearray) -> Any:
            if bytestream[:1] == b"\x01" and len(bytestream) >= CALLING_AE_FIELD.stop:
                bad = {}
                for name, where in (("calling", CALLING_AE_FIELD), ("called", CALLED_AE_FIELD)):
                    field = bytes(bytestream[where])
                    why = ae_title_problem(field)
                    if why is not None:
                        bad[name] = (field, why)
                        bytestream = bytearray(bytestream)
                        bytestream[where] = _STAND_IN_AE_TITLE
                if bad:
                    with self._lock:
                        self._bad_ae_titles[id(assoc)] = bad
            return decode(bytestream)

        dul._decode_pdu = screened

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        raw_socket = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        state = _OpenAssociation(
            assoc=assoc,
            requested_at=datetime.now(UTC),
            # The requestor's AE title is only filled in after negotiation: read the request.
            calling_ae=str(requestor.primitive.calling_ae_title).strip(),
            called_ae=str(requestor.primitive.called_ae_title).strip(),
            address=requestor.address,
            port=int(requestor.port),
            over_tls=isinstance(raw_socket, ssl.SSLSocket),
            subject=tls.peer_subject(raw_socket),
            key=(self.carrier, next(self._keys)),
        )
        with self._lock:
            self.associations_requested += 1
            bad_titles = self._bad_ae_titles.pop(id(assoc), None)
            self._open[id(assoc)] = state
        reaped = self._reap()
        for gone in reaped:
            self._release_series(gone)
            self._closed(gone, "closed")
        why = self._refusal(state, bad_titles)
        if why is not None:
            state.rejected = why
            # rejected-permanent, service-user, calling (3) or called (7) AE title not
            # recognised (PS3.8 Table 9-21)
            reason = 0x07 if bad_titles and "calling" not in bad_titles else 0x03
            assoc.acse.send_reject(0x01, 0x01, reason)
            # As pynetdicom does for its own rejections: let the DUL flush the
            # A-ASSOCIATE-RJ before the server closes the socket (else the peer sees an
            # abort).
            assoc.kill()
            return
        if not self.slots.take(assoc):
            state.rejected = f"{self.slots.limit} associations open (listener.max_associations)"
            log.warning(
                "rejected association from %s at %s: %s; the sender may retry",
                self._admitted_titles.get(id(assoc), state.calling_ae),
                state.address,
                state.rejected,
            )
            # rejected-transient, service-provider (presentation), local-limit-exceeded
            # (PS3.8 Table 9-21)
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            assoc.kill()

    def _refusal(
        self, state: _OpenAssociation, bad_titles: dict[str, tuple[bytes, str]] | None
    ) -> str | None:
        """Why ``peers`` does not admit this request (logged), or None when it does."""
        assoc = state.assoc
        if bad_titles:
            admitted = None
            if set(bad_titles) == {"calling"}:
                admitted = self._named_peer(bad_titles["calling"][0], state)
            if admitted is not None:
                log.info(
                    "association from %s: calling AE title field %r %s; accepted as the "
                    "peers entry %r",
                    state.address,
                    bad_titles["calling"][0],
                    bad_titles["calling"][1],
                    admitted,
                )
                with self._lock:
                    self._admitted_titles[id(assoc)] = admitted
                return None
            for name, (field_bytes, why) in bad_titles.items():
                log.warning(
                    "rejected association from %s: the %s AE title field %r %s",
                    state.address,
                    name,
                    field_bytes,
                    why,
                )
            return "AE title field is not an AE title"
        allowed = self.settings.peer_allowed(
            state.calling_ae, state.address, state.over_tls, state.subject
        )
        if allowed:
            return None
        near = [
            p
            for p in self.settings.peers
            if p.allows_title_and_address(state.calling_ae, state.address)
        ]
        if not near:
            why = "unknown peer (not in peers)"
        elif not state.over_tls:
            why = "its peers entry admits it over DICOM TLS only"
        else:
            wanted = "; ".join(p.certificate_subject or "" for p in near if p.certificate_subject)
            why = (
                f"client certificate subject {tls.format_subject(state.subject)!s} does "
                f"not match its peers entry ({wanted})"
            )
        log.warning(
            "rejected association from %s at %s over %s: %s",
            state.calling_ae,
            state.address,
            "DICOM TLS" if state.over_tls else "plain DICOM",
            why,
        )
        return why

    def _named_peer(self, field_bytes: bytes, state: _OpenAssociation) -> str | None:
        """The ``peers`` entry title (not ``*``) that ``field_bytes`` spells in one of
        ``_TITLE_ENCODINGS`` and that admits this association; None if there is none."""
        wanted = field_bytes.strip(b" ")
        for peer in self.settings.peers:
            if peer.ae_title == "*" or peer.ae_title.isascii():
                continue
            for encoding in _TITLE_ENCODINGS:
                try:
                    spelled = peer.ae_title.encode(encoding)
                except UnicodeEncodeError:
                    continue
                if spelled == wanted and peer.allows(
                    peer.ae_title, state.address, state.over_tls, state.subject
                ):
                    return peer.ae_title
        return None

    def _calling_ae(self, assoc: Any) -> str:
        """The peer's AE title as the node records it."""
        with self._lock:
            admitted = self._admitted_titles.get(id(assoc))
        return admitted if admitted is not None else assoc.requestor.ae_title.strip()

    def _on_echo(self, event: evt.Event) -> int:
        return Status.SUCCESS

    def _store(self, request: StoreRequest) -> StoreAnswer:
        """One C-STORE (reader thread of its connection): check, spool, queue its record.

        The header is read and checked first; only then is the file written, synced and
        given its final name (``Spool.write``), all in this thread."""
        assoc = request.assoc
        sop_uid = request.sop_instance_uid
        acceptor = assoc.acceptor
        meta = file_meta(
            request.sop_class_uid,
            sop_uid,
            request.transfer_syntax_uid,
            acceptor.implementation_class_uid,
            acceptor.implementation_version_name,
        )
        data = b"".join([meta, *request.data])
        backlog = self.recorder.backlog()
        if backlog > MAX_RECORD_BACKLOG:
            log.error(
                "out of resources, refused instance %s: %d received instances wait for the "
                "database",
                sop_uid,
                backlog,
            )
            return StoreAnswer(Status.OUT_OF_RESOURCES, "database behind; retry later")
        try:
            header = parse_header(
                data,
                expected_sop_uid=sop_uid,
                transfer_syntax_uid=request.transfer_syntax_uid,
                dataset_offset=len(meta),
            )
        except CorruptDatasetError as exc:
            log.warning("refused instance %s from %s: %s", sop_uid, self._calling_ae(assoc), exc)
            return StoreAnswer(Status.CANNOT_UNDERSTAND, str(exc))
        try:
            owner = self.recorder.claim_series(header.study_uid, header.series_uid)
        except Exception as exc:
            log.error("out of resources, refused instance %s: database: %s", sop_uid, exc)
            return StoreAnswer(Status.OUT_OF_RESOURCES, "database unavailable; retry later")
        if owner is not None:
            # Kept, it would be indexed into the other study's series at the next start.
            message = self.recorder.refuse_conflict(
                header.study_uid, header.series_uid, sop_uid, owner
            )
            log.warning("refused instance %s: %s", sop_uid, message)
            return StoreAnswer(Status.CANNOT_UNDERSTAND, "series UID belongs to another study")
        try:
            path = self.spool.write(header.study_uid, header.series_uid, header.sop_uid, data)
        except SpoolFullError as exc:
            log.error("out of resources, refused instance %s: %s", sop_uid, exc)
            return StoreAnswer(Status.OUT_OF_RESOURCES, "spool full")
        except InvalidUIDError as exc:
            log.warning("refused instance %s: %s", sop_uid, exc)
            return StoreAnswer(Status.CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            log.error("could not spool instance %s: %s", sop_uid, exc)
            return StoreAnswer(Status.OUT_OF_RESOURCES, "instance could not be written")
        with self._lock:
            state = self._open.get(id(assoc))
            if state is not None:
                state.instances += 1
                state.studies.add(header.study_uid)
                state.patients.add(header.patient_name or "")
        if state is not None:
            self.tracker.touch(state.key, header.series_uid, header.study_uid)
        origin = Origin(
            calling_ae=self._calling_ae(assoc),
            called_ae=acceptor.ae_title.strip(),
            address=assoc.requestor.address,
        )
        self.recorder.submit(Received(header, str(path), len(data), origin, utcnow()))
        if self.on_stored is not None:
            self.on_stored(header.series_uid)
        return StoreAnswer(Status.SUCCESS)

    def _on_acse_received(self, event: evt.Event) -> None:
        """An A-RELEASE-RQ is about to be answered: first let the recorder write what
        this listener received (``RELEASE_FLUSH_S`` at most)."""
        primitive = event.primitive
        releasing = isinstance(primitive, A_RELEASE) and primitive.result is None
        if releasing and not self.recorder.flush(RELEASE_FLUSH_S):
            log.warning(
                "association from %s released before its instances were recorded "
                "(the database is behind); they are durable and recorded later",
                self._calling_ae(event.assoc),
            )

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            state = self._open.get(id(event.assoc))
            if state is not None:
                state.accepted = True

    def _on_closed(self, event: evt.Event) -> None:
        """EVT_RELEASED, EVT_ABORTED or EVT_CONN_CLOSE, in either order: an accepted
        association is reported when it is released or aborted (pynetdicom triggers one
        of them), one that was not accepted when its connection closes."""
        assoc = event.assoc
        self.slots.give_back(assoc)
        ended = {evt.EVT_RELEASED: "released", evt.EVT_ABORTED: "aborted"}.get(event.event)
        with self._lock:
            state = self._open.get(id(assoc))
            if state is None:  # already reported
                self._bad_ae_titles.pop(id(assoc), None)
                return
            if ended is None and state.accepted:
                return  # the connection closed first; released or aborted follows
            del self._open[id(assoc)]
        self._release_series(state)
        self._closed(state, ended or "closed")

    def _release_series(self, state: _OpenAssociation) -> None:
        """The association no longer holds its series open, once the instances it
        stored are recorded (completeness must not run ahead of their rows)."""
        key = state.key
        self.recorder.after_recorded(lambda: self.tracker.release(key))

    def _closed(self, state: _OpenAssociation, ended: str) -> None:
        """Report one association that ended: the log line and ``on_closed``."""
        with self._lock:
            self._bad_ae_titles.pop(id(state.assoc), None)
            admitted = self._admitted_titles.pop(id(state.assoc), None)
        facts = state.facts(admitted or state.calling_ae, ended)
        who = (
            f" patients={sorted(state.patients)}"
            if self.settings.log_patient_names and state.patients
            else ""
        )
        log.info("%s%s", facts.describe(), who)
        audit.association(self.db, facts, self.settings.log_patient_names)
        if self.on_closed is not None:
            self.on_closed(facts)

    def _reap(self) -> list[_OpenAssociation]:
        """Associations whose thread ended without a close event pynetdicom reports
        (e.g. its DUL thread stopped): taken off the books here."""
        with self._lock:
            gone = [k for k, st in self._open.items() if not st.assoc.is_alive()]
            return [self._open.pop(k) for k in gone]
