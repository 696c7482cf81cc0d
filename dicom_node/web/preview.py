"""Preview PNG of a result: its default viewer slice (``dicom_node.web.viewer``).

The slice with the smallest label present (a tumour rather than the kidney around it),
the SEG's or RTSTRUCT's own display colours over the source in the abdomen window.
Rendered on the server and cached on disk by the result's SOP Instance UID, which
changes whenever its content does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from db.models import Instance, Result, Series
from db.session import Database
from dicom_node.web import viewer
from dicom_node.web.viewer import SourceUnreadableError, VolumeCache

# The names the web app catches (a damaged source answers 409, anything else 404).
PreviewError = viewer.ViewerError
__all__ = ["PreviewError", "SourceUnreadableError", "preview_png", "render", "result_files"]


@dataclass(frozen=True)
class ResultFiles:
    """Where a result and its source series are, and what it is."""

    result_id: int
    sop_uid: str
    path: str
    kind: str
    pipeline: str | None
    source_series_uid: str
    source_paths: list[str]


def result_files(db: Database, result_id: int) -> ResultFiles:
    """The files of result ``result_id``; ``PreviewError`` when it does not exist."""
    with db.session() as s:
        result = s.get(Result, result_id)
        if result is None:
            raise PreviewError(f"result {result_id} does not exist")
        sources = list(
            s.scalars(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.series_uid == result.source_series_uid)
            )
        )
        return ResultFiles(
            result.id,
            result.sop_uid,
            result.path,
            result.kind,
            result.pipeline,
            result.source_series_uid,
            sources,
        )


def render(seg_path: str, source_paths: list[str]) -> bytes:
    """PNG bytes of the default slice of a SEG or RTSTRUCT over its source files."""
    volume = viewer.load(seg_path, source_paths)
    return viewer.render_slice(volume, volume.default_slice)


def preview_png(
    db: Database, result_id: int, cache_dir: Path, volumes: VolumeCache | None = None
) -> bytes:
    """The cached preview of one result, rendered on first request.

    Raises ``PreviewError`` (files gone) or ``SourceUnreadableError`` (damaged source).
    """
    files = result_files(db, result_id)
    cached = Path(cache_dir) / f"{files.sop_uid}.png"
    if cached.exists():
        return cached.read_bytes()
    if volumes is not None:
        volume = volumes.get(files.sop_uid, files.path, files.source_paths)
    else:
        volume = viewer.load(files.path, files.source_paths)
    png = viewer.render_slice(volume, volume.default_slice)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(cached)
    return png
