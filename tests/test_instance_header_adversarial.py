"""parse_header against odd but real encodings: the listener's path (the data set read
from where the node's own File Meta Information ends) must give what the full parse of
the same bytes gives, and whatever cannot be parsed must come out as CorruptDatasetError
(the receive path answers 0xC000, retrieval reports it), never as another exception."""

from __future__ import annotations

import struct

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from dicom_node.instance import CorruptDatasetError, parse_header
from dicom_node.store_path import file_meta
from tests.dicom_factory import ct_slice


def _data_set(syntax: str) -> tuple[pydicom.Dataset, bytes]:
    ds = ct_slice(generate_uid(), generate_uid(), 3, rows=4)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    ds.PatientName = "Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7"
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buf, ds)
    return ds, buf.getvalue()


def _transfer_syntax_element(uid: str) -> bytes:
    """(0002,0010) Transfer Syntax UID, explicit VR little endian, as a sender that leaves
    a file's meta in the data set it sends encodes it."""
    value = uid.encode("ascii") + b"\x00" * (len(uid) % 2)
    return struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value


def _outcome(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except CorruptDatasetError:
        return CorruptDatasetError


@pytest.mark.parametrize(
    "embedded", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit]
)
def test_file_meta_elements_in_the_data_set_are_read_as_the_stored_file_is(embedded):
    """A data set that carries a (0002,0010) of its own (a forwarder that left the
    original file's meta in what it sends; group 0002 belongs only to the File Meta
    Information, PS3.10 7.1): the spooled file, read by pydicom, takes that Transfer
    Syntax UID as the file's. The listener's path must decide as that full parse does,
    not accept an instance whose stored file reads as another encoding (or not at all)."""
    syntax = ExplicitVRLittleEndian
    ds, body = _data_set(syntax)
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    data = meta + _transfer_syntax_element(embedded) + body

    full = _outcome(lambda: parse_header(data))
    listener = _outcome(
        lambda: parse_header(
            data,
            expected_sop_uid=ds.SOPInstanceUID,
            transfer_syntax_uid=syntax,
            dataset_offset=len(meta),
        )
    )
    assert listener == full
    if embedded != JPEGBaseline8Bit:
        assert full is CorruptDatasetError


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_a_data_set_cut_inside_a_long_element_header_is_corrupt(syntax):
    """Cut 8 to 11 bytes into the 12-byte header of an explicit VR element with a 32-bit
    length (OW pixel data, PS3.5 7.1.2): tag and VR are there, the length is not.
    Refused as corrupt on both paths, not raised as struct.error (which the listener
    answers 0xC211 and the retrieval sink does not catch at all)."""
    ds, body = _data_set(syntax)
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    pixel_header_at = len(body) - len(ds.PixelData) - 12
    for kept in range(8, 12):
        data = meta + body[: pixel_header_at + kept]
        with pytest.raises(CorruptDatasetError):
            parse_header(data)
        with pytest.raises(CorruptDatasetError):
            parse_header(data, transfer_syntax_uid=syntax, dataset_offset=len(meta))


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_a_data_set_cut_inside_its_last_element_header_is_refused_on_the_listener_path(
    syntax,
):
    """1 to 7 bytes of the Pixel Data element's header left at the end: pydicom ends the
    data set there quietly and the instance would be stored without its pixels. The
    listener's path refuses it; trailing zero bytes (padding some writers leave) pass."""
    ds, body = _data_set(syntax)
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    long_header = syntax != ImplicitVRLittleEndian  # OW: 12-byte explicit header
    pixel_header_at = len(body) - len(ds.PixelData) - (12 if long_header else 8)
    for kept in range(1, 8):
        data = meta + body[: pixel_header_at + kept]
        with pytest.raises(CorruptDatasetError, match="truncated"):
            parse_header(data, transfer_syntax_uid=syntax, dataset_offset=len(meta))
    whole = parse_header(meta + body, transfer_syntax_uid=syntax, dataset_offset=len(meta))
    for padding in (b"\x00", b"\x00\x00"):
        padded = parse_header(
            meta + body + padding, transfer_syntax_uid=syntax, dataset_offset=len(meta)
        )
        assert padded.sop_uid == whole.sop_uid == ds.SOPInstanceUID


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("group_0002_in_data_set", [False, True])
def test_a_data_set_cut_inside_its_last_element_header_is_refused_on_the_full_path(
    syntax, group_0002_in_data_set
):
    """The same cut in a file parsed whole (a STOW-RS part, a retrieved instance, a data
    set that carries group 0002 elements): refused as the listener's path refuses it,
    trailing zero padding still accepted."""
    ds, body = _data_set(syntax)
    if group_0002_in_data_set and syntax != ExplicitVRBigEndian:
        body = _transfer_syntax_element(syntax) + body
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    long_header = syntax != ImplicitVRLittleEndian
    pixel_header_at = len(body) - len(ds.PixelData) - (12 if long_header else 8)
    for kept in range(1, 8):
        with pytest.raises(CorruptDatasetError, match="truncated"):
            parse_header(meta + body[: pixel_header_at + kept])
    whole = parse_header(meta + body)
    for padding in (b"\x00", b"\x00\x00"):
        assert parse_header(meta + body + padding).sop_uid == whole.sop_uid == ds.SOPInstanceUID
