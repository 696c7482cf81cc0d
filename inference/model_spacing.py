"""The slice spacing a registered model works at (to prefer inputs close to it)."""

from __future__ import annotations

import json

from inference.registry import ModelSpec

# TotalSegmentator's model resolutions: fastest (6 mm), fast (3 mm), full (1.5 mm).
_TOTALSEG_SPACING_MM = {"fastest": 6.0, "fast": 3.0, "full": 1.5}


def target_spacing_mm(spec: ModelSpec) -> float | None:
    """The slice (z) spacing in mm the model works at: nnU-Net's plans for its
    configuration, TotalSegmentator's resolution; None when it cannot be read."""
    if spec.kind == "totalsegmentator":
        mode = "fastest" if spec.fastest else "fast" if spec.fast else "full"
        return _TOTALSEG_SPACING_MM[mode]
    if spec.folder is None:
        return None
    try:
        plans = json.loads((spec.folder / "plans.json").read_text())
        return float(plans["configurations"][spec.configuration]["spacing"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
