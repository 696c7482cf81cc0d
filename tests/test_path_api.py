"""Path inputs of the seed service's API: checked before queueing, read once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devkit.synth import generate_study
from inference.nifti_io import write_volume
from inference.path_api import PathInputError, is_path_job, load_input, path_inputs
from kernel.catalog import PipelineSpec
from tests.test_engine_support import grid, phantom_volume

VESSEL = PipelineSpec(models=["vessel"], inputs={"A": ["A"], "P": ["P"]})
TUMOR = PipelineSpec(models=["tumor"], inputs={"image": ["P", "A"]})


def test_vessel_needs_both_phase_paths(tmp_path: Path) -> None:
    image = write_volume(phantom_volume("A", grid(rows=16, columns=16))[0], tmp_path / "a.nii.gz")
    with pytest.raises(PathInputError, match="image_P_path is missing"):
        path_inputs(VESSEL, {"image_A_path": str(image)})
    inputs = path_inputs(VESSEL, {"image_A_path": str(image), "image_P_path": str(image)})
    assert inputs == {"A": {"path": str(image)}, "P": {"path": str(image)}}
    assert is_path_job(inputs) and not is_path_job({"image": "1.2.3"})


def test_bad_paths_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(PathInputError, match="does not exist"):
        path_inputs(TUMOR, {"image_path": str(tmp_path / "missing.nii.gz")})
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(PathInputError, match="neither a NIfTI file nor a DICOM folder"):
        path_inputs(TUMOR, {"image_path": str(text)})
    with pytest.raises(PathInputError, match="absolute path"):
        path_inputs(TUMOR, {"image_path": "ct.nii.gz"})
    with pytest.raises(PathInputError, match="unexpected inputs"):
        path_inputs(TUMOR, {"image_path": str(text.parent), "image_Q_path": "/x"})
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    accepted = "accepted: a NIfTI file (.nii or .nii.gz) or a folder holding one DICOM series"
    with pytest.raises(PathInputError) as refused:
        load_input({"path": str(broken)})
    assert (
        str(refused.value)
        == f"{broken} cannot be read as an image: it is not a NIfTI file; {accepted}"
    )
    assert "sitk" not in str(refused.value)  # SimpleITK's own words go to the log
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "readme.txt").write_text("x")
    with pytest.raises(PathInputError) as refused:
        load_input({"path": str(folder)})
    assert str(refused.value) == (
        f"{folder / 'notes.txt'} cannot be read as an image: it is not a DICOM file "
        f"(and 1 more of its 2 files); {accepted}"
    )


def test_nifti_and_dicom_folder_give_the_same_volume(tmp_path: Path) -> None:
    study = generate_study(tmp_path / "study", seed=7, phases="P", rows=48, columns=48,
                           pixel_spacing_mm=8.0, slice_thickness_mm=8.0)  # fmt: skip
    folder = study.by_phase("P").files[0].parent
    from_dicom = load_input({"path": str(folder)})
    nifti = write_volume(from_dicom, tmp_path / "p.nii.gz")
    from_nifti = load_input({"path": str(nifti)})
    assert np.array_equal(from_dicom.array, from_nifti.array)
    assert np.allclose(from_dicom.origin_lps, from_nifti.origin_lps, atol=1e-3)
    assert np.allclose(from_dicom.spacing_zyx, from_nifti.spacing_zyx)
