"""Engine benchmark: one synthetic N/A/P/D study, all four seed pipelines.

(a) this engine: each series read once, warm models, in-process prediction, the tumour
    model cropped to the organ model's kidneys (whose label map the totalseg pipeline
    already made). Measured in one fresh process twice: the first study cold (imports,
    model loading included), then a second study on the warm worker, which is how the node
    runs: its worker keeps models loaded between jobs.
(b) the naive chain the seed service started from: every series written to NIfTI, then one
    ``nnUNetv2_predict_from_modelfolder`` process per model (full volume, same settings).
Peak memory is the resident memory of the whole process tree (the CLI starts worker
processes), sampled every 20 ms. Run: ``.venv/bin/python bench/bench_engine.py``
(``--size 512`` for a scanner's 512x512 series; the stand-ins must be in models/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.synth import generate_study  # noqa: E402
from inference.registry import load_registry  # noqa: E402

CLI = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
PAGE = os.sysconf("SC_PAGE_SIZE")
# Which phase feeds each model channel (the shipped pipelines' first choices).
MODEL_PHASES = {"totalseg": "P", "vessel": "AP", "ureter": "D", "tumor": "P"}

PHASE_OF_ROLE = {"image": "P", "A": "A", "P": "P", "D": "D"}


def engine_child(studies: list[str], threads: int, registry: str, launched: float) -> None:
    """(a), in the fresh process ``run_engine`` measures: all four pipelines per study, then
    the tumour model alone, cropped and full. Prints one JSON line. The first study's time
    counts from ``launched`` (the parent's clock at start), so it includes the imports."""
    import numpy as np
    import torch

    from devkit.memwatch import peak_rss
    from dicom_node.rules import load_rules
    from inference.engine import Engine
    from inference.path_api import load_input
    from kernel.catalog import CropSpec

    torch.set_num_threads(threads)
    pipelines = dict(load_rules(ROOT / "routing_rules.yaml").pipelines)
    # The tumour model runs inside totalseg's kidneys (+ 20 mm), as a deployment would set it.
    crop_spec = CropSpec(to_model="totalseg", labels=["kidney_left", "kidney_right"])
    pipelines["tumor"] = pipelines["tumor"].model_copy(update={"crop": crop_spec})
    engine = Engine(load_registry(Path(registry)), torch.device("cpu"))
    times, started = [], launched
    for study in map(Path, studies):
        folders = {p: study / f"0{n}_{p}" for p, n in (("A", 3), ("P", 4), ("D", 5))}
        for name in ("totalseg", "vessel", "ureter", "tumor"):
            spec = pipelines[name]
            inputs = {
                role: load_input({"path": str(folders[PHASE_OF_ROLE[role]])}, engine=engine)
                for role in spec.inputs
            }
            engine.run(name, spec, inputs, mask_dir=study / "masks")
        times.append(time.time() - started)
        started = time.time()

    # The tumour model alone on the last study's P, in totalseg's kidney box and on the full
    # volume (the crop first, so memory it leaves behind only lowers the full run's growth).
    volume = load_input({"path": str(folders["P"])}, engine=engine)
    box = engine.crop_box("tumor", crop_spec, {"image": volume}, volume)  # totalseg's, cached
    crop = {"box_fraction": float(np.prod([s.stop - s.start for s in box]) / volume.array.size)}
    for model in ("tumor", "tumor_patch128"):
        engine.predict(model, {"image": volume}, box)  # load and warm up
        for name, b in (("crop", box), ("full", None)):
            with peak_rss() as mem:
                t = time.perf_counter()
                engine.predict(model, {"image": volume}, b)
                crop[f"{model} {name}"] = [time.perf_counter() - t, mem.growth_mb]
    print(json.dumps({"times": times, "crop": crop}))


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    parent_of: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * PAGE
        except OSError:  # the process ended while we looked
            continue
        parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, changed = {root_pid}, True
    while changed:
        children = {pid for pid, ppid in parent_of.items() if ppid in tree} - tree
        tree |= children
        changed = bool(children)
    return sum(rss.get(pid, 0) for pid in tree)


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak tree RSS MB, stdout) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, peak / 2**20, out


def registry_with_small_patch_tumor(work: Path) -> Path:
    """models.yaml plus ``tumor_patch128``: the tumour stand-in with a 64x128x128 patch.

    The stand-ins' patches cover a whole series, and nnU-Net pads a smaller input up to the
    patch, so a crop saves them nothing. Real nnU-Net plans have patches of this size,
    which tile a whole abdomen many times; the stand-in has no normalisation layers, so
    its output does not depend on the patch and the copy shows what a crop saves then.
    """
    raw = yaml.safe_load((ROOT / "models.yaml").read_text())
    folder = work / "tumor_patch128"
    shutil.copytree(ROOT / "models" / "tumor", folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [64, 128, 128]
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    for entry in raw["models"].values():
        entry["folder"] = str(ROOT / entry["folder"])
    raw["models"]["tumor_patch128"] = {**raw["models"]["tumor"], "folder": str(folder)}
    path = work / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_engine(studies: list[Path], threads: int, registry: Path) -> tuple[dict, float, float]:
    """({"times": per-study s, "crop": tumour crop vs full}, process wall s, peak RSS MB)."""
    args = {"studies": [str(s) for s in studies], "threads": threads,
            "registry": str(registry), "launched": time.time()}  # fmt: skip
    wall, peak, out = run_measured([sys.executable, __file__, "--engine-child", json.dumps(args)])
    return json.loads(out.strip().splitlines()[-1]), wall, peak


def run_naive(
    study: Path, work: Path, processes: int
) -> tuple[float, dict[str, tuple[float, float]]]:
    """(total wall s, {model: (wall s, peak tree RSS MB)}), NIfTI writing included.

    ``processes``: the CLI's preprocessing and export worker counts (-npp / -nps; its
    default is 3 each, 1 is the leanest it runs with).
    """
    import SimpleITK as sitk

    registry = load_registry()
    started = time.perf_counter()
    nifti: dict[str, Path] = {}
    for phase, number in (("A", 3), ("P", 4), ("D", 5)):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(study / f"0{number}_{phase}")))
        nifti[phase] = work / f"{phase}.nii.gz"
        sitk.WriteImage(reader.Execute(), str(nifti[phase]))
    per_model = {}
    for model_id, phases in MODEL_PHASES.items():
        spec = registry.get(model_id)
        src = work / f"in_{model_id}_{processes}"
        src.mkdir()
        for i, phase in enumerate(phases):
            (src / f"case_{i:04d}.nii.gz").symlink_to(nifti[phase])
        cmd = [str(CLI), "-i", str(src), "-o", str(work / f"out_{model_id}_{processes}"),
               "-m", str(spec.model_folder), "-f", *map(str, spec.folds),
               "-chk", spec.checkpoint, "-step_size", str(spec.tile_step_size),
               "-device", "cpu", "-npp", str(processes), "-nps", str(processes)]  # fmt: skip
        if not spec.use_mirroring:
            cmd.append("--disable_tta")
        wall, peak, _ = run_measured(cmd)
        per_model[model_id] = (wall, peak)
    return time.perf_counter() - started, per_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=192, help="rows = columns of each series")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both chains")
    parser.add_argument("--engine-child", help=argparse.SUPPRESS)  # run_engine's process
    args = parser.parse_args()
    if args.engine_child:
        engine_child(**json.loads(args.engine_child))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CLI processes too
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        tmp_path = Path(tmp)
        spacing = 400.0 / args.size
        studies = [
            generate_study(
                tmp_path / f"study{seed}",
                seed=seed,
                rows=args.size,
                columns=args.size,
                pixel_spacing_mm=spacing,
            )
            for seed in (7, 3)
        ]
        folders = [tmp_path / f"study{s.seed}" for s in studies]
        (tmp_path / "naive").mkdir()
        naive = {n: run_naive(folders[0], tmp_path / "naive", n) for n in (3, 1)}
        registry = registry_with_small_patch_tumor(tmp_path)
        measured, engine_wall, engine_peak = run_engine(folders, args.threads, registry)
    cold, warm = measured["times"]
    crop = measured["crop"]

    print(f"synthetic N/A/P/D study, {args.size}x{args.size} px at {spacing:.2f} mm, 4 pipelines "
          f"(totalseg, vessel, ureter, tumor), CPU, {args.threads} threads\n")  # fmt: skip
    print("| chain | wall s | peak RSS MB |")
    print("| --- | ---: | ---: |")
    for n, (naive_wall, per_model) in naive.items():
        label = f"(b) naive, CLI -npp {n} -nps {n}" + (" (its default)" if n == 3 else "")
        for model_id, (wall, peak) in per_model.items():
            print(f"| {label}: {model_id} process | {wall:.1f} | {peak:.0f} |")
        largest = max(peak for _, peak in per_model.values())
        print(f"| {label}: NIfTI + 4 processes | {naive_wall:.1f} | {largest:.0f} (largest) |")
    print(f"| (a) engine, fresh process (imports, model loading) | {cold:.1f} | |")
    print(f"| (a) engine, next study on the warm worker | {warm:.1f} | |")
    print(f"| (a) engine process, both studies | {engine_wall:.1f} | {engine_peak:.0f} |")
    print(f"\ntumour model alone on P, totalseg's kidneys + 20 mm "
          f"({crop['box_fraction']:.0%} of the volume) vs the full volume:\n")  # fmt: skip
    print("| model | crop s | full s | crop peak RSS growth MB | full MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for model in ("tumor", "tumor_patch128"):
        (cs, cm), (fs, fm) = crop[f"{model} crop"], crop[f"{model} full"]
        print(f"| {model} | {cs:.2f} | {fs:.2f} | {cm:.0f} | {fm:.0f} |")
    print()
    for n, (naive_wall, per_model) in naive.items():
        largest = max(peak for _, peak in per_model.values())
        print(
            f"vs CLI -npp {n} -nps {n}: speed-up warm worker {naive_wall / warm:.1f}x, "
            f"fresh process {naive_wall / cold:.1f}x; "
            f"peak RSS engine / largest single model run {engine_peak / largest:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
