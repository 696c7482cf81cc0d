"""A STOW-RS request body read part by part as it arrives (PS3.18 10.5.1, RFC 2387).

The body is ``multipart/related; type="application/dicom"``: one encoded DICOM file per
part. ``python_multipart.MultipartParser`` (the streaming parser Starlette itself uses,
which finds boundaries with ``bytes.find``) splits the stream; this module collects each
part: the first ``memory_bytes`` in memory, the rest in an anonymous temporary file in
the spool's folder (``tempfile.TemporaryFile``: no name on disk, so a killed node leaves
nothing behind, and the spool's disk rather than a RAM-backed ``/tmp`` takes a large
part). A part is handed over only once its closing boundary arrived: a body that breaks
off yields nothing of its last part. While the body is read, a request holds one part's
first ``memory_bytes`` plus the parser's chunk, whatever the number or size of the parts;
a complete part is then read back once to be checked and spooled (held in memory for that
moment, as the listener holds an instance it received). A part larger than
``max_part_bytes`` is read to its end but not kept.
"""

from __future__ import annotations

import contextlib
import errno
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

# Part bytes kept in memory before they go to a temporary file (a 512 x 512 CT image is
# about 0.5 MiB and never touches the disk twice).
MEMORY_BYTES = 1 << 20
# Bytes of each part kept to name a part that is not stored (its SOP Class and Instance
# UIDs come first in the data set).
HEAD_BYTES = 64 * 1024
DICOM = "application/dicom"


# Value representations the first element of a file meta group (0002,xxxx) has.
_META_VRS = {b"UL", b"OB", b"UI"}


def with_preamble(data: bytes) -> bytes:
    """A part's DICOM file with the 128-byte preamble and ``DICM`` prefix of PS3.10 7.1.

    pydicom's ``dcmwrite`` of a data set that has no preamble (one made in memory, e.g.
    by highdicom) writes the file meta group without them, and dicomweb-client sends such
    bytes as they are; the node adds them (zero bytes, the prefix) so that its spool only
    holds PS3.10 files. Anything else is returned unchanged.
    """
    if data[128:132] == b"DICM":
        return data
    if data[:2] == b"\x02\x00" and data[4:6] in _META_VRS:
        return bytes(128) + b"DICM" + data
    return data


class UnsupportedMediaType(ValueError):
    """The request is not ``multipart/related`` of ``application/dicom`` (HTTP 415)."""


class MalformedBody(ValueError):
    """The multipart body cannot be parsed (HTTP 400); earlier parts were handed over."""


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary of a STOW-RS request's Content-Type.

    Raises ``UnsupportedMediaType`` for another media type, or a ``type`` parameter other
    than ``application/dicom`` (the metadata + bulk data form, ``application/dicom+json``
    or ``+xml``, is not supported); ``MalformedBody`` when the boundary is missing or
    longer than RFC 2046's 70 characters. A missing ``type`` is taken as
    ``application/dicom`` (each part's own Content-Type is checked).
    """
    media, params = parse_options_header(content_type or "")
    media_type = media.decode("latin-1").lower()
    if media_type != "multipart/related":
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'} is not supported: STOW-RS takes "
            f'multipart/related; type="{DICOM}"'
        )
    kind = params.get(b"type", DICOM.encode()).decode("latin-1").lower()
    if kind != DICOM:
        raise UnsupportedMediaType(
            f'multipart/related; type="{kind}" is not supported: only type="{DICOM}" '
            "(one DICOM file per part)"
        )
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 70:
        raise MalformedBody(
            "the Content-Type has no boundary parameter"
            if not boundary
            else "the multipart boundary is longer than 70 characters (RFC 2046)"
        )
    return boundary


@dataclass
class Part:
    """One complete part of the body, its data in memory or in a temporary file.

    ``index`` counts from 1 in body order. ``problem``: why the part's data is not all
    here (larger than allowed, the temporary file could not be written; ``disk_full``
    says whether that was a full disk); such a part keeps only ``head``.
    """

    index: int
    content_type: str | None = None
    size_bytes: int = 0
    problem: str | None = None
    disk_full: bool = False
    head: bytes = b""
    _memory: bytearray = field(default_factory=bytearray)
    _file: IO[bytes] | None = None

    @property
    def media_type(self) -> str | None:
        """The part's media type without parameters, lower case (None: not given)."""
        if self.content_type is None:
            return None
        return parse_options_header(self.content_type)[0].decode("latin-1").lower() or None

    def data(self) -> bytes:
        """The part's bytes (read back from its temporary file where it spilled).
        Raises ``ValueError`` for a part with a ``problem``."""
        if self.problem is not None:
            raise ValueError(f"part {self.index}: {self.problem}")
        if self._file is None:
            return bytes(self._memory)
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        """Drop the part's data (its temporary file disappears with it)."""
        self._memory = bytearray()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class PartReader:
    """Feeds the body's chunks to the multipart parser and hands over complete parts.

    ``spill_dir``: where parts beyond ``memory_bytes`` go (a folder on the spool's disk);
    ``max_part_bytes``: larger parts are read to their end but not kept (``problem``).
    """

    def __init__(
        self,
        boundary: bytes,
        spill_dir: Path,
        max_part_bytes: int,
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        self.spill_dir = Path(spill_dir)
        self.max_part_bytes = max_part_bytes
        self.memory_bytes = memory_bytes
        self.parts_seen = 0
        self.body_bytes = 0
        self._done: list[Part] = []
        self._current: Part | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._ended = False
        self.error: MalformedBody | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    # -- feeding ---------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> list[Part]:
        """Parse the next chunk of the body; returns the parts it completed, in order
        (the caller owns them and must ``close`` each). After a syntax error (``error``)
        the rest of the body is ignored; parts completed before it are still returned."""
        self.body_bytes += len(chunk)
        if chunk and not self._ended and self.error is None:
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                self.close()
                where = f"in part {self.parts_seen}" if self.parts_seen else "at its start"
                self.error = MalformedBody(f"the multipart body cannot be parsed {where}: {exc}")
        done, self._done = self._done, []
        return done

    def finish(self) -> None:
        """The body ended: raises ``MalformedBody`` for a syntax error, a body that ended
        inside a part or before the closing boundary (the unfinished part is dropped), or
        one that held no part at all."""
        state = self._parser.state
        self.close()
        if self.error is not None:
            raise self.error
        if not self._ended or state != MultipartState.END:
            where = (
                f"inside part {self.parts_seen}" if self.parts_seen else "before the first boundary"
            )
            raise MalformedBody(
                f"the multipart body ended {where}, without its closing boundary "
                f"(after {self.body_bytes} bytes)"
            )
        if self.parts_seen == 0:
            raise MalformedBody("the multipart body holds no part")

    def close(self) -> None:
        """Drop the part being read (a request that ends early)."""
        if self._current is not None:
            self._current.close()
            self._current = None

    # -- parser callbacks ------------------------------------------------------------------
    def _part_begin(self) -> None:
        self.parts_seen += 1
        self._current = Part(self.parts_seen)
        self._headers = {}

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        if self._current is not None:
            self._current.content_type = self._headers.get("content-type")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None or end <= start:
            return
        piece = memoryview(data)[start:end]
        before = part.size_bytes
        part.size_bytes += len(piece)
        if before < HEAD_BYTES:
            part.head += bytes(piece[: HEAD_BYTES - before])
        if part.problem is not None:
            return  # read to its end, not kept
        if part.size_bytes > self.max_part_bytes:
            part.problem = (
                f"the part is larger than {self.max_part_bytes} bytes (web.stow_max_instance_bytes)"
            )
            part.close()
            return
        try:
            if part._file is None and part.size_bytes <= self.memory_bytes:
                part._memory += piece
                return
            if part._file is None:
                part._file = tempfile.TemporaryFile(dir=self.spill_dir)  # noqa: SIM115
                part._file.write(part._memory)
                part._memory = bytearray()
            part._file.write(piece)
        except OSError as exc:
            part.disk_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            part.problem = f"the part could not be buffered on the spool's disk: {exc}"
            part.close()

    def _part_end(self) -> None:
        part, self._current = self._current, None
        if part is None:
            return
        if part._file is not None:
            try:
                part._file.flush()
            except OSError as exc:
                part.disk_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                part.problem = f"the part could not be buffered on the spool's disk: {exc}"
                part.close()
        self._done.append(part)

    def _end(self) -> None:
        self._ended = True
