"""Pixel data that does not match its header (issue 13, kind 9).

Every variant is a small synthetic series (``generate_study``) with one or more instances
rewritten by pydicom (or, for odd lengths and a native PixelData under a compressed
transfer syntax, by editing the file's bytes). ``load_series`` must refuse it with a
``SeriesReadError`` that names the damaged instance (SOP Instance UID and file) and the
problem, and must still read intact series of every transfer syntax to the same voxels.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from devkit.synth import generate_study
from inference.pixels import PixelDataError, check_instance, instance_problems
from inference.volume import SeriesReadError, load_series

N = 48  # rows = columns; OpenJPEG cannot encode below 32 x 32 at its default resolutions
BYTES = N * N * 2  # BitsAllocated 16
SIZE = dict(phases="P", rows=N, columns=N, pixel_spacing_mm=8.0, slices=6)
COMPRESSED = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1]
NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, list[Path]]:
    """The same 6-slice 48 x 48 series in every transfer syntax, plus a 32 x 32 one per
    compressed syntax (key ``"<uid> small"``) whose frames are of another size."""
    root = tmp_path_factory.mktemp("pixels")
    out: dict[str, list[Path]] = {}
    for syntax in NATIVE + COMPRESSED:
        study = generate_study(root / syntax, seed=4, transfer_syntax=syntax, **SIZE)
        out[syntax] = study.series[0].files
    for syntax in COMPRESSED:
        small = dict(SIZE, rows=32, columns=32, pixel_spacing_mm=12.0)
        study = generate_study(root / f"{syntax}-small", seed=4, transfer_syntax=syntax, **small)
        out[f"{syntax} small"] = study.series[0].files
    return out


def damaged(
    files: Sequence[Path],
    folder: Path,
    mutate: Callable[[pydicom.Dataset], None],
    which: Sequence[int] = (2,),
) -> list[Path]:
    """A copy of the series in ``folder`` with the instances at ``which`` (position order)
    passed through ``mutate`` and written back by pydicom."""
    folder.mkdir(parents=True)
    out = []
    for index, path in enumerate(files):
        target = folder / Path(path).name
        if index in which:
            ds = pydicom.dcmread(path)
            mutate(ds)
            ds.save_as(target)
        else:
            shutil.copy(path, target)
        out.append(target)
    return out


def refused(files: Sequence[Path], bad: int, *words: str) -> str:
    """``load_series`` refuses the series naming instance ``bad`` and every word."""
    with pytest.raises(SeriesReadError) as err:
        load_series(files)
    message = str(err.value)
    uid = str(pydicom.dcmread(files[bad], stop_before_pixels=True).SOPInstanceUID)
    assert uid in message, message
    assert str(files[bad]) in message, message
    for word in words:
        assert word in message, message
    return message


def _set(**values) -> Callable[[pydicom.Dataset], None]:
    def mutate(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return mutate


def _pixel_data(change: Callable[[bytes], bytes]) -> Callable[[pydicom.Dataset], None]:
    def mutate(ds: pydicom.Dataset) -> None:
        ds.PixelData = change(ds.PixelData)

    return mutate


def _rgb(ds: pydicom.Dataset) -> None:
    rgb = np.repeat(ds.pixel_array[..., None], 3, axis=2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()


def _no_pixel_data(ds: pydicom.Dataset) -> None:
    del ds.PixelData


NATIVE_DAMAGE = {
    # The example: Rows/Columns doubled over the original pixels (1/4 of the bytes).
    "rows_columns_doubled": (
        _set(Rows=2 * N, Columns=2 * N),
        [f"short by {3 * BYTES}", f"{N * N} pixels: {N} x {N}"],
    ),
    "one_row_fewer": (_set(Rows=N - 1), [f"long by {2 * N}"]),
    "pixel_data_longer": (_pixel_data(lambda b: b + bytes(64)), ["long by 64"]),
    "pixel_data_shorter": (_pixel_data(lambda b: b[:-64]), ["short by 64"]),
    "bits_stored_17_of_16": (_set(BitsStored=17, HighBit=16), ["BitsStored 17"]),
    "high_bit_not_bits_stored_minus_1": (_set(HighBit=15), ["HighBit 15"]),
    "pixel_representation_2": (_set(PixelRepresentation=2), ["PixelRepresentation 2"]),
    "bits_allocated_8_over_16_bit_data": (
        _set(BitsAllocated=8, BitsStored=8, HighBit=7),
        [f"long by {BYTES // 2}"],
    ),
    "bits_allocated_32_over_16_bit_data": (
        _set(BitsAllocated=32, BitsStored=32, HighBit=31),
        [f"short by {BYTES}"],
    ),
    "samples_per_pixel_3": (
        _set(SamplesPerPixel=3),
        ["SamplesPerPixel 3", f"short by {2 * BYTES}"],
    ),
    "rgb_image": (_rgb, ["not a greyscale image"]),
    "no_pixel_data": (_no_pixel_data, ["no complete PixelData"]),
}


@pytest.mark.parametrize("syntax", NATIVE)
@pytest.mark.parametrize("kind", list(NATIVE_DAMAGE))
def test_native_damage_is_refused_naming_the_instance(series, tmp_path, syntax, kind):
    mutate, words = NATIVE_DAMAGE[kind]
    files = damaged(series[syntax], tmp_path / "s", mutate)
    refused(files, 2, *words)


def _write_pixel_value(path: Path, value: bytes) -> None:
    """Rewrite the file's last element, PixelData (explicit VR little endian), with
    ``value`` and its exact length, odd or not (pydicom would pad it)."""
    data = path.read_bytes()
    ds = pydicom.dcmread(path)
    old = len(ds.PixelData)
    header = data[len(data) - old - 12 : len(data) - old]
    assert header[:4] == b"\xe0\x7f\x10\x00", "PixelData is not the last element"
    path.write_bytes(data[: -old - 4] + struct.pack("<I", len(value)) + value)


@pytest.mark.parametrize("delta", [-1, +1, -2049])
def test_odd_and_wrong_raw_lengths_are_refused(series, tmp_path, delta):
    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", lambda ds: None)
    original = pydicom.dcmread(files[4]).PixelData
    value = original[:delta] if delta < 0 else original + b"\x01" * delta
    _write_pixel_value(files[4], value)
    assert len(pydicom.dcmread(files[4]).PixelData) == len(original) + delta
    refused(files, 4, f"holds {len(original) + delta} bytes", f"needs {BYTES} bytes")


def test_odd_sized_8_bit_image_reads_with_or_without_its_pad_byte(series, tmp_path):
    """31 x 31 x 8 bits = 961 bytes: 962 (padded, PS3.5 7.1.1) and a raw 961 are both whole."""

    def to_8_bit(ds: pydicom.Dataset) -> None:
        stored = (ds.pixel_array[:31, :31] >> 4).astype(np.uint8)
        ds.Rows = ds.Columns = 31
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.RescaleSlope, ds.RescaleIntercept = 16, -1024
        ds.PixelData = stored.tobytes()  # pydicom pads it to 962 bytes

    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", to_8_bit, which=range(6))
    assert len(pydicom.dcmread(files[0]).PixelData) == 962
    _write_pixel_value(files[0], pydicom.dcmread(files[0]).PixelData[:961])
    volume = load_series(files)
    assert volume.shape == (6, 31, 31)
    expected = [(pydicom.dcmread(f).pixel_array.astype(np.float32) * 16 - 1024) for f in files]
    np.testing.assert_array_equal(volume.array, np.stack(expected))
    assert instance_problems(files[0]) == [] and instance_problems(files[1]) == []


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless])
def test_file_cut_short_is_refused(series, tmp_path, syntax):
    """The last 100 bytes of the file lost (a copy that stopped early)."""
    files = damaged(series[syntax], tmp_path / "s", lambda ds: None, which=())
    files[2].write_bytes(files[2].read_bytes()[:-100])
    refused(files, 2, "short by 100" if syntax == ExplicitVRLittleEndian else "PixelData")


def test_one_bad_slice_among_good_ones_names_only_it(series, tmp_path):
    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", _set(Rows=2 * N), which=(3,))
    message = refused(files, 3, "short by")
    assert "more of the" not in message
    for other in (0, 1, 2, 4, 5):
        uid = str(pydicom.dcmread(files[other], stop_before_pixels=True).SOPInstanceUID)
        assert uid not in message


def test_several_bad_slices_are_counted(series, tmp_path):
    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", _set(Rows=N - 1), which=(1, 4))
    message = refused(files, 1, "1 more of the 6 instances")
    assert str(pydicom.dcmread(files[4], stop_before_pixels=True).SOPInstanceUID) in message


def _other_image(shape: tuple[int, int], rgb: bool) -> Callable[[pydicom.Dataset], None]:
    """A second image of the series at the first slice's place: another matrix size, in
    RGB (a dose screen, say) or greyscale; the volume reader leaves it out of the stack."""

    def mutate(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
        ds.Rows, ds.Columns = shape
        if rgb:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
            ds.PlanarConfiguration = 0
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = np.full((*shape, 3), 128, np.uint8).tobytes()
        else:
            ds.PixelData = np.zeros(shape, np.uint16).tobytes()

    return mutate


def _extra(files: list[Path], folder: Path, mutate: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(files[0])
    mutate(ds)
    path = folder / "extra.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("rgb", [True, False])
def test_images_left_out_of_the_stack_are_checked_for_damage_only(series, tmp_path, rgb):
    """A sound image of another kind does not stop the series; a damaged one does, because
    its damaged header may be what split it off (a slice whose Rows were rewritten)."""
    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", lambda ds: None, which=())
    extra = _extra(files, tmp_path / "s", _other_image((40, 40), rgb))
    volume = load_series([*files, extra])
    assert volume.shape == (6, N, N) and len(volume.left_out) == 1

    def shortened(ds: pydicom.Dataset) -> None:
        _other_image((40, 40), rgb)(ds)
        ds.PixelData = ds.PixelData[:-100]

    bad = _extra(files, tmp_path / "s", shortened)
    refused([*files, bad], 6, "short by 100")


def test_non_image_in_the_series_is_not_checked(series, tmp_path):
    def no_image(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword in ("PixelData", "Rows", "Columns", "ImagePositionPatient"):
            delattr(ds, keyword)

    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", lambda ds: None, which=())
    extra = _extra(files, tmp_path / "s", no_image)
    assert load_series([*files, extra]).shape == (6, N, N)


def test_element_after_pixel_data_is_not_mistaken_for_damage(series, tmp_path):
    """Files whose PixelData is not the last element take the parsing path, same verdicts."""

    def trailing_padding(ds: pydicom.Dataset) -> None:
        ds.add_new(0xFFFCFFFC, "OB", bytes(16))  # Data Set Trailing Padding

    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", trailing_padding, range(6))
    assert load_series(files).shape == (6, N, N)
    short = damaged(
        files, tmp_path / "t", lambda ds: (trailing_padding(ds), _set(Rows=2 * N)(ds)), which=(0,)
    )
    refused(short, 0, f"short by {BYTES}")


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_big_endian_and_deflated_files_are_checked_too(series, tmp_path, syntax):
    ds = pydicom.dcmread(series[ExplicitVRLittleEndian][0])
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = syntax
    whole, short = tmp_path / "whole.dcm", tmp_path / "short.dcm"
    kwargs = dict(implicit_vr=False, little_endian=syntax != ExplicitVRBigEndian)
    dcmwrite(whole, ds, **kwargs, force_encoding=True)
    ds.Rows = 2 * N
    dcmwrite(short, ds, **kwargs, force_encoding=True)
    check_instance(whole)
    with pytest.raises(PixelDataError, match=f"short by {BYTES}") as err:
        check_instance(short)
    assert str(ds.SOPInstanceUID) in str(err.value) and str(short) in str(err.value)


# -- encapsulated (compressed) pixel data ------------------------------------------------


def _frame(change: Callable[[bytes], bytes]) -> Callable[[pydicom.Dataset], None]:
    def mutate(ds: pydicom.Dataset) -> None:
        ds.PixelData = encapsulate([change(get_frame(ds.PixelData, 0))])

    return mutate


def _garbage(frame: bytes) -> bytes:
    return np.random.default_rng(7).integers(0, 256, len(frame), dtype=np.uint8).tobytes()


COMPRESSED_DAMAGE = {
    "truncated_to_half": (_frame(lambda f: f[: len(f) // 2]), []),
    "last_10_bytes_cut": (_frame(lambda f: f[:-10]), []),
    "random_bytes": (_frame(_garbage), []),
    "zeros": (_frame(lambda f: bytes(len(f))), []),
    "bits_allocated_8_header": (_set(BitsAllocated=8, BitsStored=8, HighBit=7), []),
    "samples_per_pixel_3_header": (_set(SamplesPerPixel=3), ["SamplesPerPixel 3"]),
}


@pytest.mark.parametrize("syntax", COMPRESSED)
@pytest.mark.parametrize("kind", list(COMPRESSED_DAMAGE))
def test_damaged_compressed_frame_is_refused_naming_the_instance(series, tmp_path, syntax, kind):
    mutate, words = COMPRESSED_DAMAGE[kind]
    files = damaged(series[syntax], tmp_path / "s", mutate)
    refused(files, 2, *words)


@pytest.mark.parametrize("syntax", COMPRESSED)
def test_frame_of_another_size_is_refused(series, tmp_path, syntax):
    """A 32 x 32 frame in a 48 x 48 image: GDCM aborts the process on the JPEG-LS one."""
    small = get_frame(pydicom.dcmread(series[f"{syntax} small"][2]).PixelData, 0)
    files = damaged(series[syntax], tmp_path / "s", _frame(lambda _: small))
    words = [] if syntax == RLELossless else [f"32 x 32 pixels but Rows x Columns is {N} x {N}"]
    refused(files, 2, *words)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_truncated_frame_closed_with_an_end_marker_is_refused(series, tmp_path, syntax):
    """Cut inside the coded data, then closed with EOI/EOC: the structure looks whole, the
    decoders (pylibjpeg-rle here, GDCM for JPEG-LS and JPEG 2000) must notice.

    Not for JPEG lossless: GDCM and pylibjpeg both decode such a stream without an error
    (see inference.pixels)."""
    files = damaged(
        series[syntax], tmp_path / "s", _frame(lambda f: f[: len(f) // 2] + b"\xff\xd9")
    )
    refused(files, 2)


def _relabel(path: Path, syntax: str) -> None:
    """Give the file another TransferSyntaxUID, leaving the data set's bytes as they are
    (pydicom refuses to write such a file)."""
    data = path.read_bytes()
    assert data[132:134] == b"\x02\x00"  # (0002,0000) File Meta Information Group Length
    body = data[144 + struct.unpack("<I", data[140:144])[0] :]
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    path.write_bytes(data[:132] + fp.getvalue() + body)


@pytest.mark.parametrize("syntax", COMPRESSED)
def test_native_pixel_data_under_a_compressed_syntax_is_refused(series, tmp_path, syntax):
    files = damaged(series[ExplicitVRLittleEndian], tmp_path / "s", lambda ds: None)
    _relabel(files[2], syntax)
    assert pydicom.dcmread(files[2]).file_meta.TransferSyntaxUID == syntax
    refused(files, 2, "not encapsulated")


def test_encapsulated_pixel_data_under_a_native_syntax_is_refused(series, tmp_path):
    files = damaged(series[RLELossless], tmp_path / "s", lambda ds: None)
    _relabel(files[2], ExplicitVRLittleEndian)
    refused(files, 2, "encapsulated (undefined length)")


def test_intact_series_of_every_syntax_read_to_the_same_voxels(series):
    reference = load_series(series[ExplicitVRLittleEndian])
    for syntax in NATIVE + COMPRESSED:
        volume = load_series(series[syntax])
        np.testing.assert_array_equal(volume.array, reference.array, err_msg=syntax)
        assert volume.spacing_zyx == reference.spacing_zyx
        for path in series[syntax]:
            assert instance_problems(path) == []
