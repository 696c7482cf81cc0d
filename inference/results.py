"""The objects the node produces: their UIDs, SOP classes and descriptive defaults.

One place for what the SEG and RTSTRUCT writers, the job runner, the demo and the status
page must agree on: how a result's Series / SOP Instance UIDs are derived, which SOP class
each result type is, and how a result describes itself (series description, algorithm,
manufacturer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from inference.labels import ARTIFICIAL_INTELLIGENCE, Code
from kernel.uids import derived_uid
from kernel.vocabulary import ResultType

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
RESULT_SOP_CLASS_UIDS = {
    ResultType.BINARY: SEG_SOP_CLASS_UID,
    ResultType.LABELMAP: LABELMAP_SEG_SOP_CLASS_UID,
    ResultType.RTSTRUCT: RTSTRUCT_SOP_CLASS_UID,
}

MANUFACTURER = "dicom-node"
MANUFACTURER_MODEL_NAME = "dicom-node"
CONTENT_CREATOR = "dicom-node"
SERIES_NUMBER_BASE = 9000  # result series are numbered 9000-9999, after the scanner's


def product_version() -> str:
    """This package's version (SoftwareVersions of every result)."""
    try:
        return version("dicom-node")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a label map (SegmentationAlgorithmIdentificationSequence)."""

    name: str
    version: str
    family: Code = ARTIFICIAL_INTELLIGENCE


def pipeline_version(model_versions: dict[str, str]) -> str:
    """One version string for a pipeline's models, e.g. ``tumor-0.2.0+totalseg-0.1.0``
    (part of the result UIDs: a new model version makes a new result series)."""
    return "+".join(f"{m}-{v}" for m, v in sorted(model_versions.items()))


def series_description(pipeline: str, version: str) -> str:
    """SeriesDescription of a result: ``AI <pipeline> <version>`` (at most 64 characters)."""
    return f"AI {pipeline} {version}"[:64]


def result_uids(
    source_series_uid: str,
    pipeline: str,
    version: str,
    result_type: ResultType | str = ResultType.BINARY,
) -> tuple[str, str, int]:
    """(SeriesInstanceUID, SOPInstanceUID, SeriesNumber) of a pipeline's result.

    Derived from the inputs only, so a re-run with the same model version replaces the
    earlier result in the PACS, while a new model version makes a new series. A LABELMAP
    or RTSTRUCT copy (another SOP class) is its own series.
    """
    parts: tuple[str, ...] = (source_series_uid, pipeline, version)
    if ResultType(result_type) != ResultType.BINARY:
        parts += (str(ResultType(result_type)),)
    series_uid = derived_uid("seg-series", *parts)
    sop_uid = derived_uid("seg-instance", *parts)
    digest = hashlib.sha256(f"{pipeline}\x1f{version}".encode()).digest()
    return series_uid, sop_uid, SERIES_NUMBER_BASE + int.from_bytes(digest[:2], "big") % 1000
