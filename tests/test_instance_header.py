"""parse_header on the listener's path (the meta it wrote itself is not parsed again)
reads exactly what the full parse of the same file reads, and refuses the same data."""

from __future__ import annotations

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.instance import CorruptDatasetError, parse_header
from dicom_node.store_path import file_meta
from tests.dicom_factory import ct_slice

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


def _received(syntax: str, **attributes: object) -> tuple[bytes, int]:
    """A file as the listener builds it: its own meta, then the data set as sent in
    ``syntax``; and where the data set starts."""
    ds = ct_slice(generate_uid(), generate_uid(), 3)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buf, ds)
    meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    return meta + buf.getvalue(), len(meta)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_listener_path_reads_what_the_full_parse_reads(syntax):
    data, offset = _received(
        syntax,
        SpecificCharacterSet="ISO_IR 192",
        PatientName="김^민수",
        SeriesDescription="복부 CT 문맥기",
        AcquisitionNumber=2,
    )
    full = parse_header(data)
    fast = parse_header(data, transfer_syntax_uid=syntax, dataset_offset=offset)
    assert fast == full
    assert fast.transfer_syntax_uid == syntax
    assert fast.patient_name == "김^민수"
    assert fast.slice_position_mm is not None and fast.stack_key


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_listener_path_refuses_a_truncated_data_set_as_the_full_parse_does(syntax):
    data, offset = _received(syntax)
    cut = data[: len(data) - 300]
    with pytest.raises(CorruptDatasetError):
        parse_header(cut)
    with pytest.raises(CorruptDatasetError):
        parse_header(cut, transfer_syntax_uid=syntax, dataset_offset=offset)


def test_listener_path_checks_the_sop_instance_uid_of_the_request():
    data, offset = _received(ExplicitVRLittleEndian)
    with pytest.raises(CorruptDatasetError, match="differs from the request"):
        parse_header(
            data,
            expected_sop_uid="1.2.3.999",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            dataset_offset=offset,
        )


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("InstanceNumber", "IS", b"5.0 "),  # not a plain integer: pydicom converts it
        ("InstanceNumber", "IS", b" 7 "),
        ("AcquisitionNumber", "IS", b"-1"),
        ("ImagePositionPatient", "DS", b" 1.5\\-2\\3e1"),
        ("ImagePositionPatient", "DS", b"1\\2 "),  # two values where three belong
        ("PixelSpacing", "DS", b".5\\.5 "),
        ("ImageType", "CS", b"LOCALIZER\\X "),
        ("SeriesInstanceUID", "UI", b"1.2.03.4"),  # tolerated, reported
        ("SOPClassUID", "UI", b"1.2\\1.3\x00"),  # several values: refused
    ],
)
def test_values_read_from_the_bytes_equal_pydicom_s(monkeypatch, syntax, keyword, vr, value):
    """Numbers and UIDs taken from the element's bytes, or by pydicom when they are not
    plainly encoded, give the header pydicom's conversion of every value gives (the
    reference: the same parse with the bytes path switched off)."""
    import dicom_node.instance as instance

    ds = ct_slice(generate_uid(), generate_uid(), 3)
    tag = Tag(tag_for_keyword(keyword))
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, little)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    write_dataset(buf, ds)
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    data = meta + buf.getvalue()
    listener_path = {"transfer_syntax_uid": syntax, "dataset_offset": len(meta)}

    with monkeypatch.context() as patched:
        patched.setattr(instance, "_plain_text", lambda *args: None)
        try:
            expected: object = parse_header(data)
        except CorruptDatasetError:
            expected = CorruptDatasetError
    if expected is CorruptDatasetError:
        with pytest.raises(CorruptDatasetError):
            parse_header(data)
        with pytest.raises(CorruptDatasetError):
            parse_header(data, **listener_path)
        return
    assert parse_header(data) == expected
    assert parse_header(data, **listener_path) == expected
