"""Instances the node fetched itself (C-GET, WADO-RS) enter by the listener's own path.

The same steps, the same objects and the same answers as a C-STORE to the listener
(``dicom_node.scp``): the header is read and checked (``instance.parse_header``: corrupt
or truncated data, missing UIDs), the bytes go to the node's ``Spool`` (temp file, fsync,
rename), the completeness tracker learns the series is being carried, and
``records.InstanceRecorder`` records the instance (a re-sent one replaces its file, a
series UID of another study is refused and its file removed). Nothing is written
anywhere else, so routing, the status page and the spool re-index at start see these
instances exactly like pushed ones.

One more check than the listener makes: an instance of another study than the one asked
for is refused before anything is written (a source that answers with the wrong study
must not put it into the node).
"""

from __future__ import annotations

import logging

from dicom_node.assembler import AssociationTracker
from dicom_node.instance import CorruptDatasetError, parse_header
from dicom_node.records import InstanceRecorder, Origin, SeriesConflictError
from dicom_node.sources import Refusal
from dicom_node.spool import Spool, SpoolFullError

log = logging.getLogger("dicom_node.ingest")


class ReceivePath:
    """An ``InstanceSink`` for one retrieval of ``study_uid``.

    ``carrier`` is the id under which the completeness tracker holds the series open (the
    retrieval's, like an association's id): ``release`` it when the retrieval ends.
    ``origin`` is what the series record as CallingAE, CalledAE and SourceAddress.
    """

    def __init__(
        self,
        spool: Spool,
        recorder: InstanceRecorder,
        tracker: AssociationTracker,
        carrier: int,
        origin: Origin,
        study_uid: str,
    ) -> None:
        self.spool = spool
        self.recorder = recorder
        self.tracker = tracker
        self.carrier = carrier
        self.origin = origin
        self.study_uid = study_uid

    def store(self, data: bytes) -> Refusal | None:
        """Store one encoded Part 10 file; None when it is durable and recorded."""
        try:
            header = parse_header(data)
        except CorruptDatasetError as exc:
            return Refusal(f"instance refused: {exc}")
        if header.study_uid != self.study_uid:
            return Refusal(
                f"instance {header.sop_uid} refused: it belongs to study {header.study_uid}, "
                f"not to the study asked for ({self.study_uid})"
            )
        try:
            path = self.spool.write(header.study_uid, header.series_uid, header.sop_uid, data)
        except SpoolFullError as exc:
            log.error("out of resources, refused instance %s: %s", header.sop_uid, exc)
            return Refusal(f"spool full: {exc}", out_of_resources=True)
        except OSError as exc:
            log.error("could not spool instance %s: %s", header.sop_uid, exc)
            return Refusal(f"instance {header.sop_uid} could not be written: {exc}", True)
        self.tracker.touch(self.carrier, header.series_uid)
        try:
            self.recorder.record(header, str(path), len(data), self.origin)
        except SeriesConflictError as exc:
            path.unlink(missing_ok=True)
            log.warning("refused instance %s: %s", header.sop_uid, exc)
            return Refusal(str(exc))
        except Exception:
            # The file is durable; the start-up spool re-scan indexes it.
            log.exception("could not record instance %s in the database", header.sop_uid)
            return Refusal(f"instance {header.sop_uid} could not be recorded", True)
        return None
