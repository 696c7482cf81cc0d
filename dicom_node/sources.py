"""Sources of studies (settings ``sources``): what the node asks them and what they answer.

One small interface, two kinds behind it: ``dimse`` (C-FIND, C-MOVE / C-GET with
pynetdicom; ``dicom_node.source_dimse``) and ``dicomweb`` (QIDO-RS / WADO-RS with
dicomweb-client; ``dicom_node.source_dicomweb``). ``client_for`` picks one.

A client answers three questions: which studies match a query (``find_studies``), which
series a study has (``series_of``: the retrieval holds them open until it ends, so no
series completes half-retrieved), and it retrieves a study (``retrieve``): C-MOVE makes
the source store to the node's own listener; C-GET and WADO-RS hand every instance to an
``InstanceSink``, which stores it through the receive path (``dicom_node.ingest``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicom_node.retrieve import StudyQuery
from kernel.settings import DicomwebSource, DimseSource, NodeSettings

# Most studies a search lists (a patient ID over years can match many).
MAX_MATCHES = 200


class SourceError(Exception):
    """The source could not be asked, or refused (association rejected, connection
    refused, HTTP error, a failure status); the message names the source and, where it
    can, what to change."""


@dataclass(frozen=True)
class FoundStudy:
    """One study a source holds (its C-FIND / QIDO-RS answer). No patient name: the node
    never shows one."""

    study_uid: str
    accession_number: str | None = None
    patient_id: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    modalities: tuple[str, ...] = ()
    series_count: int | None = None
    instance_count: int | None = None

    def as_dict(self, patient_ids: bool = False) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "accession_number": self.accession_number,
            "patient_id": self.patient_id if patient_ids else None,
            "study_date": self.study_date,
            "study_description": self.study_description,
            "modalities": list(self.modalities),
            "series_count": self.series_count,
            "instance_count": self.instance_count,
        }


@dataclass
class Counts:
    """How a retrieval is going: instances the node stored, instances that failed (at
    the source or refused by the node), and what the source says it will send."""

    received: int = 0
    failed: int = 0
    expected: int | None = None
    # What the source says it stored to the node (C-MOVE / C-GET completed and warning
    # sub-operations), None until it says.
    completed: int | None = None
    # Why instances failed, a few examples (the node's refusals, the source's statuses).
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 5 and text not in self.problems:
            self.problems.append(text)


@dataclass(frozen=True)
class Outcome:
    """How a retrieval ended: ``reason`` None when the source reports success, else why
    not (a refused move, a failure status, a broken connection), naming the source."""

    reason: str | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """Why the node did not store an instance; ``out_of_resources``: the spool is full or
    the database could not record it (a retry may work), else the instance itself is
    refused (corrupt, its series belongs to another study)."""

    reason: str
    out_of_resources: bool = False


class InstanceSink(Protocol):
    """Where C-GET and WADO-RS put each instance: the node's receive path."""

    def store(self, data: bytes) -> Refusal | None:
        """Store one encoded DICOM file (Part 10); None when stored."""
        ...


class SourceClient(Protocol):
    """What the retrieval loop and the search form ask of a source."""

    method: str  # C-MOVE, C-GET or WADO-RS

    def find_studies(self, query: StudyQuery) -> list[FoundStudy]: ...

    def series_of(self, study_uid: str) -> list[str]: ...

    def retrieve(
        self,
        study_uid: str,
        sink: InstanceSink,
        counts: Counts,
        on_progress: Callable[[], None],
        stop: threading.Event,
    ) -> Outcome: ...


def describe(source: DimseSource | DicomwebSource) -> str:
    """E.g. ``PACS@10.0.0.2:104 (C-FIND, C-MOVE)`` or ``https://vna/dicom-web (QIDO-RS,
    WADO-RS)``; no credentials."""
    if isinstance(source, DimseSource):
        return (
            f"{source.ae_title}@{source.host}:{source.port} "
            f"(C-FIND, {'C-MOVE' if source.retrieve == 'move' else 'C-GET'})"
        )
    return f"{source.url} (QIDO-RS, WADO-RS)"


def source_dict(source: DimseSource | DicomwebSource) -> dict[str, Any]:
    """A source for the pages and the API: name, kind, where, how (no credentials)."""
    return {"name": source.name, "kind": source.kind, "where": describe(source)}


def client_for(settings: NodeSettings, name: str) -> SourceClient:
    """The client of the source ``name``; ``KeyError`` naming the configured sources when
    there is none by that name."""
    source = settings.source(name)
    if isinstance(source, DimseSource):
        from dicom_node.source_dimse import DimseClient

        return DimseClient(source, settings.ae_title, settings.port)
    from dicom_node.source_dicomweb import DicomwebClient

    return DicomwebClient(source)
