"""The preview PNG: the SEG's labels drawn over the source slice that holds the most."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image

from devkit.synth import generate_study
from dicom_node.web.preview import render
from inference.labels import ANATOMICAL_STRUCTURE, SegmentLabel
from inference.results import Algorithm
from inference.seg_writer import write_seg
from kernel.uids import derived_uid
from tests.test_seg_writer import KIDNEY


def test_preview_overlays_the_seg_on_its_most_labelled_slice(tmp_path):
    study = generate_study(
        tmp_path / "study", seed=3, phases="P", rows=64, columns=64, pixel_spacing_mm=6.0
    )
    series = study.series[0]
    sources = [pydicom.dcmread(f) for f in series.files]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    label_map = np.zeros((len(sources), 64, 64), np.uint8)
    label_map[len(sources) // 2, 20:40, 20:40] = 1  # one square on the middle slice
    seg_path = tmp_path / "seg.dcm"
    write_seg(
        sources,
        label_map,
        [SegmentLabel(1, "kidney", ANATOMICAL_STRUCTURE, KIDNEY, (255, 0, 0))],
        path=seg_path,
        algorithm=Algorithm(name="test", version="1"),
        series_instance_uid=derived_uid("preview-series"),
        sop_instance_uid=derived_uid("preview-sop"),
        series_number=99,
        series_description="test SEG",
    )
    png = Image.open(io.BytesIO(render(str(seg_path), [str(f) for f in series.files])))
    assert png.size == (64, 64)
    rgb = np.asarray(png.convert("RGB")).astype(int)
    inside, outside = rgb[30, 30], rgb[5, 5]
    assert inside[0] > inside[1] + 40  # red-tinted where the label is
    assert abs(outside[0] - outside[1]) < 5  # plain grey elsewhere
