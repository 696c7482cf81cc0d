"""SEG writing benchmark: our highdicom writer (BINARY and LABELMAP) against
TotalSegmentator's own DICOM-SEG writer on the same label map.

A synthetic 512x512x300 CT series is written to disk and a label map with 10 labels
(ellipsoids of organ-like sizes) is built once. Each writer then runs in a fresh process,
starting from the same state (series folder on disk, label map in memory), so wall time
and peak RSS are its own; "RSS above start" is the peak minus what the process held after
loading the inputs. Run: ``python bench/bench_seg.py`` (``--slices 100`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernel.uids import derived_uid  # noqa: E402

# TotalSegmentator class names (its SNOMED table knows them) for the 10 labels.
TOTALSEG_NAMES = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver",
    "stomach", "pancreas", "aorta", "inferior_vena_cava", "urinary_bladder",
]  # fmt: skip
WRITERS = ("ours BINARY", "ours LABELMAP", "TotalSegmentator")


def write_series(folder: Path, slices: int, size: int) -> None:
    folder.mkdir(parents=True)
    study, series = derived_uid("bench-seg", "study"), derived_uid("bench-seg", "series")
    pixels = np.full((size, size), 1024 + 40, dtype=np.int16).tobytes()
    for z in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = derived_uid(series, str(z))
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, derived_uid(series, str(z))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = derived_uid("bench-seg", "for")
        ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "BENCH", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "Bench^Seg",
            "B1",
            "",
            "O",
        )
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1", "", "1"
        ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = 1, z + 1, ""
        ds.ImagePositionPatient = [-200.0, -200.0, -375.0 + 2.5 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.78125, 0.78125], "2.5"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = pixels
        ds.save_as(folder / f"{z:04d}.dcm", enforce_file_format=True)


def make_label_map(slices: int, size: int, labels: int) -> np.ndarray:
    """[z, y, x] uint8 with ``labels`` non-overlapping ellipsoids of 10-60 mm radius."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:slices, :size, :size]
    label_map = np.zeros((slices, size, size), dtype=np.uint8)
    for value in range(1, labels + 1):
        radius_mm = rng.uniform(10, 60, size=3)
        radius = radius_mm / np.array([2.5, 0.78125, 0.78125])
        centre = [rng.uniform(r, n - r) for r, n in zip(radius, (slices, size, size), strict=True)]
        lo = [max(0, int(c - r)) for c, r in zip(centre, radius, strict=True)]
        hi = [
            min(n, int(c + r) + 1)
            for c, r, n in zip(centre, radius, (slices, size, size), strict=True)
        ]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        inside = (
            ((z[box[0]] - centre[0]) / radius[0]) ** 2
            + ((y[:, box[1]] - centre[1]) / radius[1]) ** 2
            + ((x[:, :, box[2]] - centre[2]) / radius[2]) ** 2
        ) <= 1
        region = label_map[box]
        region[inside & (region == 0)] = value
    return label_map


def run_one(writer: str, series_dir: Path, map_path: Path, out_dir: Path) -> dict:
    """Runs inside the child process: load inputs, write once, report."""
    import resource
    import time

    label_map = np.load(map_path)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if writer.startswith("ours"):
        from inference.seg_writer import (
            ANATOMICAL_STRUCTURE,
            Algorithm,
            Code,
            SegmentLabel,
            write_seg,
        )

        headers = [
            pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.iterdir())
        ]
        headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        organ = Code("91723000", "SCT", "Anatomical Structure")
        labels = [
            SegmentLabel(v, name, ANATOMICAL_STRUCTURE, organ)
            for v, name in enumerate(TOTALSEG_NAMES[: int(label_map.max())], start=1)
        ]
        seg_type = writer.split()[1]
        path = write_seg(
            headers,
            label_map,
            labels,
            path=out_dir / f"{seg_type}.dcm",
            algorithm=Algorithm("bench", "1"),
            series_instance_uid=derived_uid("bench-seg", seg_type, "series"),
            sop_instance_uid=derived_uid("bench-seg", seg_type, "sop"),
            series_number=900,
            series_description="bench",
            seg_type=seg_type,  # type: ignore[arg-type]
        )
    else:
        from totalsegmentator.dicom_io import save_mask_as_dicomseg

        classes = dict(enumerate(TOTALSEG_NAMES[: int(label_map.max())], start=1))
        # TotalSegmentator hands its writer a NIfTI-ordered [x, y, z] array.
        path = out_dir / "totalsegmentator.dcm"
        save_mask_as_dicomseg(
            np.ascontiguousarray(label_map.transpose(2, 1, 0)), classes, series_dir, path, np.eye(4)
        )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_above_start_mb": peak - start_rss,
        "file_mb": Path(path).stat().st_size / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs per writer (median)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        writer, series_dir, map_path, out_dir = args.child
        print(json.dumps(run_one(writer, Path(series_dir), Path(map_path), Path(out_dir))))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-seg-") as tmp:
        base = Path(tmp)
        write_series(base / "ct", args.slices, args.size)
        label_map = make_label_map(args.slices, args.size, args.labels)
        np.save(base / "map.npy", label_map)
        print(
            f"# {args.slices} slices of {args.size}x{args.size}, {args.labels} labels, "
            f"{int((label_map > 0).sum()):,} labelled voxels; median of {args.repeats} runs, "
            "each writer in a fresh process"
        )
        results = {}
        for writer in WRITERS:
            runs = []
            for _ in range(args.repeats):
                out = base / "out"
                out.mkdir(exist_ok=True)
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", writer, str(base / "ct"),
                     str(base / "map.npy"), str(out)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if proc.returncode != 0:
                    print(f"{writer} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            results[writer] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        reference = results["TotalSegmentator"]["seconds"]
        print("| writer | seconds | x faster than TotalSegmentator | peak RSS MB | "
              "RSS above start MB | file MB |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for writer, r in results.items():
            print(
                f"| {writer} | {r['seconds']:.2f} | {reference / r['seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['rss_above_start_mb']:.0f} | {r['file_mb']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
