"""Reading DICOM headers: the few fields the receive path needs from an encoded instance
(rejecting datasets that are corrupt or truncated before anything is written), and the
attributes routing rules see."""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from inference.charsets import declared_value, decode_dataset
from inference.stacks import slice_info
from kernel.uids import InvalidUIDError, accept_uid

_UNDEFINED_LENGTH = 0xFFFFFFFF


class CorruptDatasetError(ValueError):
    """The dataset cannot be parsed, is truncated or lacks identifying UIDs."""


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    instance_number: int | None = None
    series_number: int | None = None
    series_description: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    # The image stack the instance belongs to (inference.stacks), its position along the
    # slice normal (mm) and AcquisitionNumber.
    stack_key: str | None = None
    slice_position_mm: float | None = None
    acquisition_number: int | None = None
    # Why a UID is not conformant but was accepted (leading zeros, ...), one line each.
    uid_problems: tuple[str, ...] = ()


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value not in (None, "") else None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _check_complete(ds: pydicom.Dataset) -> None:
    """pydicom accepts values cut short by a truncated stream; we must not."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != _UNDEFINED_LENGTH
            and raw.value is not None
            and len(raw.value) != raw.length
        ):
            raise CorruptDatasetError(
                f"element {tag} is truncated ({len(raw.value)} of {raw.length} bytes)"
            )


# The text elements ``parse_header`` reads: only these are decoded (decoding every text
# element of a CT header costs ~0.2 ms per instance on the receive path).
_TEXT_TAGS = tuple(
    pydicom.datadict.tag_for_keyword(k)
    for k in (
        "SpecificCharacterSet",
        "StudyDate",
        "AccessionNumber",
        "Modality",
        "StudyDescription",
        "SeriesDescription",
        "PatientName",
        "PatientID",
    )
)


def _decoded_text(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The text elements of ``_TEXT_TAGS``, decoded (``inference.charsets``) in a dataset
    of their own: the same values decoding all of ``ds`` gives them."""
    text = pydicom.Dataset()
    for tag in _TEXT_TAGS:
        if tag in ds:
            text[tag] = ds.get_item(tag)
    decode_dataset(text, recursive=False)
    return text


# Every element ``parse_header`` reads (the rest is skipped, not converted).
_HEADER_TAGS = [
    *_TEXT_TAGS,
    *(
        pydicom.datadict.tag_for_keyword(k)
        for k in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "SOPClassUID",
            "InstanceNumber",
            "SeriesNumber",
            # inference.stacks.slice_info
            "ImageType",
            "ImageOrientationPatient",
            "ImagePositionPatient",
            "Rows",
            "Columns",
            "PixelSpacing",
            "AcquisitionNumber",
        )
    ),
]


_HEADER_TAG_SET = frozenset(_HEADER_TAGS)
# The group number 0x0002 as the first bytes of an element, as the File Meta Information
# (explicit VR little endian, PS3.10 7.1) encodes it.
_GROUP_0002_LE = b"\x02\x00"


def _plain_encoding(transfer_syntax_uid: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax whose data set is read as is:
    every one pydicom knows except the deflated ones (an encapsulated syntax is explicit
    VR little endian, PS3.5 A.4); None for a deflated or private one (full parse)."""
    uid = UID(transfer_syntax_uid)
    if not uid.is_transfer_syntax or uid.is_deflated:
        return None
    return uid.is_implicit_VR, uid.is_little_endian


_SOP_INSTANCE_UID_TAG = Tag(0x0008, 0x0018)


class _ElementEnds:
    """Where the last top-level element read ends (``read_dataset``'s ``stop_when`` sees
    each element's header, the stream standing at its value).

    pydicom ends a data set quietly where fewer than 8 bytes are left for the next
    element's header, so a stream cut inside that header would pass as complete (the
    element, often Pixel Data, then missing). ``check`` refuses bytes left after the last
    whole element unless they are all zero (trailing padding some writers leave)."""

    def __init__(self, fp: io.BytesIO) -> None:
        self.fp = fp
        self.end: int | None = fp.tell()

    def note(self, tag: Any, vr: str | None, length: int) -> bool:
        self.end = None if length == _UNDEFINED_LENGTH else self.fp.tell() + length
        return False  # read on

    def check(self, data: bytes) -> None:
        if self.end is None or self.end >= len(data):
            return  # an item or sequence of undefined length ends by its delimiter
        left = data[self.end :]
        if left.strip(b"\x00"):
            raise CorruptDatasetError(
                f"the data set is truncated: {len(left)} bytes after its last whole "
                f"element (at byte {self.end} of {len(data)}) are not an element"
            )


def _not_group_0002(tag: Any, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


def _dataset_offset(data: bytes) -> int | None:
    """Where the data set of a PS3.10 file starts: after the 128-byte preamble, "DICM" and
    the File Meta Information (explicit VR little endian, PS3.10 7.1), found as pydicom
    finds it: where the group 0002 elements end. Their (0002,0000) Group Length is not
    used: pydicom (and DCMTK) read a file whose group length is wrong or missing, so a
    walk from where that length points would miss a cut last element (or misread one).
    None when the file does not start that way."""
    if data[128:132] != b"DICM":
        return None
    fp = io.BytesIO(data)
    fp.seek(132)
    read_dataset(fp, False, True, stop_when=_not_group_0002)
    return fp.tell()


def _check_last_element(data: bytes, syntax: str) -> None:
    """The listener path's check that no element header is cut short at the end
    (``_ElementEnds``), for a file parsed whole (STOW-RS parts, retrieved instances, a data
    set holding group 0002): its element headers are walked once more, values skipped."""
    encoding = _plain_encoding(syntax)
    offset = _dataset_offset(data)
    if encoding is None or offset is None or offset > len(data):
        return
    fp = io.BytesIO(data)
    fp.seek(offset)
    ends = _ElementEnds(fp)
    read_dataset(fp, *encoding, stop_when=ends.note, specific_tags=[_SOP_INSTANCE_UID_TAG])
    ends.check(data)


def _read_header(data: bytes, known: tuple[str, int] | None = None) -> pydicom.Dataset:
    """The elements of ``_HEADER_TAGS``, with every element of ``data`` checked to be
    complete: an element that is read must hold its whole length (``_check_complete``),
    and one that is skipped must end within the data (a skip past the end is a truncated
    stream). A deflated data set is inflated and read whole.

    ``known``: (transfer syntax UID, offset of the data set in ``data``) when the caller
    wrote the File Meta Information itself (the listener): the data set is read from
    there in that encoding, and the preamble and meta are not parsed again (~0.1 ms of
    the ~0.6 ms a CT header costs). A deflated or private syntax takes the full path,
    and so does a data set that starts with group 0002 elements (a sender that left a
    file's meta in it; group 0002 belongs to the File Meta Information only, PS3.10 7.1):
    pydicom reads them as part of the stored file's meta, its (0002,0010) included, so
    only the full parse reads the data set as the stored file will be read."""
    encoding = _plain_encoding(known[0]) if known is not None else None
    offset = known[1] if known is not None else 0
    if encoding is not None and data[offset : offset + 2] != _GROUP_0002_LE:
        fp = io.BytesIO(data)
        fp.seek(offset)
        implicit, little = encoding
        ends = _ElementEnds(fp)
        ds = read_dataset(fp, implicit, little, stop_when=ends.note, specific_tags=_HEADER_TAG_SET)
        ends.check(data)
    else:
        fp = io.BytesIO(data)
        ds = pydicom.dcmread(fp, specific_tags=_HEADER_TAGS)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax == DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(io.BytesIO(data))
            _check_complete(ds)
            return ds
        _check_last_element(data, str(syntax or ""))
    if fp.tell() > len(data):
        raise CorruptDatasetError(
            f"the data set is truncated ({len(data)} bytes; its last element ends at "
            f"byte {fp.tell()})"
        )
    _check_complete(ds)
    return ds


# -- plain values straight from the bytes ------------------------------------------------
# pydicom's conversion of an element (value classes, validation) costs ~10-25 us; the
# numbers and UIDs the receive path needs are read from the element's bytes instead when
# they are plainly encoded, and converted by pydicom otherwise (an unusual VR, non-ASCII
# bytes, several values where one is expected, anything that does not parse), so the
# result is the same either way. ~0.15 ms of the header's ~0.5 ms.
_PLAIN_INT = re.compile(r" *[+-]?[0-9]+ *\Z")
_TAGS = {pydicom.datadict.keyword_for_tag(tag): Tag(tag) for tag in _HEADER_TAGS}


def _plain_text(ds: pydicom.Dataset, keyword: str, vr: str) -> str | None:
    """The element's bytes as ASCII without trailing padding, if it is still unconverted
    and of ``vr`` (or of no stated VR: implicit VR); else None."""
    raw = ds.get_item(_TAGS[keyword]) if _TAGS[keyword] in ds else None
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.VR not in (vr, None):
        return None
    try:
        return raw.value.decode("ascii").rstrip(" \x00")
    except UnicodeDecodeError:
        return None


def _uid_value(ds: pydicom.Dataset, keyword: str) -> Any:
    text = _plain_text(ds, keyword, "UI")
    return text if text is not None and "\\" not in text else ds.get(keyword)


def _is_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """An IS value as pydicom gives it (conversion errors included)."""
    text = _plain_text(ds, keyword, "IS")
    return int(text) if text is not None and _PLAIN_INT.match(text) else ds.get(keyword)


def _int_value(ds: pydicom.Dataset, keyword: str) -> int | None:
    text = _plain_text(ds, keyword, "IS")
    return int(text) if text is not None and _PLAIN_INT.match(text) else _int(ds, keyword)


def _us_value(ds: pydicom.Dataset, keyword: str) -> Any:
    raw = ds.get_item(_TAGS[keyword]) if _TAGS[keyword] in ds else None
    if isinstance(raw, RawDataElement) and raw.VR in ("US", None) and len(raw.value or b"") == 2:
        return struct.unpack("<H" if raw.is_little_endian else ">H", raw.value)[0]
    return ds.get(keyword)


def _ds_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """A DS value as pydicom gives it (a float, or a list of floats for several; text
    with ``_``, which Python's float reads, is left to pydicom, whose value keeps it for
    ``inference.stacks.ds_float`` to refuse)."""
    text = _plain_text(ds, keyword, "DS")
    if text and "_" not in text:
        try:
            values = [float(part) for part in text.strip().split("\\")]
        except ValueError:
            return ds.get(keyword)
        return values[0] if len(values) == 1 else values
    return ds.get(keyword)


def _stack_fields(ds: pydicom.Dataset) -> SimpleNamespace:
    """What ``inference.stacks.slice_info`` reads, as plain values."""
    image_type = _plain_text(ds, "ImageType", "CS")
    return SimpleNamespace(
        ImageOrientationPatient=_ds_value(ds, "ImageOrientationPatient"),
        ImagePositionPatient=_ds_value(ds, "ImagePositionPatient"),
        PixelSpacing=_ds_value(ds, "PixelSpacing"),
        Rows=_us_value(ds, "Rows"),
        Columns=_us_value(ds, "Columns"),
        AcquisitionNumber=_is_value(ds, "AcquisitionNumber"),
        InstanceNumber=_is_value(ds, "InstanceNumber"),
        ImageType=image_type if image_type is not None else ds.get("ImageType"),
        SOPClassUID=_uid_value(ds, "SOPClassUID"),
    )


def parse_header(
    data: bytes,
    expected_sop_uid: str | None = None,
    *,
    transfer_syntax_uid: str | None = None,
    dataset_offset: int | None = None,
) -> InstanceHeader:
    """Parse an encoded DICOM file (preamble + meta + dataset) without decoding pixels.

    ``transfer_syntax_uid`` and ``dataset_offset``: given together by a caller that wrote
    the File Meta Information (``data[:dataset_offset]``) itself; the data set is then
    read without parsing the meta again (same result).

    UIDs are taken as ``kernel.uids.accept_uid`` accepts them (the reasons a tolerated UID
    is not conformant are in ``uid_problems``). Raises ``CorruptDatasetError`` for a
    dataset that cannot be parsed, is truncated, lacks a usable Study / Series / SOP
    Instance / SOP Class UID, or whose SOP Instance UID differs from ``expected_sop_uid``.
    Only the elements it returns are converted (~0.35 ms for a CT header).
    """
    try:
        known = None
        if transfer_syntax_uid is not None and dataset_offset is not None:
            known = (transfer_syntax_uid, dataset_offset)
        ds = _read_header(data, known)
        text = _decoded_text(ds)  # as its Specific Character Set says
        # As the stored file will be read: from its meta when the full path parsed it.
        meta = getattr(ds, "file_meta", None)
        tsuid = str(meta.TransferSyntaxUID) if meta is not None or known is None else known[0]
        uids, problems = {}, []
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            uids[keyword], problem = accept_uid(_uid_value(ds, keyword), keyword)
            if problem:
                problems.append(problem)
        stack = slice_info(_stack_fields(ds))
        header = InstanceHeader(
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=tsuid,
            modality=_text(text, "Modality"),
            instance_number=_int_value(ds, "InstanceNumber"),
            series_number=_int_value(ds, "SeriesNumber"),
            series_description=_text(text, "SeriesDescription"),
            patient_id=_text(text, "PatientID"),
            patient_name=_text(text, "PatientName"),
            accession_number=_text(text, "AccessionNumber"),
            study_date=_text(text, "StudyDate"),
            study_description=_text(text, "StudyDescription"),
            stack_key=stack.stack_key,
            slice_position_mm=stack.position_mm,
            acquisition_number=stack.acquisition,
            uid_problems=tuple(problems),
        )
    except CorruptDatasetError:
        raise
    except InvalidUIDError as exc:
        raise CorruptDatasetError(str(exc)) from exc
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        AttributeError,
        TypeError,
        struct.error,
        zlib.error,
        OSError,  # pydicom: "No tag to read" in an undefined-length sequence cut short
    ) as exc:
        raise CorruptDatasetError(f"dataset cannot be parsed: {exc}") from exc
    if expected_sop_uid is not None and header.sop_uid != expected_sop_uid.strip("\x00 "):
        raise CorruptDatasetError(
            f"SOPInstanceUID {header.sop_uid} differs from the request's {expected_sop_uid}"
        )
    return header


def header_attributes(path: str | Path) -> dict[str, Any]:
    """Top-level DICOM attributes of one file by keyword (pixel data not read); text is
    decoded as its Specific Character Set says (``inference.charsets``), which keeps the
    value the file declares."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    declared = declared_value(ds)
    decode_dataset(ds, recursive=False)
    attrs: dict[str, Any] = {}
    for elem in ds:
        if not elem.keyword or elem.VR == "SQ":
            continue
        value = elem.value
        if isinstance(value, pydicom.multival.MultiValue):
            value = [str(v) for v in value]
        elif isinstance(value, bytes):
            continue
        elif not isinstance(value, int | float | str):
            value = str(value)
        attrs[elem.keyword] = value
    if declared is not None:
        attrs["SpecificCharacterSet"] = declared
    return attrs
