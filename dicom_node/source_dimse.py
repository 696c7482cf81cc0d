"""A PACS as a source: C-FIND, then C-MOVE or C-GET, Study Root Query/Retrieve
Information Model (PS3.4 annex C, C.6.2), with pynetdicom.

C-MOVE (PS3.4 C.4.2) asks the source to store the study to the node's own AE title: the
source opens its own association to the node's listener, so the instances arrive through
the normal receive path, and the source must know the node (AE title, host, port) and be
in ``peers``. C-GET (PS3.4 C.4.3) makes the source store on the node's own association
(the node takes the SCP role of the storage SOP classes, PS3.7 D.3.3.4): no registration,
where the source allows it; each instance goes to the ``InstanceSink`` (the receive path).

Each query is checked against what came back (``StudyQuery.matches``): a source that
ignores a matching key it does not support answers with every study, and none of those
may be retrieved by mistake.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.retrieve import StudyQuery
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.sources import (
    MAX_MATCHES,
    Counts,
    FoundStudy,
    InstanceSink,
    Outcome,
    SourceError,
)
from kernel.settings import DimseSource

log = logging.getLogger("dicom_node.source_dimse")

# PS3.4 C.4.1.1.4 (Q/R statuses) and C.4.2.1.5 / C.4.3.1.5 (C-MOVE / C-GET).
SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
WARNING_SUBOPERATIONS = 0xB000
CANCELLED = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801
_REFUSED_OUT_OF_RESOURCES = {
    0xA700: "out of resources",
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform the sub-operations",
    0xA900: "the identifier does not match the SOP class",
}
# C-STORE statuses the node answers a C-GET's sub-operations with (PS3.4 B.2.3).
STORE_OUT_OF_RESOURCES = 0xA700
STORE_CANNOT_UNDERSTAND = 0xC000
# At most 128 presentation contexts per association (PS3.8 9.3.2.2: odd ids 1..255):
# one for the C-GET itself, the rest for the storage SOP classes the node can take.
_GET_STORAGE_CONTEXTS = StoragePresentationContexts[:127]
_FIND_KEYS = (
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)


def _text(ds: Dataset | None, keyword: str) -> str | None:
    value = ds.get(keyword) if ds is not None else None
    if value in (None, ""):
        return None
    return str(value).strip() or None


def _int(ds: Dataset | None, keyword: str) -> int | None:
    try:
        value = _text(ds, keyword)
        return int(value) if value is not None else None
    except ValueError:
        return None


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """The values of a multi-valued element (one value comes back as a plain string)."""
    value = ds.get(keyword)
    if value in (None, ""):
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in values if str(v).strip())


def _status(status: Dataset | None) -> int | None:
    code = getattr(status, "Status", None) if status is not None else None
    return int(code) if code is not None else None


def _comment(status: Dataset | None) -> str:
    text = _text(status, "ErrorComment")
    return f" ({text})" if text else ""


class DimseClient:
    """C-FIND / C-MOVE / C-GET against one configured PACS (``DimseSource``)."""

    def __init__(self, source: DimseSource, node_ae_title: str, node_port: int | None = None):
        self.source = source
        self.calling_ae = source.calling_ae_title or node_ae_title
        self.move_destination = source.move_destination or node_ae_title
        self.node_port = node_port
        self.method = "C-MOVE" if source.retrieve == "move" else "C-GET"

    # -- association ------------------------------------------------------------------
    def _where(self) -> str:
        s = self.source
        return f"source {s.name} ({s.ae_title}@{s.host}:{s.port})"

    @contextmanager
    def _association(
        self, contexts: list[Any], handlers: list[Any] | None = None, roles: list[Any] | None = None
    ) -> Iterator[Any]:
        s = self.source
        ae = AE(ae_title=self.calling_ae)
        for context in contexts:
            if isinstance(context, tuple):
                ae.add_requested_context(*context)
            else:
                ae.add_requested_context(context)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.timeout_s
        ae.connection_timeout = s.timeout_s
        try:
            assoc = ae.associate(
                s.host,
                s.port,
                ae_title=s.ae_title,
                ext_neg=roles or None,
                evt_handlers=handlers or None,
            )
        except Exception as exc:  # name resolution and socket errors surface here
            raise SourceError(f"{self._where()}: no association: {exc}") from None
        if assoc.is_rejected:
            raise SourceError(
                f"{self._where()} rejected the association from AE title {self.calling_ae} "
                "(does the source know this node's AE title and address?)"
            )
        if not assoc.is_established:
            raise SourceError(
                f"{self._where()}: no association (connection refused, aborted or timed out "
                f"after {s.timeout_s:g} s)"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _register(self) -> str:
        """What to do about a source that does not know the C-MOVE destination."""
        port = f", DICOM port {self.node_port}" if self.node_port else ""
        return (
            f"register this node at the source as AE title {self.move_destination} with this "
            f"machine's address{port} (README: Retrieving studies), or set retrieve: get"
        )

    def _silence(self, assoc: Any, what: str) -> str:
        """Why a request got no response: the source aborted the association (it does
        not let this AE title do that), or nothing came within ``timeout_s``."""
        if assoc.is_aborted:
            return (
                f"the source aborted the association instead of answering the {what} (does "
                f"it allow AE title {self.calling_ae} to query and retrieve? register the "
                "node there)"
            )
        return f"no {what} answer within {self.source.timeout_s:g} s"

    @staticmethod
    def _accepted(assoc: Any, sop_class: str) -> bool:
        return any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts)

    # -- C-FIND -----------------------------------------------------------------------
    def _find(self, identifier: Dataset) -> list[Dataset]:
        model = StudyRootQueryRetrieveInformationModelFind
        found: list[Dataset] = []
        with self._association([model]) as assoc:
            if not self._accepted(assoc, model):
                raise SourceError(f"{self._where()} does not accept Study Root C-FIND")
            for status, answer in assoc.send_c_find(identifier, model):
                code = _status(status)
                if code in PENDING:
                    if answer is not None and len(found) <= MAX_MATCHES:
                        found.append(answer)
                    continue
                if code == SUCCESS:
                    return found
                if code is None:
                    raise SourceError(f"{self._where()}: {self._silence(assoc, 'C-FIND')}")
                raise SourceError(
                    f"{self._where()} answered the C-FIND with status 0x{code:04X}"
                    f"{_comment(status)}"
                )
        return found

    def find_studies(self, query: StudyQuery) -> list[FoundStudy]:
        """Studies matching ``query`` (STUDY level; only those that really match it).
        Raises ``SourceError``."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        for keyword in _FIND_KEYS:
            setattr(identifier, keyword, "")
        identifier.StudyInstanceUID = query.study_uid or ""
        identifier.AccessionNumber = query.accession_number or ""
        identifier.PatientID = query.patient_id or ""
        identifier.StudyDate = query.date_range()
        studies = []
        for answer in self._find(identifier):
            uid = _text(answer, "StudyInstanceUID")
            if uid is None:
                continue
            study = FoundStudy(
                study_uid=uid,
                accession_number=_text(answer, "AccessionNumber"),
                patient_id=_text(answer, "PatientID"),
                study_date=_text(answer, "StudyDate"),
                study_time=_text(answer, "StudyTime"),
                study_description=_text(answer, "StudyDescription"),
                modalities=_multi(answer, "ModalitiesInStudy"),
                series_count=_int(answer, "NumberOfStudyRelatedSeries"),
                instance_count=_int(answer, "NumberOfStudyRelatedInstances"),
            )
            if query.matches(uid, study.accession_number, study.patient_id, study.study_date):
                studies.append(study)
        studies.sort(key=lambda x: (x.study_date or "", x.study_time or ""), reverse=True)
        return studies[:MAX_MATCHES]

    def series_of(self, study_uid: str) -> list[str]:
        """Series Instance UIDs of a study (SERIES level C-FIND). Raises ``SourceError``."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = ""
        return [
            uid
            for answer in self._find(identifier)
            if (uid := _text(answer, "SeriesInstanceUID"))
            and _text(answer, "StudyInstanceUID") in (None, study_uid)
        ]

    # -- C-MOVE / C-GET ---------------------------------------------------------------
    def retrieve(
        self,
        study_uid: str,
        sink: InstanceSink,
        counts: Counts,
        on_progress: Callable[[], None],
        stop: threading.Event,
    ) -> Outcome:
        """Retrieve the study: C-MOVE to the node's AE title (``sink`` unused: the
        listener stores) or C-GET into ``sink``. ``counts`` is kept current
        (``on_progress`` after each response); never raises for what the source answers,
        only ``SourceError`` when there is no association."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        if self.method == "C-MOVE":
            return self._move(identifier, counts, on_progress, stop)
        return self._get(identifier, sink, counts, on_progress, stop)

    def _suboperations(self, status: Dataset, counts: Counts) -> None:
        remaining = _int(status, "NumberOfRemainingSuboperations")
        done = [
            _int(status, k)
            for k in (
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            )
        ]
        if remaining is not None and None not in done:
            counts.expected = remaining + sum(x or 0 for x in done)
        failed = _int(status, "NumberOfFailedSuboperations")
        if failed is not None:
            counts.failed = max(counts.failed, failed)
        if done[0] is not None:
            counts.completed = done[0] + (done[2] or 0)

    def _responses(
        self,
        responses: Iterator[tuple[Dataset, Dataset | None]],
        assoc: Any,
        counts: Counts,
        on_progress: Callable[[], None],
        stop: threading.Event,
    ) -> Outcome:
        """Follow C-MOVE / C-GET responses to the final one (PS3.7 9.1.4 / 9.1.3)."""
        for status, answer in responses:
            code = _status(status)
            if code is None:
                return Outcome(f"{self._where()}: {self._silence(assoc, self.method)}")
            self._suboperations(status, counts)
            on_progress()
            if code in PENDING:
                if stop.is_set():
                    assoc.abort()
                    return Outcome("the node stopped while retrieving", {"stopped": True})
                continue
            detail = {"final_status": f"0x{code:04X}"}
            failed_uids = answer.get("FailedSOPInstanceUIDList") if answer is not None else None
            if failed_uids:
                detail["failed_sop_uids"] = [str(u) for u in list(failed_uids)[:20]]
            if code == SUCCESS:
                return Outcome(None, detail)
            if code == WARNING_SUBOPERATIONS:
                total = counts.expected if counts.expected is not None else "?"
                return Outcome(
                    f"{counts.failed} of {total} instances failed at {self._where()} "
                    f"(status 0xB000{_comment(status)})"
                    + (
                        f"; the node refused: {'; '.join(counts.problems)}"
                        if counts.problems
                        else ""
                    ),
                    detail,
                )
            if code == MOVE_DESTINATION_UNKNOWN:
                return Outcome(
                    f"{self._where()} refused the C-MOVE: move destination unknown (0xA801): "
                    f"{self._register()}",
                    detail,
                )
            if code == CANCELLED:
                return Outcome(f"{self._where()} cancelled the {self.method} (0xFE00)", detail)
            what = _REFUSED_OUT_OF_RESOURCES.get(code) or (
                "unable to process" if 0xC000 <= code <= 0xCFFF else "failure"
            )
            hint = ""
            completed = _int(status, "NumberOfCompletedSuboperations") or 0
            if self.method == "C-MOVE" and 0xC000 <= code <= 0xCFFF and not completed:
                # Some PACS (Orthanc among them) answer an unknown move destination this
                # way instead of 0xA801.
                hint = (
                    f"; if it does not know the move destination {self.move_destination}: "
                    + self._register()
                )
            return Outcome(
                f"{self._where()} refused the {self.method}: {what} (0x{code:04X})"
                f"{_comment(status)}{hint}",
                detail,
            )
        return Outcome(f"{self._where()}: the {self.method} ended without a final response")

    def _move(
        self,
        identifier: Dataset,
        counts: Counts,
        on_progress: Callable[[], None],
        stop: threading.Event,
    ) -> Outcome:
        model = StudyRootQueryRetrieveInformationModelMove
        with self._association([model]) as assoc:
            if not self._accepted(assoc, model):
                return Outcome(
                    f"{self._where()} does not accept Study Root C-MOVE (try retrieve: get)"
                )
            responses = assoc.send_c_move(identifier, self.move_destination, model)
            return self._responses(responses, assoc, counts, on_progress, stop)

    def _get(
        self,
        identifier: Dataset,
        sink: InstanceSink,
        counts: Counts,
        on_progress: Callable[[], None],
        stop: threading.Event,
    ) -> Outcome:
        model = StudyRootQueryRetrieveInformationModelGet
        refused = 0

        def on_store(event: Any) -> int:
            nonlocal refused
            refusal = sink.store(event.encoded_dataset())
            if refusal is None:
                counts.received += 1
                on_progress()
                return SUCCESS
            refused += 1
            counts.problem(refusal.reason)
            counts.failed = max(counts.failed, refused)
            on_progress()
            return STORE_OUT_OF_RESOURCES if refusal.out_of_resources else STORE_CANNOT_UNDERSTAND

        contexts: list[Any] = [model] + [
            (cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES) for cx in _GET_STORAGE_CONTEXTS
        ]
        roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in _GET_STORAGE_CONTEXTS]
        with self._association(contexts, [(evt.EVT_C_STORE, on_store)], roles) as assoc:
            if not self._accepted(assoc, model):
                return Outcome(
                    f"{self._where()} does not accept Study Root C-GET (try retrieve: move)"
                )
            responses = assoc.send_c_get(identifier, model)
            return self._responses(responses, assoc, counts, on_progress, stop)
