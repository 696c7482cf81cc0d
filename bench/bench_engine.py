"""Engine benchmark: one synthetic N/A/P/D study, all four seed pipelines.

(a) this engine: each series read once, warm models, in-process prediction, crop for the
    tumour model; (b) the naive chain the seed service started from: every series written
    to NIfTI, then one ``nnUNetv2_predict_from_modelfolder`` process per model.
Prints wall time and peak RSS of each and the ratio. Run: ``python bench/bench_engine.py``
(``--size 256`` for a bigger series; the stand-ins must be in models/).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.rules import load_rules  # noqa: E402
from dicom_node.synth import generate_study  # noqa: E402
from inference.registry import load_registry  # noqa: E402

CLI = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"


def _children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_engine(study_dir: Path, size: int) -> tuple[float, float]:
    """(wall s, peak RSS MB) of a fresh process running all four pipelines."""
    code = f"""
import sys, time, resource, torch
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from dicom_node.rules import load_rules
from inference.engine import Engine
from inference.registry import load_registry
from inference.path_api import load_input
t = time.perf_counter()
registry = load_registry()
rules = load_rules(Path({str(ROOT / "routing_rules.yaml")!r}))
engine = Engine(registry, torch.device("cpu"))
study = Path({str(study_dir)!r})
folders = {{p: study / f"0{{n}}_{{p}}" for p, n in (("A", 3), ("P", 4), ("D", 5))}}
phase_of = {{"image": "P", "A": "A", "P": "P", "D": "D"}}
for name in ("totalseg", "vessel", "ureter", "tumor"):
    spec = rules.pipelines[name]
    inputs = {{
        r: load_input({{"path": str(folders[phase_of[r]])}}, engine=engine) for r in spec.inputs
    }}
    engine.run(name, spec, inputs, mask_dir=Path({str(study_dir)!r}) / "masks")
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall, rss = out.stdout.split()[-2:]
    return float(wall), float(rss)


def run_naive(study_dir: Path, work: Path) -> tuple[float, float, float]:
    """(wall s, peak RSS MB of the largest single CLI run, sum of CLI wall s)."""
    import SimpleITK as sitk

    registry = load_registry()
    started = time.perf_counter()
    nifti: dict[str, Path] = {}
    for phase, number in (("A", 3), ("P", 4), ("D", 5)):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(study_dir / f"0{number}_{phase}")))
        nifti[phase] = work / f"{phase}.nii.gz"
        sitk.WriteImage(reader.Execute(), str(nifti[phase]))
    plan = {"totalseg": "P", "vessel": "AP", "ureter": "D", "tumor": "P"}
    peak = 0.0
    for model_id, phases in plan.items():
        spec = registry.get(model_id)
        src = work / f"in_{model_id}"
        src.mkdir()
        for i, phase in enumerate(phases):
            (src / f"case_{i:04d}.nii.gz").symlink_to(nifti[phase])
        cmd = [str(CLI), "-i", str(src), "-o", str(work / f"out_{model_id}"),
               "-m", str(spec.model_folder), "-f", "0", "-device", "cpu",
               "-npp", "1", "-nps", "1", "--disable_tta"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        peak = max(peak, _children_peak_mb())  # RUSAGE_CHILDREN: the largest child so far
    return time.perf_counter() - started, peak, 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=192, help="rows = columns of each series")
    args = parser.parse_args()
    load_rules(ROOT / "routing_rules.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        tmp_path = Path(tmp)
        spacing = 400.0 / args.size
        generate_study(tmp_path / "study", seed=7, rows=args.size, columns=args.size,
                       pixel_spacing_mm=spacing, slice_thickness_mm=2.5)  # fmt: skip
        (tmp_path / "naive").mkdir()
        naive_wall, naive_peak, _ = run_naive(tmp_path / "study", tmp_path / "naive")
        engine_wall, engine_peak = run_engine(tmp_path / "study", args.size)
    print(f"synthetic N/A/P/D study, {args.size}x{args.size} px, 4 pipelines, CPU")
    print(f"{'chain':<44}{'wall s':>9}{'peak RSS MB':>13}")
    print(f"{'(a) engine: read once, warm, in-process':<44}{engine_wall:>9.1f}{engine_peak:>13.0f}")
    print(f"{'(b) naive: NIfTI + 1 CLI process per model':<44}{naive_wall:>9.1f}"
          f"{naive_peak:>13.0f}  (largest single model run)")  # fmt: skip
    print(
        f"speed-up (b)/(a): {naive_wall / engine_wall:.1f}x; "
        f"peak RSS (a) / largest single run: {engine_peak / naive_peak:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
