"""FRACTIONAL DICOM-SEG of a pipeline's class probabilities (PS3.3 C.8.20.2).

One segment per label, PROBABILITY, 8 bits (``MaximumFractionalValue`` 255), on the
source slices like the BINARY SEG of the same result; values below half a step (0.002)
are written as 0 so that frames where a label is not even remotely likely are omitted.
Descriptions, character set, UIDs and the other attributes are made exactly as for the
BINARY SEG (``seg_writer``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from inference.charsets import OutputCharacterSet, prepare_source, settle_output
from inference.labels import SegmentLabel
from inference.results import (
    CONTENT_CREATOR,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    Algorithm,
    product_version,
)
from inference.seg_writer import (
    check_labels,
    save_atomically,
    segment_description,
    set_dimension_organization_uid,
    source_series_uid,
)
from kernel.uids import derived_uid

logger = logging.getLogger(__name__)
_MAX_FRACTIONAL_VALUE = 255


def build_fractional_seg(
    source_images: Sequence[pydicom.Dataset],
    probabilities: np.ndarray,
    labels: Sequence[SegmentLabel],
    *,
    algorithm: Algorithm,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    manufacturer: str = MANUFACTURER,
    manufacturer_model_name: str = MANUFACTURER_MODEL_NAME,
    content_creator: str = CONTENT_CREATOR,
    on_transcode: Callable[[OutputCharacterSet], None] | None = None,
) -> hd.seg.Segmentation:
    """A FRACTIONAL Segmentation of ``source_images`` from ``probabilities``.

    ``probabilities``: float [1 + len(labels), z, y, x] (channel 0 the background, then
    one channel per label, ``probability_maps``), ``probabilities[:, z]`` on
    ``source_images[z]``. Raises ``ValueError`` when the shapes or labels do not fit and
    ``CharacterSetError`` as the BINARY writer does.
    """
    started = time.perf_counter()
    series_uid = source_series_uid(source_images)
    source = prepare_source(source_images)
    first = source.images[0]
    expected = (1 + len(labels), len(source.images), int(first.Rows), int(first.Columns))
    if probabilities.shape != expected:
        raise ValueError(
            f"probabilities {probabilities.shape} do not match series {series_uid} "
            f"(1 + labels, slices, rows, columns) = {expected}"
        )
    check_labels(labels)
    # [z, y, x, segments] in 0..1; below half a step is nothing (empty frames omitted).
    fractions = np.moveaxis(probabilities[1:].astype(np.float32), 0, -1)
    fractions[fractions < 0.5 / _MAX_FRACTIONAL_VALUE] = 0.0
    descriptions = [
        segment_description(number, label, algorithm)
        for number, label in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=source.images,
        pixel_array=fractions,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=_MAX_FRACTIONAL_VALUE,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=product_version(),
        device_serial_number=socket.gethostname()[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=f"{algorithm.name} {algorithm.version} probability"[:64],
        content_creator_name=content_creator if "^" in content_creator else f"{content_creator}^",
        series_description=series_description,
        omit_empty_frames=True,
        specific_character_set=None,
    )
    charset = settle_output(seg, source, "Segmentation")
    if charset.transcoded and on_transcode is not None:
        on_transcode(charset)
    set_dimension_organization_uid(seg, derived_uid(sop_instance_uid, "DimensionOrganizationUID"))
    logger.info(
        "seg: built FRACTIONAL for series %s: %d segments, %d frames, %.2f s",
        series_uid,
        len(labels),
        int(seg.NumberOfFrames),
        time.perf_counter() - started,
    )
    return seg


def write_fractional_seg(
    source_images: Sequence[pydicom.Dataset],
    probabilities: np.ndarray,
    labels: Sequence[SegmentLabel],
    *,
    path: Path,
    **options: Any,
) -> Path:
    """``build_fractional_seg`` saved atomically as a Part 10 file at ``path``."""
    seg = build_fractional_seg(source_images, probabilities, labels, **options)
    return save_atomically(seg, path)
