"""Reading a DICOM-SEG back onto its source series (demo, tests, previews)."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom


def seg_label_map(
    seg: pydicom.Dataset, source_sop_uids: Sequence[str]
) -> tuple[np.ndarray, dict[int, str]]:
    """Segment numbers per voxel over the given source slices, and segment labels.

    Returns ``(map[z, y, x], {segment_number: SegmentLabel})``; slices without any
    frame come back as zeros.
    """
    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.Segmentation.from_dataset(seg)
    numbers = seg.get_pixels_by_source_instance(list(source_sop_uids), combine_segments=True)
    names = {
        int(item.SegmentNumber): str(item.SegmentLabel)
        for item in seg.SegmentSequence
        if int(item.SegmentNumber) > 0
    }
    return np.asarray(numbers, dtype=np.uint8), names


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
