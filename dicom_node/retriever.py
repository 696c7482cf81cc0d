"""The retrieval loop: takes retrieve requests one at a time and carries them out.

For each request (``dicom_node.retrieve``): ask the source which study it means (C-FIND /
QIDO-RS; none, or more than one, fails the request with the reason, before anything is
asked for), list its series and hold them open in the completeness tracker, retrieve it
(C-MOVE to the node's own listener, C-GET or WADO-RS through ``ingest.ReceivePath``),
keep the counts current on the request row, then release the series: they complete after
the quiet period like pushed ones, and routing runs the pipelines the request named (or
the rules' choice). Holding the series means no pipeline starts on a study that is still
arriving, however long the source pauses between instances.

Instances received: C-GET and WADO-RS count what the receive path stored; C-MOVE counts
the study's instances the listener recorded since the request began (the source's own
"completed" count says what it sent, not what the node kept).

One request at a time, oldest first (a PACS serves one large move better than several).
A node stopped mid-retrieval leaves the request ``retrieving``; the next start asks for
it again (``retrieve.requeue_interrupted``); instances already stored are received again.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import func, select

from db.models import Instance, RetrieveRequest, Series, Study
from db.session import Database
from dicom_node import retrieve, sources
from dicom_node.assembler import AssociationTracker
from dicom_node.ingest import ReceivePath
from dicom_node.records import InstanceRecorder, Origin
from dicom_node.sources import Counts, Outcome, SourceClient, SourceError
from dicom_node.spool import Spool
from kernel.settings import DimseSource, NodeSettings
from kernel.vocabulary import RetrieveState

log = logging.getLogger("dicom_node.retriever")

# How often the loop looks for new requests when nobody wakes it (CLI requests).
POLL_S = 1.0
# Progress is written to the request row at most this often (and once at the end).
PROGRESS_EVERY_S = 0.5
# After a C-MOVE's final response, how long the listener may take to record the last
# instances it acknowledged (it records in batches, after the acknowledgement).
RECORDED_WAIT_S = 10.0


def received_since(db: Database, study_uid: str, since: datetime) -> int:
    """Instances of the study the node recorded (received or received again) since
    ``since``: what a C-MOVE brought, counted where it landed."""
    with db.session() as s:
        return int(
            s.scalar(
                select(func.count(Instance.id))
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_uid == study_uid, Instance.received_at >= since)
            )
            or 0
        )


class Retriever:
    """Carries out retrieve requests (``run_forever`` in its own thread; ``wake`` after a
    new request)."""

    def __init__(
        self,
        db: Database,
        settings: NodeSettings,
        spool: Spool,
        tracker: AssociationTracker,
    ) -> None:
        self.db = db
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self.recorder = InstanceRecorder(db)
        self.wake = threading.Event()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                row = retrieve.claim_next(self.db)
                if row is not None:
                    self.process(row, stop)
                    continue
            except Exception:
                log.exception("retrieval loop error")
            self.wake.wait(POLL_S)
            self.wake.clear()

    # -- one request ------------------------------------------------------------------
    def process(self, row: RetrieveRequest, stop: threading.Event) -> str | None:
        """Carry out one claimed request; returns its final state (None: the node is
        stopping and the request stays for the next start)."""
        try:
            client = sources.client_for(self.settings, row.source)
        except KeyError as exc:
            retrieve.fail(self.db, row.id, str(exc.args[0]))
            return RetrieveState.FAILED
        query = retrieve.query_of(row)
        try:
            found = client.find_studies(query)
        except SourceError as exc:
            retrieve.fail(self.db, row.id, str(exc))
            return RetrieveState.FAILED
        if not found:
            retrieve.fail(self.db, row.id, f"{query.describe()} not found at source {row.source}")
            return RetrieveState.FAILED
        if len(found) > 1:
            uids = ", ".join(x.study_uid for x in found[:5]) + (", ..." if len(found) > 5 else "")
            retrieve.fail(
                self.db,
                row.id,
                f"{query.describe()} matches {len(found)} studies at source {row.source} "
                f"({uids}): ask for one by its Study Instance UID",
            )
            return RetrieveState.FAILED
        study = found[0]
        if stop.is_set():  # the listener a C-MOVE stores to is closing: next start
            return None
        carrier = object()  # the retrieval's id in the completeness tracker
        try:
            return self._retrieve(row, client, study, id(carrier), stop)
        finally:
            self.tracker.release(id(carrier))

    def _origin(self, row: RetrieveRequest) -> Origin:
        """What retrieved series record as CallingAE, CalledAE and SourceAddress."""
        source = self.settings.source(row.source)
        if isinstance(source, DimseSource):
            return Origin(
                source.ae_title, source.calling_ae_title or self.settings.ae_title, source.host
            )
        return Origin(source.name[:16], self.settings.ae_title, urlsplit(source.url).hostname or "")

    def _wait_recorded(self, study_uid: str, since: datetime, counts: Counts) -> None:
        """Until the listener recorded as many instances as the source says it stored
        (at most ``RECORDED_WAIT_S``)."""
        deadline = time.monotonic() + RECORDED_WAIT_S
        while True:
            counts.received = received_since(self.db, study_uid, since)
            if counts.completed is None or counts.received >= counts.completed:
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def _retrieve(
        self,
        row: RetrieveRequest,
        client: SourceClient,
        study: sources.FoundStudy,
        carrier: int,
        stop: threading.Event,
    ) -> str | None:
        study_uid = study.study_uid
        try:
            series = client.series_of(study_uid)
        except SourceError as exc:  # retrieval still works; only the hold is lost
            log.warning("retrieve #%d: series of study %s not listed: %s", row.id, study_uid, exc)
            series = []
        for series_uid in series:
            self.tracker.touch(carrier, series_uid)
        wanted = ", ".join(row.pipelines) if row.pipelines else "the rules' choice"
        expected = study.instance_count
        retrieve.start_retrieving(
            self.db,
            row.id,
            study_uid=study_uid,
            method=client.method,
            expected=expected,
            detail={"series": len(series), "study_date": study.study_date},
            message=f"retrieve #{row.id} from {row.source} by {client.method}: "
            f"{expected if expected is not None else 'an unknown number of'} instances in "
            f"{len(series)} series expected; pipelines: {wanted}",
        )
        since = row.started_at
        counts = Counts(expected=expected)
        moved = client.method == "C-MOVE"
        last = 0.0

        def on_progress(final: bool = False) -> None:
            nonlocal last
            now = time.monotonic()
            if not final and now - last < PROGRESS_EVERY_S:
                return
            last = now
            if moved:
                counts.received = received_since(self.db, study_uid, since)
            retrieve.progress(
                self.db,
                row.id,
                received=counts.received,
                failed=counts.failed,
                expected=counts.expected,
            )

        sink = ReceivePath(
            self.spool, self.recorder, self.tracker, carrier, self._origin(row), study_uid
        )
        started = time.monotonic()
        try:
            outcome = client.retrieve(study_uid, sink, counts, on_progress, stop)
        except SourceError as exc:
            outcome = Outcome(str(exc))
        if outcome.detail.get("stopped"):
            log.warning("retrieve #%d of study %s interrupted: the node stops", row.id, study_uid)
            return None
        if moved:
            self._wait_recorded(study_uid, since, counts)
        on_progress(final=True)
        reason = outcome.reason
        if reason is None and counts.expected is not None and counts.received < counts.expected:
            reason = (
                f"source {row.source} reported success, but {counts.received} of "
                f"{counts.expected} instances arrived"
            )
        state = retrieve.finish(
            self.db,
            row.id,
            received=counts.received,
            failed=counts.failed,
            expected=counts.expected,
            reason=reason,
            detail={**outcome.detail, "seconds": round(time.monotonic() - started, 1)},
        )
        log.info(
            "retrieve #%d of study %s from %s by %s: %s, %d received, %d failed in %.1f s",
            row.id,
            study_uid,
            row.source,
            client.method,
            state,
            counts.received,
            counts.failed,
            time.monotonic() - started,
        )
        return state
