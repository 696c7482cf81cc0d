"""Durable instance storage: ``spool/<study>/<series>/<sop>.dcm``.

An instance is written to a temporary file, fsynced, then renamed into place (and the
folder fsynced), so a file under its final name is always complete. Only after that does
the SCP answer success. A re-sent instance atomically replaces the earlier file.

The caller's thread writes and syncs. A helper thread that wrote and synced a file while
the listener read its header (the design until 2026-11) saved nothing: the helper needs
the interpreter lock back after each system call and got it only when the listener
stopped parsing, so the sync ran after the parse anyway, plus two thread hand-overs per
instance (~0.25 ms of CPU) and a timing that varied from run to run (bench/README.md,
"Receive throughput").
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kernel.uids import require_uid

Buffer = Any  # bytes, bytearray or memoryview (collections.abc.Buffer from Python 3.12)
# How long the free space read from the file system is used (less what was written).
_FREE_SPACE_TTL_S = 0.5


class SpoolFullError(OSError):
    """Free space is below the watermark (or the disk is full): nothing was written."""


class Spool:
    """``tmp_name``: the temporary folder under the spool (one per receiving process, so
    that a process starting up removes only its own leftovers); ``clean``: remove
    leftovers at once (never acknowledged: their senders resend them)."""

    def __init__(
        self,
        root: Path,
        min_free_bytes: int = 0,
        fsync: bool = True,
        tmp_name: str = ".incoming",
        clean: bool = True,
    ) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        # False only where a battery-backed write cache makes the OS cache durable.
        self.fsync = fsync
        self.tmp_dir = self.root / tmp_name
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._free, self._free_at = 0, -_FREE_SPACE_TTL_S - 1.0
        self._free_lock = threading.Lock()
        # Temporary names: this process's token and a counter (no system call per name).
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._names = itertools.count()
        if clean:
            self.remove_stale_temp_files(every_process=tmp_name == ".incoming")

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
        """Raise ``SpoolFullError`` when writing ``incoming_bytes`` would leave less than
        ``min_free_bytes``. The free space is asked of the file system at most every
        ``_FREE_SPACE_TTL_S`` (less what this spool wrote since) and always again
        before a refusal."""
        now = time.monotonic()
        with self._free_lock:
            if now - self._free_at > _FREE_SPACE_TTL_S:
                self._free, self._free_at = self.free_bytes(), now
            if self._free - incoming_bytes < self.min_free_bytes:
                self._free, self._free_at = self.free_bytes(), now
            free = self._free
            if free - incoming_bytes < self.min_free_bytes:
                raise SpoolFullError(
                    errno.ENOSPC,
                    f"spool {self.root}: {free} bytes free, watermark {self.min_free_bytes}",
                )
            self._free -= incoming_bytes

    def write(
        self, study_uid: str, series_uid: str, sop_uid: str, data: bytes | Sequence[Buffer]
    ) -> Path:
        """Write one encoded DICOM file durably and return its final path.

        ``data`` is the file's bytes, or its parts in order (written one after the other, so
        the caller need not join them). Raises ``SpoolFullError`` below the watermark
        or on a full disk, ``InvalidUIDError`` for a UID that is no path component, and
        ``OSError`` when the file cannot be written (nothing is left under any name).
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        parts = _parts(data)
        self.check_space(sum(p.nbytes for p in parts))
        tmp = self._temp_name()
        try:
            self._write_temp(tmp, parts)
            self._place(tmp, final)
        except OSError as exc:
            raise self._failed(tmp, exc) from exc
        return final

    def _temp_name(self) -> Path:
        return self.tmp_dir / f"{self._token}-{next(self._names)}.part"

    def _write_temp(self, tmp: Path, parts: list[memoryview]) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write_all(fd, parts)
            if self.fsync:
                os.fdatasync(fd)  # data + size; the folder's fsync covers the name
        finally:
            os.close(fd)

    def _place(self, tmp: Path, final: Path) -> None:
        """The synced temporary file under its final name, the name synced."""
        folder = final.parent
        if folder not in self._known_dirs:
            # Once per series and process: the folder and its entry in the study folder.
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
            self._known_dirs.add(folder)
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(folder)

    def _failed(self, tmp: Path, exc: OSError) -> OSError:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return SpoolFullError(exc.errno, f"spool {self.root}: disk full")
        return exc

    def remove_stale_temp_files(self, every_process: bool = False) -> int:
        """Temp files left by a crash were never acknowledged: the sender will resend.
        ``every_process``: those of every receiving process's temporary folder (the node
        at start, before any receiving process runs), else this one's only."""
        folders = sorted(self.root.glob(".incoming*")) if every_process else [self.tmp_dir]
        count = 0
        for folder in folders:
            for part in folder.glob("*.part"):
                part.unlink(missing_ok=True)
                count += 1
        return count

    def iter_files_in(self, folders: Iterable[Path]) -> Iterator[Path]:
        """The spooled instance files of these series folders (missing ones are empty)."""
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):
                with os.scandir(folder) as entries:
                    names = [e.path for e in entries if e.name.endswith(".dcm")]
                yield from (Path(n) for n in names)

    def iter_files(self) -> Iterator[Path]:
        """Every spooled instance file, ``<study>/<series>/<sop>.dcm`` (for re-indexing
        after a crash); names only, nothing is opened or stat'ed (100,000 files: ~0.2 s)."""
        for study in _subfolders(self.root):
            for series in _subfolders(study.path):
                with os.scandir(series.path) as entries:
                    for entry in entries:
                        if entry.name.endswith(".dcm"):
                            yield Path(entry.path)


# The most buffers one writev takes (POSIX IOV_MAX, 1024 on Linux).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def _parts(data: bytes | Sequence[Buffer]) -> list[memoryview]:
    views = [memoryview(data)] if isinstance(data, bytes | bytearray | memoryview) else data
    return [_bytes_view(v) for v in views]


def _bytes_view(part: Buffer) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _subfolders(path: str | Path) -> list[os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return [
            e for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        ]


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """Write every byte of ``parts`` in order, in one ``writev`` when it is not short (a
    received instance comes as its File Meta Information and ~5 fragments)."""
    pending = [view for view in parts if view.nbytes]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while pending and written >= pending[0].nbytes:
            written -= pending.pop(0).nbytes
        if written:
            pending[0] = pending[0][written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
