"""Breaker findings on today's fixes (a second look at each)."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
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


def _file(syntax: str) -> tuple[pydicom.Dataset, bytes, bytes]:
    ds = ct_slice(generate_uid(), generate_uid(), 3, rows=4)
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buf, ds)
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    return ds, meta, buf.getvalue()


def _meta_variants(meta: bytes) -> dict[str, bytes]:
    """The same File Meta Information with its (0002,0000) Group Length wrong or absent:
    pydicom and DCMTK read such a file (they find the data set where group 0002 ends)."""
    length = struct.unpack("<L", meta[140:144])[0]
    variants = {"absent": meta[:132] + meta[144:]}
    for delta in (-2, 2, 8, 10_000):
        variants[f"{delta:+d}"] = meta[:140] + struct.pack("<L", length + delta) + meta[144:]
    return variants


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_a_cut_last_element_header_is_refused_whatever_the_meta_group_length_says(syntax):
    """d04c12b walked the element headers from where (0002,0000) points. With that group
    length wrong or missing (pydicom reads the file all the same) the walk started off
    the data set (or not at all) and a file cut inside its Pixel Data header was accepted,
    stored without its pixels. The walk must start where pydicom's data set starts."""
    ds, meta, body = _file(syntax)
    long_header = syntax != ImplicitVRLittleEndian
    pixel_header_at = len(body) - len(ds.PixelData) - (12 if long_header else 8)
    for name, variant in _meta_variants(meta).items():
        whole = pydicom.dcmread(io.BytesIO(variant + body))
        assert "PixelData" in whole, name  # a file pydicom reads whole ...
        assert parse_header(variant + body).sop_uid == ds.SOPInstanceUID, name  # ... passes
        for kept in (1, 4, 7):
            cut = variant + body[: pixel_header_at + kept]
            assert "PixelData" not in pydicom.dcmread(io.BytesIO(cut)), name
            with pytest.raises(CorruptDatasetError, match="truncated"):
                parse_header(cut)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_a_cut_undefined_length_sequence_is_corrupt_not_an_os_error(syntax):
    """A data set that ends in a sequence of undefined length, cut anywhere inside it:
    pydicom raises OSError ("No tag to read at file position ..."), which escaped
    parse_header (ingest.receive, which must never raise for bad data, raised it to the
    STOW-RS / retrieval caller; the listener answered 0xC211). It is a corrupt data set."""
    ds = ct_slice(generate_uid(), generate_uid(), 3, rows=4)
    del ds.PixelData
    item = pydicom.Dataset()
    item.CodeValue = "123"
    item.CodeMeaning = "x" * 10
    ds.add_new(0x00400260, "SQ", pydicom.Sequence([item, item]))
    ds[0x00400260].is_undefined_length = True
    buf = DicomBytesIO()
    buf.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf.is_little_endian = True
    write_dataset(buf, ds)
    body = buf.getvalue()
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "1.2.3.4", "TEST")
    assert parse_header(meta + body).sop_uid == ds.SOPInstanceUID
    for cut in (1, 8, 20, 40):
        data = meta + body[:-cut]
        with pytest.raises(CorruptDatasetError):
            parse_header(data)
        with pytest.raises(CorruptDatasetError):
            parse_header(data, transfer_syntax_uid=syntax, dataset_offset=len(meta))
