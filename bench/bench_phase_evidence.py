"""Phase from the image: cost per series and the hold-out, against tags alone in one run.

    .venv/bin/python bench/bench_phase_evidence.py [--threads 2] [--seeds 8]

Part 1 times the image evidence of one series the way a worker computes it (the series
read once, resampled to the organ model's spacing, the model run, HU measured on the
series' own voxels) at 192 and 512 px; the budget is 3 s per series on 2 CPU cores. The
first run of a fresh engine includes loading the model.

Part 2 classifies the hold-out (``devkit.phase_holdout``: single P, P + D, A + P without
contrast tags, N + A + P + D without times, generic descriptions, unseen phantom seeds)
by tags alone (the reference) and by tags + image evidence, and prints accuracy and the
wrong phases given with confidence >= 0.7.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from devkit import phase_holdout
    from devkit.synth import generate_study
    from dicom_node.rules import load_rules
    from inference.engine import Engine
    from inference.phase_evidence import measure
    from inference.registry import load_registry
    from inference.volume import load_series

    rules = load_rules(ROOT / "routing_rules.yaml")
    evidence = rules.spec.phases.image_evidence
    registry = load_registry(ROOT / "models.yaml")
    engine = Engine(registry, torch.device("cpu"))

    print(f"# image evidence: model {evidence.model}, {args.threads} CPU threads\n")
    print(f"{'series':>22} {'read s':>8} {'evidence s':>11} {'run':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for rows, spacing in ((192, 2.08), (512, 0.78)):
            study = generate_study(
                Path(tmp) / str(rows), seed=77, phases="P", rows=rows, columns=rows,
                pixel_spacing_mm=spacing,
            )  # fmt: skip
            files = study.series[0].files
            started = time.perf_counter()
            volume = load_series(files)
            read_s = time.perf_counter() - started
            for run in ("first (loads)", "warm"):
                started = time.perf_counter()
                measure(engine, evidence.model, volume, evidence.structures)
                took = time.perf_counter() - started
                label = f"{rows} px x {len(files)} slices"
                print(f"{label:>22} {read_s:>8.2f} {took:>11.2f} {run:>14}")

    seeds = list(range(7001, 7001 + args.seeds))
    timings: list[float] = []
    outcomes = phase_holdout.run(rules, engine, seeds, timings=timings)
    print(f"\n# hold-out: {len(seeds)} unseen seeds x 4 protocols, {len(outcomes)} series\n")
    print(f"{'method':>20} {'correct':>9} {'accuracy':>9} {'wrong with conf >= 0.7':>23}")
    for method, label in (("tags", "tags alone (ref.)"), ("image", "tags + image")):
        correct, total, confident = phase_holdout.score(outcomes, method)
        print(f"{label:>20} {correct:>4}/{total:<4} {correct / total:>9.1%} {confident:>23}")
    per = {}
    for o in outcomes:
        c, t = per.get(o.protocol, (0, 0))
        per[o.protocol] = (c + (o.image[0] == o.truth), t + 1)
    by_protocol = ", ".join(f"{k} {c}/{t}" for k, (c, t) in per.items())
    print(f"\nper protocol (tags + image): {by_protocol}")
    print(f"evidence per series on the hold-out grid: median {statistics.median(timings):.2f} s")
    wrong = [o for o in outcomes if o.image[0] != o.truth]
    for o in wrong:
        print(f"  wrong: {o.protocol} seed {o.seed} {o.truth} -> {o.image}: {o.reasons[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
