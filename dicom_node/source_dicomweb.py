"""A DICOMweb server as a source: QIDO-RS to find studies and their series, WADO-RS to
retrieve them (PS3.18 10.6 and 10.4), with dicomweb-client.

Instances are asked for in the transfer syntax the server holds them in
(``transfer-syntax=*``, PS3.18 8.7.3.5.2), series by series, and each one goes to the
``InstanceSink`` (the receive path). A series whose stream breaks counts its missing
instances as failed and the next series is still asked for. Answers are checked against
the query (``StudyQuery.matches``) like C-FIND answers.

Credentials (``auth``) travel in the session only: dicomweb-client logs its request
headers at DEBUG, so its logger is held at WARNING whatever ``log_level`` says.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from dicom_node.retrieve import StudyQuery
from dicom_node.sources import (
    MAX_MATCHES,
    Counts,
    FoundStudy,
    InstanceSink,
    Outcome,
    SourceError,
)
from kernel.settings import DicomwebSource

log = logging.getLogger("dicom_node.source_dicomweb")
# Its DEBUG lines carry the Authorization header (basic or bearer credentials).
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

# DICOM JSON (PS3.18 F.2) tags of the attributes read from QIDO-RS answers.
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "AccessionNumber": "00080050",
    "PatientID": "00100020",
    "StudyDate": "00080020",
    "StudyTime": "00080030",
    "StudyDescription": "00081030",
    "ModalitiesInStudy": "00080061",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "NumberOfSeriesRelatedInstances": "00201209",
}
_STUDY_FIELDS = [
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
# Any transfer syntax: the instances as the server holds them, none re-encoded.
_AS_STORED = (("application/dicom", "*"),)


def _values(item: dict[str, Any], keyword: str) -> list[Any]:
    element = item.get(_TAGS[keyword]) or {}
    return list(element.get("Value") or [])


def _text(item: dict[str, Any], keyword: str) -> str | None:
    values = _values(item, keyword)
    if not values or values[0] in (None, ""):
        return None
    return str(values[0]).strip() or None


def _int(item: dict[str, Any], keyword: str) -> int | None:
    try:
        value = _text(item, keyword)
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


class DicomwebClient:
    """QIDO-RS / WADO-RS against one configured server (``DicomwebSource``)."""

    method = "WADO-RS"

    def __init__(self, source: DicomwebSource) -> None:
        self.source = source
        session = requests.Session()
        auth = source.auth
        if auth is not None and auth.type == "basic":
            session.auth = (auth.username or "", auth.password.get_secret_value())
        elif auth is not None and auth.type == "bearer":
            session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
        session.verify = str(source.ca_bundle) if source.ca_bundle else True
        self.client = DICOMwebClient(
            url=source.url, session=session, timeout=(source.timeout_s, source.timeout_s)
        )
        # Refused or failed requests are reported at once, not retried for minutes.
        self.client.set_http_retry_params(retry=False)

    def _where(self) -> str:
        return f"source {self.source.name} ({self.source.url})"

    def _failure(self, exc: Exception, what: str) -> SourceError:
        """A request error in words: HTTP status (credentials refused), unreachable,
        timed out."""
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            why = {
                401: "credentials missing or refused (auth)",
                403: "access denied to these credentials (auth)",
                404: "not found (is url the DICOMweb root, the part before /studies?)",
            }.get(code, exc.response.reason or "error")
            return SourceError(f"{self._where()}: {what} answered HTTP {code}: {why}")
        if isinstance(exc, requests.Timeout):
            return SourceError(
                f"{self._where()}: {what} timed out after {self.source.timeout_s:g} s"
            )
        if isinstance(exc, requests.ConnectionError):
            return SourceError(f"{self._where()}: {what}: cannot connect ({exc})")
        return SourceError(f"{self._where()}: {what} failed: {exc}")

    # -- QIDO-RS ----------------------------------------------------------------------
    def find_studies(self, query: StudyQuery) -> list[FoundStudy]:
        """Studies matching ``query`` (only those that really match it). Raises
        ``SourceError``."""
        filters: dict[str, str] = {}
        if query.study_uid:
            filters["StudyInstanceUID"] = query.study_uid
        if query.accession_number:
            filters["AccessionNumber"] = query.accession_number
        if query.patient_id:
            filters["PatientID"] = query.patient_id
        if query.date_range():
            filters["StudyDate"] = query.date_range()
        try:
            answers = self.client.search_for_studies(
                search_filters=filters, fields=_STUDY_FIELDS, limit=MAX_MATCHES + 1
            )
        except Exception as exc:  # requests and JSON errors alike, in words
            raise self._failure(exc, "QIDO-RS search for studies") from None
        studies = []
        for item in answers:
            uid = _text(item, "StudyInstanceUID")
            if uid is None:
                continue
            study = FoundStudy(
                study_uid=uid,
                accession_number=_text(item, "AccessionNumber"),
                patient_id=_text(item, "PatientID"),
                study_date=_text(item, "StudyDate"),
                study_time=_text(item, "StudyTime"),
                study_description=_text(item, "StudyDescription"),
                modalities=tuple(str(m) for m in _values(item, "ModalitiesInStudy") if m),
                series_count=_int(item, "NumberOfStudyRelatedSeries"),
                instance_count=_int(item, "NumberOfStudyRelatedInstances"),
            )
            if query.matches(uid, study.accession_number, study.patient_id, study.study_date):
                studies.append(study)
        studies.sort(key=lambda x: (x.study_date or "", x.study_time or ""), reverse=True)
        return studies[:MAX_MATCHES]

    def _series(self, study_uid: str) -> list[tuple[str, int | None]]:
        try:
            answers = self.client.search_for_series(
                study_instance_uid=study_uid, fields=["NumberOfSeriesRelatedInstances"]
            )
        except Exception as exc:
            raise self._failure(
                exc, f"QIDO-RS search for the series of study {study_uid}"
            ) from None
        return [
            (uid, _int(item, "NumberOfSeriesRelatedInstances"))
            for item in answers
            if (uid := _text(item, "SeriesInstanceUID"))
        ]

    def series_of(self, study_uid: str) -> list[str]:
        """Series Instance UIDs of a study. Raises ``SourceError``."""
        return [uid for uid, _count in self._series(study_uid)]

    # -- WADO-RS ----------------------------------------------------------------------
    def retrieve(
        self,
        study_uid: str,
        sink: InstanceSink,
        counts: Counts,
        on_progress: Callable[[], None],
        stop: threading.Event,
    ) -> Outcome:
        """Retrieve the study series by series into ``sink``; ``counts`` kept current.
        Raises ``SourceError`` only when the series cannot be listed."""
        series = self._series(study_uid)
        if not series:
            return Outcome(f"{self._where()} lists no series of study {study_uid}")
        known = [n for _uid, n in series]
        if None not in known:
            counts.expected = sum(n or 0 for n in known)
        for series_uid, expected in series:
            stored = 0
            try:
                instances = self.client.iter_series(
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    media_types=_AS_STORED,
                )
                for dataset in instances:
                    if stop.is_set():
                        return Outcome("the node stopped while retrieving", {"stopped": True})
                    buffer = io.BytesIO()
                    pydicom.dcmwrite(buffer, dataset)
                    refusal = sink.store(buffer.getvalue())
                    if refusal is None:
                        stored += 1
                        counts.received += 1
                    else:
                        counts.failed += 1
                        counts.problem(refusal.reason)
                        if refusal.out_of_resources:
                            on_progress()
                            return Outcome(
                                f"the node cannot store more instances: {refusal.reason}"
                            )
                    on_progress()
            except Exception as exc:  # a broken stream, an HTTP error, an undecodable part
                error = self._failure(exc, f"WADO-RS retrieve of series {series_uid}")
                missing = max(1, (expected or 0) - stored)
                counts.failed += missing
                counts.problem(str(error))
                log.warning("%s; %d instances of the series missing", error, missing)
                on_progress()
        if counts.failed:
            return Outcome(
                f"{counts.failed} instances failed: {'; '.join(counts.problems)}",
            )
        return Outcome(None)
