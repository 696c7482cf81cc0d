"""A pipeline with ``masks: nifti`` leaves its label map as NIfTI in the study's mask folder
(the seed service's other services reuse the organ masks), next to the SEG it sends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from db.models import Job, Result
from devkit.phantom import STRUCTURES
from devkit.synth import generate_study
from inference.nifti_io import read_nifti
from inference.seg_reader import dice
from inference.volume import load_series
from kernel.settings import REPO_ROOT
from tests.conftest import storescu, wait_until

pytestmark = pytest.mark.slow


def test_organ_masks_land_in_the_study_mask_folder(tmp_path: Path, start_node) -> None:
    rules = yaml.safe_load((REPO_ROOT / "routing_rules.yaml").read_text(encoding="utf-8"))
    assert rules["pipelines"]["totalseg"]["masks"] == "nifti"
    rules["rules"][0]["pipelines"] = ["totalseg"]
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    node = start_node(rules_file=rules_path)
    study = generate_study(tmp_path / "study", seed=11, phases="P", rows=192, columns=192,
                           pixel_spacing_mm=2.0)  # fmt: skip
    portal = study.by_phase("P")
    assert storescu(portal.files, node.settings.port).returncode == 0

    def done() -> bool:
        with node.db.session() as s:
            return [j.state for j in s.scalars(select(Job))] == ["done"]

    wait_until(done, 300, "the totalseg job done")
    mask_path = node.settings.results_dir / study.study_uid / "masks" / "totalseg.nii.gz"
    mask = read_nifti(mask_path)
    series = load_series(portal.files)
    assert mask.shape == series.shape
    np.testing.assert_allclose(mask.origin_lps, series.origin_lps, atol=1e-3)
    np.testing.assert_allclose(mask.spacing_zyx, series.spacing_zyx, atol=1e-4)
    for value, name in enumerate(
        ["spleen", "kidney_right", "kidney_left", "liver", "aorta", "inferior_vena_cava"], 1
    ):
        assert dice(mask.array == value, portal.truth == STRUCTURES[name]) >= 0.9, name
    with node.db.session() as s:
        assert len(s.scalars(select(Result)).all()) == 1  # and the SEG was written too
