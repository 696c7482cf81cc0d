"""Probability maps: the models' class probabilities beside the label map.

The map's argmax is the model's label map; it is written as a 4D NIfTI on the reference
series' voxels and as a FRACTIONAL DICOM-SEG (valid per dciodvfy) whose values are the
probabilities in 8 bits.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from devkit import dciodvfy
from devkit.synth import generate_study
from inference.engine import Engine
from inference.fractional_seg import write_fractional_seg
from inference.nifti_io import write_mask
from inference.path_api import run_path_job
from inference.registry import load_registry
from inference.results import Algorithm
from inference.volume import load_series
from kernel.catalog import PipelineSpec
from tests.test_engine_support import registry_file

CPU = torch.device("cpu")
# Without post-processing, so the label map is the argmax itself.
TUMOR = PipelineSpec(models=["tumor"], inputs={"image": ["P"]}, probabilities=["nifti"])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study = generate_study(out, seed=7, phases="P", rows=120, columns=120, pixel_spacing_mm=3.2)
    return load_series(study.series[0].files)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = registry_file(tmp_path_factory.mktemp("registry"), ["tumor"])
    spec = load_registry(path)
    for label in spec.models["tumor"].labels.values():
        label.postprocess.largest_component = False
    return Engine(spec, CPU)


def test_argmax_of_the_probabilities_is_the_label_map(engine, series, tmp_path):
    result = engine.run("tumor", TUMOR, {"image": series}, mask_dir=tmp_path)
    probabilities = result.probabilities
    assert probabilities.dtype == np.float16
    assert probabilities.shape == (1 + len(result.labels), *series.shape)
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(axis=0), 1.0, atol=0.01)
    assert result.label_map.any()
    np.testing.assert_array_equal(np.argmax(probabilities, axis=0), result.label_map)

    # The NIfTI lies on the same voxels as the mask and keeps the argmax (ties within one
    # 8-bit step may go either way).
    written = nib.load(result.probabilities_path)
    mask = nib.load(write_mask(series, result.label_map, tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(written.affine, mask.affine, atol=1e-4)
    data = np.transpose(written.get_fdata(), (3, 2, 1, 0))
    assert data.shape == probabilities.shape and data.max() <= 1.0 + 1e-6
    ordered = np.sort(probabilities.astype(np.float32), axis=0)
    clear = ordered[-1] - ordered[-2] > 1.0 / 255
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.argmax(data, axis=0)[clear], result.label_map[clear])


def test_fractional_seg_carries_the_probabilities(engine, series, tmp_path):
    result = engine.run("tumor", TUMOR, {"image": series})
    path = write_fractional_seg(
        series.headers,
        result.probabilities,
        result.labels,
        path=tmp_path / "fractional.dcm",
        algorithm=Algorithm("tumor", result.version),
        series_instance_uid=pydicom.uid.generate_uid(),
        sop_instance_uid=pydicom.uid.generate_uid(),
        series_number=9001,
        series_description="AI tumor probability",
    )
    assert dciodvfy.validate_file(path) == []
    seg = hd.seg.segread(io.BytesIO(path.read_bytes()))
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    kidney = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=False,
        skip_overlap_checks=True, rescale_fractional=True,
    )[..., 0]  # fmt: skip
    expected = result.probabilities[1].astype(np.float32)
    expected[expected < 0.5 / 255] = 0
    np.testing.assert_allclose(kidney, expected, atol=1.0 / 255 + 1e-3)


def test_path_api_answers_the_probability_nifti(engine, series, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for f in map(Path, series.files):
        (folder / f.name).write_bytes(f.read_bytes())
    summary = run_path_job(
        engine, "tumor", TUMOR, {"image": {"path": str(folder)}}, tmp_path / "out"
    )
    data = nib.load(summary["probabilities_path"]).get_fdata()
    assert data.shape == (*series.shape[::-1], 3)


def test_a_destination_cannot_ask_for_fractional_itself():
    from kernel.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match="FRACTIONAL is not a destination result_type"):
        load_settings(
            None,
            destinations=[{"name": "p", "ae_title": "P", "host": "127.0.0.1", "port": 104,
                           "result_type": "FRACTIONAL"}],  # fmt: skip
        )
