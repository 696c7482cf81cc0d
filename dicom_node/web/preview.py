"""Preview PNG of a result: the SEG overlaid on the source slice it labels most.

Rendered on the server (the browser needs no DICOM code) and cached on disk by the SEG's
SOP instance UID, which changes whenever the content does.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from sqlalchemy import select

from db.models import Instance, Result, Series
from db.session import Database
from inference.seg_reader import seg_label_map

WINDOW_WIDTH, WINDOW_LEVEL = 400.0, 40.0
ALPHA = 0.45
_FALLBACK_COLOURS = [(230, 60, 60), (60, 200, 90), (70, 120, 240), (240, 200, 40), (200, 80, 220)]


class PreviewError(LookupError):
    """No preview can be made (result or source files missing)."""


def _colours(seg: pydicom.Dataset) -> dict[int, tuple[int, int, int]]:
    out: dict[int, tuple[int, int, int]] = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        lab = getattr(item, "RecommendedDisplayCIELabValue", None)
        if lab is not None:
            from highdicom.color import CIELabColor  # local: only previews need it

            try:
                rgb = CIELabColor.from_dicom_value(list(lab)).rgb  # type: ignore[attr-defined]
                out[number] = tuple(int(v) for v in rgb)  # type: ignore[assignment]
                continue
            except Exception:  # older highdicom: fall back to a fixed palette
                pass
        out[number] = _FALLBACK_COLOURS[(number - 1) % len(_FALLBACK_COLOURS)]
    return out


def render(seg_path: str, source_paths: list[str]) -> bytes:
    """PNG bytes: CT window W400/L40, segments blended in their display colours."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]
    order = sorted(
        range(len(headers)),
        key=lambda i: float(getattr(headers[i], "ImagePositionPatient", [0, 0, i])[2]),
    )
    uids = [str(headers[i].SOPInstanceUID) for i in order]
    seg = pydicom.dcmread(seg_path)
    labels, _names = seg_label_map(seg, uids)
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    z = int(np.argmax(counts))
    ds = pydicom.dcmread(source_paths[order[z]])
    hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0)
    )
    low = WINDOW_LEVEL - WINDOW_WIDTH / 2
    grey = np.clip((hu - low) / WINDOW_WIDTH * 255.0, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    plane = labels[z]
    for number, colour in _colours(seg).items():
        mask = plane == number
        if mask.any():
            rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * np.array(colour, np.float32)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def preview_png(db: Database, result_id: int, cache_dir: Path) -> bytes:
    """The cached preview of one result, rendered on first request."""
    with db.session() as s:
        result = s.get(Result, result_id)
        if result is None:
            raise PreviewError(f"result {result_id} does not exist")
        seg_path, sop_uid = result.path, result.sop_uid
        sources = list(
            s.scalars(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.series_uid == result.source_series_uid)
            )
        )
    cached = Path(cache_dir) / f"{sop_uid}.png"
    if cached.exists():
        return cached.read_bytes()
    if not sources or not Path(seg_path).exists():
        raise PreviewError(f"result {result_id}: SEG or source series files are gone")
    png = render(seg_path, sources)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(cached)
    return png
