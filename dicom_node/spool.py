"""Durable instance storage: ``spool/<study>/<series>/<sop>.dcm``.

An instance is written to a temporary file, fsynced, then renamed into place (and the
folder fsynced), so a file under its final name is always complete. Only after that does
the SCP answer success. A re-sent instance atomically replaces the earlier file.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from kernel.uids import require_uid


class SpoolFullError(OSError):
    """Free space is below the watermark (or the disk is full): nothing was written."""


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0, fsync: bool = True) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        # False only where a battery-backed write cache makes the OS cache durable.
        self.fsync = fsync
        self.tmp_dir = self.root / ".incoming"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self.remove_stale_temp_files()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path of an instance; raises InvalidUIDError for a bad UID."""
        return (
            self.root
            / require_uid(study_uid, "StudyInstanceUID")
            / require_uid(series_uid, "SeriesInstanceUID")
            / f"{require_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        )

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int = 0) -> None:
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise SpoolFullError(
                errno.ENOSPC,
                f"spool {self.root}: {free} bytes free, watermark {self.min_free_bytes}",
            )

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one encoded DICOM file durably and return its final path."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        self.check_space(len(data))
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fdatasync(fd)  # data + size; the dir fsync below covers the name
            finally:
                os.close(fd)
            folder = final.parent
            if folder not in self._known_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                _fsync_dir(folder.parent)
                _fsync_dir(folder.parent.parent)
                self._known_dirs.add(folder)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(exc.errno, f"spool {self.root}: disk full") from exc
            raise
        return final

    def remove_stale_temp_files(self) -> int:
        """Temp files left by a crash were never acknowledged: the sender will resend."""
        count = 0
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
            count += 1
        return count

    def iter_files(self):
        """Every spooled instance file (for re-indexing after a crash)."""
        for study in self.root.iterdir():
            if study.name.startswith(".") or not study.is_dir():
                continue
            yield from study.glob("*/*.dcm")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
