"""Reading the contrast phase from image measurements (the ``image_evidence`` settings).

``inference.phase_evidence`` measures HU in the aorta, the portal vein / IVC and the
kidneys, the kidneys' cortex-medulla difference and the excreted contrast around them;
this module turns those numbers into one phase, by known physiology, with thresholds from
the rules file:

- contrast in the collecting system -> D (excretory: from about 3 minutes);
- aorta (and veins) at unenhanced blood density -> N;
- aorta much brighter than the veins -> A (the bolus has not reached the portal and caval
  systems yet; the kidneys' cortex is brighter than their medulla);
- veins close to the aorta: P while the aorta is still bright, D once both have fallen to
  equilibrium;
- anything else: no phase from the image (the reason says which numbers disagree).

The default thresholds are taken from published enhancement curves and were checked on
the synthetic phantom; real scans vary with the injection protocol, the patient's cardiac
output and the scanner (see README: Contrast phase).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kernel.strict import StrictModel

Role = Literal["aorta", "venous", "kidney"]


class ImageThresholds(StrictModel):
    """HU and ml limits of the image rules (see routing_rules.yaml for their sources)."""

    non_contrast_max_hu: float = Field(
        80.0, description="Aorta and veins below this: no contrast in the blood."
    )
    arterial_min_aorta_hu: float = Field(180.0, description="Aorta at least this in A.")
    arterial_min_gradient_hu: float = Field(
        80.0, description="Aorta minus veins at least this in A."
    )
    venous_max_gradient_hu: float = Field(
        50.0, description="Aorta minus veins at most this in P and D (veins caught up)."
    )
    portal_min_aorta_hu: float = Field(
        135.0, description="Aorta at least this in P; below it (and enhanced) it is D."
    )
    excreted_min_ml: float = Field(
        0.15, description="Contrast in the collecting system at least this (ml) means D."
    )
    corticomedullary_min_hu: float = Field(
        40.0, description="Cortex minus medulla at least this supports A."
    )


class ImageEvidenceSettings(StrictModel):
    """The ``phases.image_evidence`` section: when and how the image is asked."""

    when: Literal["never", "weak", "always"] = Field(
        "weak",
        description="never; weak (only when the tags leave the phase unknown, tied or "
        "below weak_below); always (every CT series, before its pipelines run).",
    )
    model: str | None = Field(
        None, description="Registry id of the coarse organ model that outlines the structures."
    )
    structures: dict[Role, list[str]] = Field(
        default_factory=lambda: {
            "aorta": ["aorta"],
            "venous": ["inferior_vena_cava", "portal_vein_and_splenic_vein"],
            "kidney": ["kidney_left", "kidney_right"],
        },
        description="Structure -> the model's label names for it.",
    )
    weak_below: float = Field(0.7, ge=0, le=1, description="Tag confidence below this is weak.")
    weight: float = Field(4.0, gt=0, description="Votes the image phase gets.")
    thresholds: ImageThresholds = Field(default_factory=ImageThresholds)


def _fmt(value: Any, unit: str = "HU") -> str:
    return f"{value:.0f} {unit}" if isinstance(value, int | float) else "?"


def describe(measurements: dict[str, Any]) -> str:
    """E.g. ``aorta 296 HU, venous 71 HU, kidney 156 HU, cortex-medulla 3 HU, excreted
    0.00 ml``."""
    hu = measurements.get("hu", {})
    parts = [f"{role} {_fmt(hu.get(role))}" for role in ("aorta", "venous", "kidney") if role in hu]
    if measurements.get("corticomedullary_hu") is not None:
        parts.append(f"cortex-medulla {_fmt(measurements['corticomedullary_hu'])}")
    if measurements.get("excreted_ml") is not None:
        parts.append(f"excreted {measurements['excreted_ml']:.2f} ml")
    return ", ".join(parts)


def phase_from_image(measurements: dict[str, Any], t: ImageThresholds) -> tuple[str | None, str]:
    """(phase or None, why) from ``inference.phase_evidence.measure`` numbers."""
    hu = measurements.get("hu", {})
    aorta, venous = hu.get("aorta"), hu.get("venous")
    excreted = measurements.get("excreted_ml") or 0.0
    cmd = measurements.get("corticomedullary_hu")
    if aorta is None:
        return None, "no aorta measured"
    if excreted >= t.excreted_min_ml:
        return (
            "D",
            f"contrast in the collecting system ({excreted:.2f} >= {t.excreted_min_ml:g} ml)",
        )
    if aorta < t.non_contrast_max_hu and (venous is None or venous < t.non_contrast_max_hu):
        return "N", f"aorta {aorta:.0f} HU < {t.non_contrast_max_hu:g}: unenhanced blood"
    if venous is None:
        return None, "no portal vein / IVC measured to compare the aorta with"
    gradient = aorta - venous
    if gradient >= t.arterial_min_gradient_hu and aorta >= t.arterial_min_aorta_hu:
        support = (
            f"; cortex {cmd:.0f} HU brighter than medulla"
            if cmd is not None and cmd >= t.corticomedullary_min_hu
            else ""
        )
        return "A", (
            f"aorta {gradient:.0f} HU brighter than the veins (>= "
            f"{t.arterial_min_gradient_hu:g}){support}"
        )
    if abs(gradient) <= t.venous_max_gradient_hu and aorta >= t.non_contrast_max_hu:
        if aorta >= t.portal_min_aorta_hu:
            return "P", (
                f"veins within {abs(gradient):.0f} HU of the aorta, aorta {aorta:.0f} >= "
                f"{t.portal_min_aorta_hu:g} HU"
            )
        return "D", (
            f"veins within {abs(gradient):.0f} HU of the aorta at equilibrium, aorta "
            f"{aorta:.0f} < {t.portal_min_aorta_hu:g} HU"
        )
    return None, (
        f"aorta {aorta:.0f} HU and veins {venous:.0f} HU fit no phase (gradient {gradient:.0f} HU)"
    )
