"""The objects the node produces: their UIDs, SOP classes and descriptive defaults.

One place for what the SEG and RTSTRUCT writers, the job runner, the demo and the status
page must agree on: how a result's Series / SOP Instance UIDs are derived, which SOP class
each result type is, and how a result describes itself (series description, algorithm,
manufacturer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

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
    ResultType.FRACTIONAL: SEG_SOP_CLASS_UID,
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


def input_identity(inputs: Mapping[str, Any]) -> str:
    """What identifies a job's input exactly: per input role, the series UID, the SOP
    Instance UIDs of the images used (sorted) and the digest of their voxels and grid.

    ``inputs``: role -> a ``Volume`` (anything with ``series_uid``, ``headers`` and
    ``digest``). Two runs get the same identity only when they read the same images with
    the same content: half a series and the whole series differ, so do a series and the
    same series with a slice replaced under its old SOP Instance UID.
    """
    h = hashlib.sha256()
    for role in sorted(inputs):
        volume = inputs[role]
        sop_uids = sorted(str(ds.SOPInstanceUID) for ds in volume.headers)
        for part in (role, volume.series_uid, *sop_uids, volume.digest):
            h.update(part.encode("utf-8"))
            h.update(b"\x1f")
    return h.hexdigest()


def result_uids(
    source_series_uid: str,
    pipeline: str,
    version: str,
    result_type: ResultType | str = ResultType.BINARY,
    identity: str = "",
) -> tuple[str, str, int]:
    """(SeriesInstanceUID, SOPInstanceUID, SeriesNumber) of a pipeline's result.

    Derived from the exact input (``identity``, see ``input_identity``), the pipeline,
    its model versions and the result type: the same input gives the same UIDs, so a
    re-send or re-run is idempotent in the PACS (which keeps the first object it got under
    a SOP Instance UID); any other input (a series that grew, a replaced slice), another
    model version or another result type gives new UIDs, never a UID of another result.
    The SeriesNumber depends on the pipeline and version only.
    """
    parts: tuple[str, ...] = (source_series_uid, pipeline, version)
    if ResultType(result_type) != ResultType.BINARY:
        parts += (str(ResultType(result_type)),)
    if identity:
        parts += (identity,)
    series_uid = derived_uid("seg-series", *parts)
    sop_uid = derived_uid("seg-instance", *parts)
    digest = hashlib.sha256(f"{pipeline}\x1f{version}".encode()).digest()
    return series_uid, sop_uid, SERIES_NUMBER_BASE + int.from_bytes(digest[:2], "big") % 1000
