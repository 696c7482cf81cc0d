"""What a model's labels mean: coded concepts and segment descriptions.

These types describe a model's output; the registry builds them from ``models.yaml``, the
engine renumbers them per pipeline, and every writer (SEG, RTSTRUCT) reads them. They live
here so that nothing imports a writer for its types.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd


@dataclass(frozen=True)
class Code:
    """A coded concept, e.g. ``Code("64033007", "SCT", "Kidney")`` (PS3.3 8.8)."""

    value: str
    scheme: str
    meaning: str

    def to_coded_concept(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.value, self.scheme, self.meaning)


# Segmented Property Categories (CID 7150) and laterality (CID 244) used by the pipelines.
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
# Algorithm Family (CID 7162).
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class SegmentLabel:
    """One label of a model's output and how it is described in a SEG or RTSTRUCT.

    ``value`` is the label id in the label map (1..255); ``name`` becomes SegmentLabel
    (ROIName); ``category`` / ``type`` are the Segmented Property Category / Type codes;
    ``color_rgb`` the recommended display colour (0..255 each); ``laterality`` is written
    as SegmentedPropertyTypeModifierCodeSequence.
    """

    value: int
    name: str
    category: Code
    type: Code
    color_rgb: tuple[int, int, int] | None = None
    laterality: Code | None = None
