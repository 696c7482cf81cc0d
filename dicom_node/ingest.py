"""Instances that do not come through the DICOM listener enter by the listener's own path.

Three callers: the node's own retrievals (C-GET, WADO-RS: ``dicom_node.retriever``) and
STOW-RS requests (``dicom_node.web.stow``). The same steps, the same objects and the same
answers as a C-STORE to the listener (``dicom_node.scp``): the header is read and checked
(``instance.parse_header``: corrupt or truncated data, missing UIDs), the bytes go to the
node's ``Spool`` (temp file, fsync, rename), the completeness tracker learns the series is
being carried, and ``records.InstanceRecorder`` records the instance (a re-sent one
replaces its file, a series UID of another study is refused and its file removed).
Nothing is written anywhere else, so routing, the status page and the spool re-index at
start see these instances exactly like pushed ones.

One more check than the listener makes: when the caller names a study (a retrieval of
that study, ``POST /dicomweb/studies/{study}``), an instance of another study is refused
before anything is written (a source that answers with the wrong study, or a client that
mixes studies, must not put them into the node).

Unlike the listener, the instance is recorded before ``receive`` returns: a STOW-RS
response or a retrieval's count never names an instance the database does not hold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from db.session import Database
from dicom_node.assembler import AssociationTracker
from dicom_node.instance import CorruptDatasetError, InstanceHeader, parse_header
from dicom_node.records import InstanceRecorder, Origin, SeriesConflictError
from dicom_node.sources import Refusal
from dicom_node.spool import Spool, SpoolFullError
from kernel.uids import InvalidUIDError

log = logging.getLogger("dicom_node.ingest")


class Cause(StrEnum):
    """Why an instance was not stored. The first two are about the instance itself (a
    resend of the same bytes fails the same way), the others about the node (retry later)."""

    CORRUPT = "corrupt"  # cannot be parsed, truncated, UIDs missing or unusable
    OTHER_STUDY = "other_study"  # not the study the caller named
    SERIES_CONFLICT = "series_conflict"  # its series UID belongs to another study
    SPOOL_FULL = "spool_full"  # below the free-space watermark, or the disk is full
    WRITE_FAILED = "write_failed"  # the spool file could not be written
    NOT_RECORDED = "not_recorded"  # durable, but the database did not take its row


# The causes a retry may cure (the node's resources, not the instance).
RETRY_LATER = frozenset({Cause.SPOOL_FULL, Cause.WRITE_FAILED, Cause.NOT_RECORDED})


@dataclass(frozen=True)
class Ingested:
    """What became of one instance: stored (``cause`` None) with its ``path``, or refused
    with the cause and a reason naming the instance. ``header`` is None when the data
    could not be parsed."""

    header: InstanceHeader | None
    path: Path | None = None
    cause: Cause | None = None
    reason: str | None = None

    @property
    def stored(self) -> bool:
        return self.cause is None

    def refusal(self) -> Refusal | None:
        """The retrieval's view of a refusal (``sources.Refusal``); None when stored."""
        if self.cause is None:
            return None
        return Refusal(self.reason or str(self.cause), self.cause in RETRY_LATER)


class ReceivePath:
    """Stores instances carried by one retrieval or one STOW-RS request.

    ``carrier`` is the id under which the completeness tracker holds the series open (the
    retrieval's or the request's, like an association's id): ``release`` it when the
    carrier ends. ``origin`` is what the series record as CallingAE, CalledAE and
    SourceAddress. ``study_uid``: the only study accepted (None: any). ``record_lock``
    serialises recording where several carriers share one recorder.
    """

    def __init__(
        self,
        spool: Spool,
        recorder: InstanceRecorder,
        tracker: AssociationTracker,
        carrier: int,
        origin: Origin,
        study_uid: str | None,
        record_lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self.spool = spool
        self.recorder = recorder
        self.tracker = tracker
        self.carrier = carrier
        self.origin = origin
        self.study_uid = study_uid
        self.record_lock = record_lock if record_lock is not None else nullcontext()

    def store(self, data: bytes) -> Refusal | None:
        """Store one encoded Part 10 file; None when it is durable and recorded (the
        ``sources.InstanceSink`` of a retrieval)."""
        return self.receive(data).refusal()

    def receive(self, data: bytes) -> Ingested:
        """Check, spool (fsync) and record one encoded Part 10 file (preamble, file meta,
        data set). Never raises for bad data or a full disk: the outcome says why."""
        try:
            header = parse_header(data)
        except CorruptDatasetError as exc:
            return Ingested(None, cause=Cause.CORRUPT, reason=f"instance refused: {exc}")
        if self.study_uid is not None and header.study_uid != self.study_uid:
            return Ingested(
                header,
                cause=Cause.OTHER_STUDY,
                reason=f"instance {header.sop_uid} refused: it belongs to study "
                f"{header.study_uid}, not to the study asked for ({self.study_uid})",
            )
        try:
            path = self.spool.write(header.study_uid, header.series_uid, header.sop_uid, data)
        except SpoolFullError as exc:
            log.error("out of resources, refused instance %s: %s", header.sop_uid, exc)
            return Ingested(header, cause=Cause.SPOOL_FULL, reason=f"spool full: {exc}")
        except InvalidUIDError as exc:  # parse_header accepted it; the spool path did not
            return Ingested(header, cause=Cause.CORRUPT, reason=f"instance refused: {exc}")
        except OSError as exc:
            log.error("could not spool instance %s: %s", header.sop_uid, exc)
            return Ingested(
                header,
                cause=Cause.WRITE_FAILED,
                reason=f"instance {header.sop_uid} could not be written: {exc}",
            )
        self.tracker.touch(self.carrier, header.series_uid)
        try:
            with self.record_lock:
                self.recorder.record(header, str(path), len(data), self.origin)
        except SeriesConflictError as exc:
            path.unlink(missing_ok=True)
            log.warning("refused instance %s: %s", header.sop_uid, exc)
            return Ingested(header, cause=Cause.SERIES_CONFLICT, reason=str(exc))
        except Exception:
            # The file is durable; the start-up spool re-scan indexes it.
            log.exception("could not record instance %s in the database", header.sop_uid)
            return Ingested(
                header,
                path,
                cause=Cause.NOT_RECORDED,
                reason=f"instance {header.sop_uid} could not be recorded",
            )
        return Ingested(header, path)


class Intake:
    """The receive path for requests that push instances to the node (STOW-RS): the
    node's spool and completeness tracker, and one recorder shared by all requests
    (recording serialised, so two requests never create one series twice)."""

    def __init__(self, db: Database, spool: Spool, tracker: AssociationTracker) -> None:
        self.spool = spool
        self.tracker = tracker
        self.recorder = InstanceRecorder(db)
        self._record_lock = threading.Lock()

    @contextmanager
    def carrier(self, origin: Origin, study_uid: str | None) -> Iterator[ReceivePath]:
        """A receive path for one request; the series it stored are held open (no series
        completes, no pipeline starts) until the ``with`` block ends, however it ends."""
        token = object()  # the request's id in the tracker while the block runs
        try:
            yield ReceivePath(
                self.spool,
                self.recorder,
                self.tracker,
                id(token),
                origin,
                study_uid,
                self._record_lock,
            )
        finally:
            self.tracker.release(id(token))
