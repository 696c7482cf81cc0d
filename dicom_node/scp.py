"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class.

Handlers are small: access control at association time, then spool + record per
instance. Nothing is decoded beyond the header; the encoded bytes go straight to disk.

Contract (what a peer sees; pynetdicom's ``doc_handle_store`` is the model):

Association (PS3.8 7.1.1.9):

- accepted when the calling AE title and address match an entry of ``peers``
  (``require_called_ae`` also checks the called AE title);
- A-ASSOCIATE-RJ rejected-permanent / service-user / calling-AE-title-not-recognised
  (result 1, source 1, reason 3) for an unknown peer; pynetdicom itself answers the
  called-AE reason (7) when ``require_called_ae`` is on and the title is not ours;
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

C-STORE (PS3.4 B.2.3), answered only after the instance is durable on disk:

- ``0x0000`` Success: written (fsync of file and folder) to
  ``spool/<study>/<series>/<sop>.dcm`` and recorded; a re-sent SOP instance replaces the
  earlier file and is recorded once;
- ``0xA700`` Refused: Out of Resources: free space below ``min_free_bytes`` or the disk
  is full, the file could not be written, or the database could not record it (the file
  stays; the start-up re-scan indexes it). Nothing the sender must change: retry later;
- ``0xC000`` Error: Cannot Understand: the dataset cannot be parsed, is truncated, lacks
  or has invalid Study / Series / SOP Instance / SOP Class UIDs, or its SOP Instance UID
  differs from the request's, or its Series Instance UID already belongs to another study
  (the file is removed; an event says so). A resend of the same bytes fails the same way.

N-EVENT-REPORT (Storage Commitment Push Model, PS3.4 J.3.3): see
``dicom_node.commitment.event_report_handler``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
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
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from db.session import Database
from dicom_node.assembler import AssociationTracker
from dicom_node.commitment import event_report_handler
from dicom_node.instance import CorruptDatasetError, parse_header
from dicom_node.records import InstanceRecorder, Origin, SeriesConflictError
from dicom_node.spool import Spool, SpoolFullError
from kernel.settings import NodeSettings

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


# Storage Service Class statuses (PS3.4 B.2.3) that pynetdicom's Status does not name:
# registered with its own mechanism rather than kept as local copies.
Status.add("OUT_OF_RESOURCES", 0xA700)
Status.add("CANNOT_UNDERSTAND", 0xC000)


class StorageSCP:
    """Owns the pynetdicom AE; ``start()`` listens in background threads.

    ``on_stored(series_uid)`` is called after each stored instance (tests, benchmarks).
    """

    def __init__(
        self,
        settings: NodeSettings,
        db: Database,
        spool: Spool,
        tracker: AssociationTracker,
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.tracker = tracker
        self.on_stored = on_stored
        self.recorder = InstanceRecorder(db)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        # Per open association: instances stored, studies seen, patient names seen.
        self._received: dict[int, tuple[int, set[str], set[str]]] = {}
        # Per association whose request carried an AE title field that is no AE title:
        # field name ("calling", "called") -> (the 16 bytes, why).
        self._bad_ae_titles: dict[int, dict[str, tuple[bytes, str]]] = {}
        # Per association admitted with such a calling AE title: the peers entry's title.
        self._admitted_titles: dict[int, str] = {}
        self.associations_requested = 0
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu_size
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        # Storage commitment reports (N-EVENT-REPORT) from destinations: they open the
        # association and act as the SCP of the SOP class (role selection), or do not
        # negotiate roles at all.
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.ae.require_called_aet = settings.require_called_ae

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._screen_ae_titles),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, event_report_handler(self.db)),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        address = (self.settings.bind_address, self.settings.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.settings.ae_title, *address)

    def stop(self) -> None:
        """Stop accepting; open associations are aborted (senders will retry)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def is_listening(self) -> bool:
        return self._server is not None

    def address(self) -> tuple[str, int] | None:
        """(host, port) the listener is bound to; None when it is not listening."""
        server = self._server
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
        with self._lock:
            self.associations_requested += 1
            bad_titles = self._bad_ae_titles.pop(id(event.assoc), None)
        requestor = event.assoc.requestor
        if bad_titles:
            admitted = None
            if set(bad_titles) == {"calling"}:
                admitted = self._named_peer(bad_titles["calling"][0], requestor.address)
            if admitted is not None:
                log.info(
                    "association from %s: calling AE title field %r %s; accepted as the "
                    "peers entry %r",
                    requestor.address,
                    bad_titles["calling"][0],
                    bad_titles["calling"][1],
                    admitted,
                )
                with self._lock:
                    self._admitted_titles[id(event.assoc)] = admitted
                return
            for name, (field, why) in bad_titles.items():
                log.warning(
                    "rejected association from %s: the %s AE title field %r %s",
                    requestor.address,
                    name,
                    field,
                    why,
                )
            # rejected-permanent, service-user, calling (3) or called (7) AE title not
            # recognised (PS3.8 Table 9-21)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03 if "calling" in bad_titles else 0x07)
            event.assoc.kill()
            return
        # The requestor's AE title is only filled in after negotiation: read the request.
        calling_ae = str(requestor.primitive.calling_ae_title).strip()
        address = requestor.address
        if not self.settings.peer_allowed(calling_ae, address):
            log.warning(
                "rejected association from unknown peer %s at %s (not in peers)",
                calling_ae,
                address,
            )
            # rejected-permanent, service-user, calling AE title not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            # As pynetdicom does for its own rejections: let the DUL flush the A-ASSOCIATE-RJ
            # before the server closes the socket (else the peer sees an abort).
            event.assoc.kill()

    def _named_peer(self, field: bytes, address: str) -> str | None:
        """The ``peers`` entry title (not ``*``) that ``field`` spells in one of
        ``_TITLE_ENCODINGS`` and that allows ``address``; None if there is none."""
        wanted = field.strip(b" ")
        for peer in self.settings.peers:
            if peer.ae_title == "*" or peer.ae_title.isascii():
                continue
            for encoding in _TITLE_ENCODINGS:
                try:
                    spelled = peer.ae_title.encode(encoding)
                except UnicodeEncodeError:
                    continue
                if spelled == wanted and peer.allows(peer.ae_title, address):
                    return peer.ae_title
        return None

    def _calling_ae(self, assoc: Any) -> str:
        """The peer's AE title as the node records it."""
        with self._lock:
            admitted = self._admitted_titles.get(id(assoc))
        return admitted if admitted is not None else assoc.requestor.ae_title.strip()

    def _on_echo(self, event: evt.Event) -> int:
        return Status.SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        assoc = event.assoc
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        try:
            data = event.encoded_dataset()
            header = parse_header(data, expected_sop_uid=sop_uid)
        except CorruptDatasetError as exc:
            log.warning("refused instance %s from %s: %s", sop_uid, self._calling_ae(assoc), exc)
            return Status.CANNOT_UNDERSTAND
        try:
            path = self.spool.write(header.study_uid, header.series_uid, header.sop_uid, data)
        except SpoolFullError as exc:
            log.error("out of resources, refused instance %s: %s", sop_uid, exc)
            return Status.OUT_OF_RESOURCES
        except OSError as exc:
            log.error("could not spool instance %s: %s", sop_uid, exc)
            return Status.OUT_OF_RESOURCES
        self.tracker.touch(id(assoc), header.series_uid)
        with self._lock:
            count, studies, patients = self._received.get(id(assoc), (0, set(), set()))
            studies.add(header.study_uid)
            patients.add(header.patient_name or "")
            self._received[id(assoc)] = (count + 1, studies, patients)
        origin = Origin(
            calling_ae=self._calling_ae(assoc),
            called_ae=assoc.acceptor.ae_title.strip(),
            address=assoc.requestor.address,
        )
        try:
            self.recorder.record(header, str(path), len(data), origin)
        except SeriesConflictError as exc:
            # Kept, it would be indexed into the other study's series at the next start.
            path.unlink(missing_ok=True)
            log.warning("refused instance %s: %s", sop_uid, exc)
            return Status.CANNOT_UNDERSTAND
        except Exception:
            # The file is durable; the start-up spool re-scan will index it. Tell the
            # sender to try again so nothing depends on that alone.
            log.exception("could not record instance %s in the database", sop_uid)
            return Status.OUT_OF_RESOURCES
        if self.on_stored is not None:
            self.on_stored(header.series_uid)
        return Status.SUCCESS

    def _on_closed(self, event: evt.Event) -> None:
        self.tracker.release(id(event.assoc))
        with self._lock:
            received = self._received.pop(id(event.assoc), None)
            self._bad_ae_titles.pop(id(event.assoc), None)
            admitted = self._admitted_titles.pop(id(event.assoc), None)
        if received is not None:
            count, studies, patients = received
            who = f" patients={sorted(patients)}" if self.settings.log_patient_names else ""
            log.info(
                "association from %s@%s closed: %d instances, studies %s%s",
                admitted or event.assoc.requestor.ae_title.strip(),
                event.assoc.requestor.address,
                count,
                ", ".join(sorted(studies)),
                who,
            )
