"""Does an image's pixel data hold the image its header declares?

Receive stores what the sender sent, byte for byte; this check runs where a series is read
as a volume (``inference.volume.load_series``), before any decoder sees the files. A
decoder given pixel data that does not match the header does not always say so: measured
with the decoders this node ships (pydicom 3.0, pylibjpeg, pyjpegls, SimpleITK 2.5/GDCM),

- SimpleITK/GDCM reads native PixelData that is shorter or longer than Rows x Columns
  declares without a word (a 128 x 128 image under Rows/Columns 256 becomes a 256 x 256
  volume of shuffled pixels), decodes an RLE frame cut short, and kills the process
  (SIGFPE) on an RLE header of zeros or (SIGABRT) on a JPEG-LS frame smaller than the
  header says;
- pylibjpeg decodes JPEG-LS and JPEG lossless streams cut in half without an error.

So the check does not trust a decoder to notice. For native transfer syntaxes it is
length arithmetic on the header (PS3.5 8.1.1, 7.1.1): Rows x Columns x SamplesPerPixel x
BitsAllocated / 8 x NumberOfFrames bytes, plus one pad byte when that is odd. For
encapsulated ones (PS3.5 A.4) each frame's codestream header must declare the same
geometry (JPEG and JPEG-LS SOF, JPEG 2000 SIZ: rows, columns, components, precision) and
the codestream must be complete (it ends with its EOI / EOC marker); RLE frames (PS3.5
Annex G) are decoded in full by pylibjpeg-rle, which is strict and ~15x faster than GDCM
on them. JPEG, JPEG-LS and JPEG 2000 frames are then decoded once, by GDCM in the volume
reader, which refuses the damaged streams pylibjpeg lets through; ``undecodable`` names
the instance when it does. Decoding those frames twice would double the read time for a
check the codestream header and GDCM already make.

The header itself must be consistent (PS3.3 C.7.6.3, PS3.5 8.1.1): BitsStored at most
BitsAllocated, HighBit = BitsStored - 1, PixelRepresentation 0 or 1, and a greyscale image
(SamplesPerPixel 1, MONOCHROME1/2), the only kind the models read.

Known limit: a JPEG lossless (process 14) stream cut inside its entropy-coded data and
closed with a new EOI marker decodes without an error in GDCM and pylibjpeg alike; no
decoder available here reports it, so this check cannot either.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

NATIVE_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
    | {DeflatedExplicitVRLittleEndian}
)
JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})
JPEG_2000_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
RLE_SYNTAXES = frozenset({RLELossless})
READABLE_SYNTAXES = (
    NATIVE_SYNTAXES | JPEG_SYNTAXES | JPEG_LS_SYNTAXES | JPEG_2000_SYNTAXES | RLE_SYNTAXES
)

PIXEL_DATA_TAG = 0x7FE00010
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# ISO 10918-1 B.1.1.3 start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames);
# ISO 14495-1 C.2.2: SOF55 (FFF7) starts a JPEG-LS frame.
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_LS_SOF = frozenset({0xF7})
_EOI = b"\xff\xd9"  # JPEG / JPEG-LS end of image; JPEG 2000 EOC has the same code
NO_PIXEL_DATA = "there is no complete PixelData (7FE0,0010): missing, or the file ends inside it"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class PixelDataError(ValueError):
    """One instance's pixel data cannot be decoded to the image its header declares.

    ``problems`` lists every inconsistency found; the message names the SOP Instance UID
    and the file.
    """

    def __init__(self, sop_uid: str, path: str, problems: Sequence[str]) -> None:
        self.sop_uid, self.path, self.problems = sop_uid, path, list(problems)
        super().__init__(f"instance {sop_uid} ({path}): " + "; ".join(self.problems))


@dataclass(frozen=True)
class PixelLayout:
    """The image an Image Pixel module declares (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    pixel_representation: int
    frames: int
    photometric: str

    @property
    def samples_stored(self) -> int:
        """Samples per pixel as stored natively: YBR_FULL_422 keeps 2 (PS3.3 C.7.6.3.1.2)."""
        return 2 if self.photometric == "YBR_FULL_422" else self.samples_per_pixel

    @property
    def expected_bytes(self) -> int:
        """Bytes of native pixel data for all frames, before the even-length pad."""
        bits = self.rows * self.columns * self.samples_stored * self.frames
        return (bits * self.bits_allocated + 7) // 8

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """The shape of one decoded frame (pydicom's convention)."""
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)

    def describe(self) -> str:
        frames = "1 frame" if self.frames == 1 else f"{self.frames} frames"
        return (
            f"Rows {self.rows} x Columns {self.columns} x SamplesPerPixel "
            f"{self.samples_per_pixel} x BitsAllocated {self.bits_allocated} bits x {frames}"
        )


def _int_value(ds: Any, keyword: str, problems: list[str], default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is not None:
            return default
        problems.append(f"{keyword} is missing")
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        problems.append(f"{keyword} {value!r} is not one integer")
        return -1


def declared_layout(ds: Any, model_input: bool = True) -> tuple[PixelLayout | None, list[str]]:
    """The layout ``ds`` declares and what is inconsistent in it (PS3.3 C.7.6.3.1,
    PS3.5 8.1.1); the layout is None when an attribute it needs is missing or unusable.

    ``model_input``: the image is to be read as part of a CT volume, so it must also be
    greyscale in 8, 16 or 32 bits; other images of a series (a dose screen in RGB, say)
    need only be consistent.
    """
    problems: list[str] = []
    rows = _int_value(ds, "Rows", problems)
    columns = _int_value(ds, "Columns", problems)
    samples = _int_value(ds, "SamplesPerPixel", problems)
    allocated = _int_value(ds, "BitsAllocated", problems)
    stored = _int_value(ds, "BitsStored", problems)
    high_bit = _int_value(ds, "HighBit", problems)
    representation = _int_value(ds, "PixelRepresentation", problems)
    frames = _int_value(ds, "NumberOfFrames", problems, default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        problems.append("PhotometricInterpretation is missing")
    if problems:
        return None, problems
    if rows < 1 or columns < 1:
        problems.append(f"Rows {rows} x Columns {columns} is an empty image")
    if frames < 1:
        problems.append(f"NumberOfFrames {frames} is less than 1")
    if model_input and allocated not in (8, 16, 32):
        problems.append(
            f"BitsAllocated {allocated} is not 8, 16 or 32 (the greyscale images the node reads)"
        )
    elif allocated < 1 or (allocated != 1 and allocated % 8):
        problems.append(f"BitsAllocated {allocated} is not 1 or a multiple of 8 (PS3.5 8.1.1)")
    if not 1 <= stored <= allocated:
        problems.append(f"BitsStored {stored} does not fit BitsAllocated {allocated}")
    if high_bit != stored - 1:
        problems.append(f"HighBit {high_bit} is not BitsStored {stored} - 1 (PS3.3 C.7.6.3)")
    if representation not in (0, 1):
        problems.append(f"PixelRepresentation {representation} is neither 0 nor 1")
    if samples < 1:
        problems.append(f"SamplesPerPixel {samples} is less than 1")
    elif model_input and (samples != 1 or photometric not in GREYSCALE):
        problems.append(
            f"SamplesPerPixel {samples} with PhotometricInterpretation {photometric}: not a "
            "greyscale image (1 sample per pixel, MONOCHROME1 or MONOCHROME2; PS3.3 "
            "C.7.6.3.1.2), the only kind the models read"
        )
    layout = PixelLayout(
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        bits_allocated=allocated,
        bits_stored=stored,
        high_bit=high_bit,
        pixel_representation=representation,
        frames=frames,
        photometric=photometric,
    )
    usable = min(rows, columns, frames, samples, allocated) > 0
    return (layout if usable else None), problems


def check_instance(
    path: str | Path, header: pydicom.Dataset | None = None, model_input: bool = True
) -> None:
    """Raise ``PixelDataError`` unless the pixel data of the file at ``path`` can be decoded
    to exactly the image its header declares.

    ``header`` is the file's dataset read with ``stop_before_pixels`` (it saves a read);
    native files are then checked without reading their pixels. ``model_input``: see
    ``declared_layout``.
    """
    path = str(path)
    problems = instance_problems(path, header, model_input)
    if problems:
        uid = header.get("SOPInstanceUID", None) if header is not None else None
        if uid is None:
            uid = _sop_uid(path)
        raise PixelDataError(str(uid), path, problems)


def instance_problems(
    path: str | Path, header: pydicom.Dataset | None = None, model_input: bool = True
) -> list[str]:
    """What keeps the pixel data of ``path`` from being the image its header declares
    (empty when nothing does); see the module docstring for the rules. Not for model
    input, a dataset without Rows and Columns is no image and has nothing to check."""
    path = str(path)
    if header is None:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            return [f"the file cannot be read as DICOM: {exc}"]
    meta = getattr(header, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:
        return ["the file has no TransferSyntaxUID (0002,0010)"]
    if not model_input and "Rows" not in header and "Columns" not in header:
        return []
    if syntax not in READABLE_SYNTAXES:
        return [f"transfer syntax {syntax} ({syntax.name}) is not one the node decodes"]
    layout, problems = declared_layout(header, model_input)
    if layout is None:
        return problems
    if syntax in NATIVE_SYNTAXES:
        problems += _native_problems(path, syntax, layout)
    else:
        problems += _encapsulated_problems(path, syntax, layout, decode_rle=not problems)
    return problems


def check_files(
    files: Sequence[str],
    headers: Sequence[pydicom.Dataset | None],
    model_input: bool = True,
) -> None:
    """``check_instance`` for every file (a header may be None: read from the file);
    raises ``PixelDataError`` for the first damaged one, its message also counting (and
    naming up to three of) the others."""
    errors: list[PixelDataError] = []
    for path, header in zip(files, headers, strict=True):
        try:
            check_instance(path, header, model_input)
        except PixelDataError as exc:
            errors.append(exc)
    if not errors:
        return
    first = errors[0]
    problems = list(first.problems)
    if len(errors) > 1:
        others = ", ".join(e.sop_uid for e in errors[1:4])
        more = ", ..." if len(errors) > 4 else ""
        problems.append(
            f"{len(errors) - 1} more of the {len(files)} instances are damaged too ({others}{more})"
        )
    raise PixelDataError(first.sop_uid, first.path, problems)


# -- native pixel data ---------------------------------------------------------------------


def _native_problems(path: str, syntax: str, layout: PixelLayout) -> list[str]:
    expected = layout.expected_bytes
    allowed = (expected, expected + 1) if expected % 2 else (expected,)
    length = _last_element_length(path, syntax, allowed)
    if length is None:  # not the common layout: parse the file for the element
        try:
            length = _pixel_data_length(path)
        except Exception as exc:
            return [f"the file cannot be parsed up to its PixelData: {exc}"]
    if length is None:
        return [NO_PIXEL_DATA]
    if length == 0xFFFFFFFF:
        return [
            f"PixelData is encapsulated (undefined length) but transfer syntax {syntax.name} "
            "is native (PS3.5 A.4)"
        ]
    if length in allowed:
        return []
    held = length * 8 // (layout.bits_allocated * layout.samples_stored * layout.frames)
    side = int(round(held**0.5))
    square = f": {side} x {side}" if side * side == held and held else ""
    return [
        f"PixelData holds {length} bytes ({held} pixels{square}) but {layout.describe()} "
        f"needs {expected} bytes (PS3.5 8.1.1), "
        + ("short" if length < expected else "long")
        + f" by {abs(length - expected)}"
    ]


def _last_element_length(path: str, syntax: str, lengths: Sequence[int]) -> int | None:
    """One of ``lengths`` when the file ends with a PixelData element of exactly that
    length (the usual layout), read from its 8- or 12-byte element header; else None.

    Only a seek and a read: a series of 300 files costs milliseconds instead of a second
    parse of every header.
    """
    if syntax == DeflatedExplicitVRLittleEndian:
        return None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            for length in lengths:
                for header in _pixel_headers(syntax, length):
                    start = size - length - len(header)
                    if start < 132:  # preamble + DICM
                        continue
                    f.seek(start)
                    if f.read(len(header)) == header:
                        return length
    except OSError:
        return None
    return None


def _pixel_headers(syntax: str, length: int) -> list[bytes]:
    """The encodings of a PixelData element header with ``length`` (PS3.5 7.1.2, 7.1.3)."""
    if syntax == ImplicitVRLittleEndian:
        return [struct.pack("<HHI", 0x7FE0, 0x0010, length)]
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    return [struct.pack(f"{order}HH2sHI", 0x7FE0, 0x0010, vr, 0, length) for vr in (b"OW", b"OB")]


def _pixel_data_length(path: str) -> int | None:
    """The value length of PixelData (0xFFFFFFFF: encapsulated); None if absent.

    The slow path (a full read), for files that do not end with the element.
    """
    ds = pydicom.dcmread(path)
    if PIXEL_DATA_TAG not in ds:
        return None
    elem = ds[PIXEL_DATA_TAG]
    return 0xFFFFFFFF if elem.is_undefined_length else len(elem.value or b"")


# -- encapsulated pixel data ---------------------------------------------------------------


def _encapsulated_problems(
    path: str, syntax: Any, layout: PixelLayout, *, decode_rle: bool
) -> list[str]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        return [f"the file cannot be read: {exc}"]
    if PIXEL_DATA_TAG not in ds:
        return [NO_PIXEL_DATA]
    elem = ds[PIXEL_DATA_TAG]
    if not elem.is_undefined_length:
        return [
            f"PixelData is not encapsulated (it has a defined length) but transfer syntax "
            f"{syntax.name} is compressed (PS3.5 A.4)"
        ]
    try:
        frames = list(generate_frames(elem.value, number_of_frames=layout.frames))
    except Exception as exc:
        return [f"the encapsulated PixelData items cannot be parsed (PS3.5 A.4): {exc}"]
    if len(frames) != layout.frames:
        return [f"PixelData holds {len(frames)} frames, NumberOfFrames says {layout.frames}"]
    problems: list[str] = []
    for index, frame in enumerate(frames):
        where = "the frame" if layout.frames == 1 else f"frame {index + 1}"
        if syntax in RLE_SYNTAXES:
            found = _rle_header_problems(frame, layout)
            if not found and decode_rle:
                found = _decode_problems(ds, index, layout)
        elif syntax in JPEG_2000_SYNTAXES:
            found = _j2k_problems(frame, layout)
        else:
            sof = _JPEG_LS_SOF if syntax in JPEG_LS_SYNTAXES else _JPEG_SOF
            found = _jpeg_problems(frame, layout, sof, "JPEG-LS" if sof is _JPEG_LS_SOF else "JPEG")
        problems += [f"{where}: {p}" for p in found]
    return problems


def _geometry_problems(
    codec: str, rows: int, columns: int, components: int, precision: int, layout: PixelLayout
) -> list[str]:
    problems = []
    if (rows, columns) != (layout.rows, layout.columns):
        problems.append(
            f"the {codec} codestream is {rows} x {columns} pixels but Rows x Columns is "
            f"{layout.rows} x {layout.columns}"
        )
    if components != layout.samples_per_pixel:
        problems.append(
            f"the {codec} codestream has {components} components but SamplesPerPixel is "
            f"{layout.samples_per_pixel}"
        )
    if not 1 <= precision <= layout.bits_allocated:
        # Precision below BitsStored is left alone: encoders write the bits the values
        # need, and decoders widen them. More bits than allocated cannot be held.
        problems.append(
            f"the {codec} codestream has {precision}-bit samples, more than BitsAllocated "
            f"{layout.bits_allocated}"
        )
    return problems


def _ends_complete(frame: bytes) -> bool:
    """The codestream ends with EOI/EOC, after any trailing pad bytes (00 or FF)."""
    return frame.rstrip(b"\x00\xff").endswith(_EOI)


def _jpeg_problems(frame: bytes, layout: PixelLayout, sof: frozenset[int], codec: str) -> list[str]:
    """ISO 10918-1 / 14495-1 codestream: SOI, a frame header matching the layout, EOI."""
    if frame[:2] != b"\xff\xd8":
        return [f"not a {codec} codestream (no SOI marker FFD8 at its start: {frame[:4].hex()})"]
    header = _jpeg_frame_header(frame, sof)
    if isinstance(header, str):
        return [f"{codec} codestream {header}"]
    precision, rows, columns, components = header
    problems = _geometry_problems(codec, rows, columns, components, precision, layout)
    if not _ends_complete(frame):
        problems.append(
            f"the {codec} codestream is truncated (it does not end with an EOI marker FFD9; "
            f"its last bytes are {frame[-4:].hex()})"
        )
    return problems


def _jpeg_frame_header(frame: bytes, sof: frozenset[int]) -> tuple[int, int, int, int] | str:
    """(precision, rows, columns, components) of the first frame header, or a problem."""
    i = 2
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return f"has no marker at byte {i} (0x{frame[i]:02x})"
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            return "reaches its scan or end before a frame header (SOF)"
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in sof:
            body = frame[i + 4 : i + 10]
            if len(body) < 6:
                return "ends inside its frame header (SOF)"
            return (
                body[0],
                int.from_bytes(body[1:3], "big"),
                int.from_bytes(body[3:5], "big"),
                body[5],
            )
        if length < 2:
            return f"has a marker segment FF{marker:02X} of impossible length {length}"
        i += 2 + length
    return "ends before a frame header (SOF)"


def _j2k_problems(frame: bytes, layout: PixelLayout) -> list[str]:
    """ISO 15444-1 codestream (A.5.1): SOC, then SIZ matching the layout, EOC at the end."""
    start = 0
    if frame.startswith(_JP2_SIGNATURE):  # a JP2 file instead of a bare codestream
        start = frame.find(b"\xff\x4f\xff\x51")
        if start < 0:
            return ["JP2 file without a JPEG 2000 codestream"]
    code = frame[start:]
    if code[:4] != b"\xff\x4f\xff\x51":
        return [f"not a JPEG 2000 codestream (no SOC + SIZ markers at its start: {code[:4].hex()})"]
    if len(code) < 43:
        return ["the JPEG 2000 codestream ends inside its SIZ marker segment"]
    x, y, x0, y0 = struct.unpack(">IIII", code[8:24])
    components = int.from_bytes(code[40:42], "big")
    precision = (code[42] & 0x7F) + 1
    problems = _geometry_problems("JPEG 2000", y - y0, x - x0, components, precision, layout)
    if not _ends_complete(code):
        problems.append(
            "the JPEG 2000 codestream is truncated (it does not end with an EOC marker FFD9; "
            f"its last bytes are {code[-4:].hex()})"
        )
    return problems


def _rle_header_problems(frame: bytes, layout: PixelLayout) -> list[str]:
    """PS3.5 G.5: a 64-byte header (segment count, 15 offsets), one segment per byte of a
    sample, segments in order inside the frame."""
    if len(frame) < 64:
        return [f"the RLE frame has {len(frame)} bytes, less than its 64-byte header"]
    count, *offsets = struct.unpack("<16I", frame[:64])
    expected = layout.samples_per_pixel * layout.bits_allocated // 8
    if count != expected:
        return [
            f"the RLE header declares {count} segments but SamplesPerPixel "
            f"{layout.samples_per_pixel} x BitsAllocated {layout.bits_allocated} needs "
            f"{expected} (PS3.5 G.2)"
        ]
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:], strict=False)):
        return [f"the RLE segment offsets {used} are not increasing from 64 (PS3.5 G.5)"]
    if used[-1] >= len(frame):
        return [f"the RLE segment offsets {used} point past the frame's {len(frame)} bytes"]
    return []


def _decode_problems(ds: pydicom.Dataset, index: int, layout: PixelLayout) -> list[str]:
    """Decode frame ``index`` with the strictest plugin and compare its shape."""
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    plugins = decoder.available_plugins
    plugin = "pylibjpeg" if "pylibjpeg" in plugins else (plugins[0] if plugins else "")
    try:
        array, _ = decoder.as_array(ds, index=index, decoding_plugin=plugin)
    except Exception as exc:
        return [f"cannot be decoded: {_last_line(exc)}"]
    except BaseException as exc:  # pyo3 decoders panic with a BaseException
        if type(exc).__name__ != "PanicException":
            raise
        return [f"cannot be decoded: the decoder failed ({_last_line(exc)})"]
    if np.shape(array) != layout.frame_shape:
        return [f"decodes to {np.shape(array)}, not {layout.frame_shape}"]
    return []


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _sop_uid(path: str) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPInstanceUID", "?"))
    except Exception:
        return "?"
