"""The study docker/smoke.sh sends, and the check of the SEG that comes back.

Runs inside the dicom-node-worker image with the repository mounted (PYTHONPATH), so the
smoke test needs nothing of Python on the host:

    smoke_study.py make OUT      a synthetic portal-venous CT study (devkit.synth, seed 7,
                                 192 x 192 at 2 mm: a scanner's 384 mm field of view) in
                                 OUT/study, its truth and UIDs in OUT/study.json + .npy
    smoke_study.py check OUT     every SEG in OUT/segs: the tumour pipeline's must
                                 reference the sent series and reach Dice >= 0.9 for the
                                 kidneys and the tumour against the phantom's truth

``check`` prints one line ``seg_sop=... dice_kidney=... dice_tumor=...`` (exit 0), or the
reason it failed (exit 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom

SEED = 7
MIN_DICE = 0.9


def make(out: Path) -> int:
    from devkit.phantom import STRUCTURES
    from devkit.synth import generate_study

    study = generate_study(
        out / "study", seed=SEED, phases="P", rows=192, columns=192, pixel_spacing_mm=2.0
    )
    series = study.by_phase("P")
    sop_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.files]
    truth = series.truth
    kidney = np.isin(truth, [STRUCTURES["kidney_left"], STRUCTURES["kidney_right"]])
    np.save(out / "kidney.npy", kidney)
    np.save(out / "tumor.npy", truth == STRUCTURES["kidney_tumor"])
    manifest = {
        "study_uid": study.study_uid,
        "series_uid": series.series_uid,
        "sop_uids": sop_uids,
        "files": len(series.files),
    }
    (out / "study.json").write_text(json.dumps(manifest))
    print(f"study {study.study_uid}: {len(series.files)} images")
    return 0


def check(out: Path) -> int:
    from inference.seg_reader import dice, seg_label_map

    manifest = json.loads((out / "study.json").read_text())
    kidney, tumor = np.load(out / "kidney.npy"), np.load(out / "tumor.npy")
    seen = []
    for path in sorted((out / "segs").glob("*.dcm")):
        seg = pydicom.dcmread(path)
        labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
        seen.append(f"{seg.SeriesDescription!s}: {labels}")
        if "kidney tumor" not in labels:
            continue
        if seg.StudyInstanceUID != manifest["study_uid"]:
            print(f"the tumour SEG {seg.SOPInstanceUID} is in study {seg.StudyInstanceUID}")
            return 1
        referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        if referenced != manifest["series_uid"]:
            print(f"the tumour SEG references series {referenced}, not the one sent")
            return 1
        label_map, names = seg_label_map(seg, manifest["sop_uids"])
        by_name = {name: number for number, name in names.items()}
        d_kidney = dice(label_map == by_name.get("kidney", -1), kidney)
        d_tumor = dice(label_map == by_name.get("kidney tumor", -1), tumor)
        line = f"seg_sop={seg.SOPInstanceUID} dice_kidney={d_kidney:.3f} dice_tumor={d_tumor:.3f}"
        if min(d_kidney, d_tumor) < MIN_DICE:
            print(f"Dice below {MIN_DICE}: {line}")
            return 1
        print(line)
        return 0
    print(f"no tumour SEG among the SEGs received: {seen or 'none'}")
    return 1


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    sys.exit({"make": make, "check": check}[command](folder))
