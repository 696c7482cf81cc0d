"""Send throughput to one Orthanc: the node's STOW-RS senders vs its C-STORE senders.

A synthetic series of 512x512 CT instances (``bench_receive.make_instances``) is queued in a
fresh SQLite outbox (``outbox.queue_many``, as a forward rule queues it) and delivered by
the node's own senders (``Dispatcher.sender``: ``dispatch_dicomweb.DicomwebSender`` for a
``kind: dicomweb`` destination, ``dispatch.DestinationSender`` for DIMSE), K at once
(``max_associations``), to a fresh Orthanc with its DICOMweb plugin for each run. Timed
from the senders' start until every row is recorded; every row must be ``sent`` and
Orthanc must hold every instance, otherwise the run is a failure, not a number. The
peak growth of this process's resident memory during the send is sampled too.

    .venv/bin/python bench/bench_send_dicomweb.py [--instances 300] [--repeat 3]
        [--associations 1,2] [--json [PATH]] [--workdir DIR]

Prints median images/s and MiB/s per protocol and K, and the STOW-RS / C-STORE ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_receive import make_instances
from bench_send import deliver, sop_objects

from devkit.orthanc import OrthancServer
from kernel.settings import Destination

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PROTOCOLS = ("dimse", "dicomweb")


@dataclass
class Run:
    protocol: str
    associations: int
    repetition: int
    expected: int
    seconds: float | None = None
    rss_growth_mb: float | None = None
    error: str | None = None


def run_once(
    protocol: str, objects: list[tuple[str, str, str]], k: int, rep: int, base: Path
) -> Run:
    run = Run(protocol, k, rep, len(objects))
    workdir = Path(tempfile.mkdtemp(prefix=f"{protocol}-{k}-{rep}-", dir=base))
    pacs = OrthancServer(
        workdir / "orthanc",
        extra_config={"Plugins": [PLUGIN], "DicomWeb": {"Enable": True}},
    )
    try:
        pacs.start()
        if protocol == "dicomweb":
            dest = Destination(
                name="bench", kind="dicomweb", url=f"{pacs.url}/dicom-web", max_associations=k
            )
        else:
            dest = Destination(
                name="bench", ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port,
                max_associations=k,
            )  # fmt: skip
        run.seconds, run.rss_growth_mb = deliver(objects, dest, workdir, measure_memory=True)
        held = pacs.count_instances()
        if held != len(objects):
            run.error = f"Orthanc holds {held} of {len(objects)} instances"
    except Exception as exc:  # a benchmark reports failures instead of stopping
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        pacs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return run


def summarise(runs: list[Run], total_bytes: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({(r.protocol, r.associations) for r in runs}):
        mine = [r for r in runs if (r.protocol, r.associations) == key]
        good = [r for r in mine if r.error is None and r.seconds]
        median_s = statistics.median(r.seconds for r in good) if good else None
        out[f"{key[0]}@{key[1]}"] = {
            "runs": len(mine),
            "failed": len(mine) - len(good),
            "median_s": median_s,
            "images_per_s": mine[0].expected / median_s if median_s else None,
            "mib_per_s": total_bytes / 2**20 / median_s if median_s else None,
            "peak_rss_growth_mb": max((r.rss_growth_mb or 0) for r in good) if good else None,
            "errors": sorted({r.error for r in mine if r.error}),
        }
    return out


def render(summary: dict[str, dict[str, Any]], instances: int, total_bytes: int) -> str:
    lines = [
        f"{instances} instances, {total_bytes / 2**20:.0f} MiB, to Orthanc "
        "(DICOMweb plugin) on 127.0.0.1",
        f"{'sender':<14}{'images/s':>10}{'MiB/s':>9}{'median s':>10}{'RSS+ MiB':>10}  failed",
    ]
    for key, row in summary.items():

        def fmt(value: float | None, spec: str) -> str:
            return format(value, spec) if value is not None else "-"

        lines.append(
            f"{key:<14}{fmt(row['images_per_s'], '.1f'):>10}{fmt(row['mib_per_s'], '.1f'):>9}"
            f"{fmt(row['median_s'], '.2f'):>10}{fmt(row['peak_rss_growth_mb'], '.1f'):>10}"
            f"  {row['failed']}/{row['runs']}"
        )
    for key in summary:
        if key.startswith("dicomweb@"):
            k = key.split("@")[1]
            web, dimse = (
                summary[key]["images_per_s"],
                summary.get(f"dimse@{k}", {}).get("images_per_s"),
            )
            if web and dimse:
                lines.append(f"STOW-RS / C-STORE at K={k}: {web / dimse:.2f}x")
    for row in summary.values():
        lines += [f"  error: {e}" for e in row["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--associations", default="1,2", help="K values, comma separated")
    parser.add_argument("--json", nargs="?", const="-", help="also write JSON (to PATH or -)")
    parser.add_argument("--workdir", type=Path, help="keep the instances here (default: temp)")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.associations.split(",") if k.strip()]
    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench-send-dicomweb-"))
    base.mkdir(parents=True, exist_ok=True)
    files = make_instances(base / "series", args.instances)
    objects = sop_objects(files)
    total_bytes = sum(p.stat().st_size for p in files)
    runs = []
    for rep in range(args.repeat):
        order = [(p, k) for k in ks for p in PROTOCOLS]
        order = order[rep % len(order) :] + order[: rep % len(order)]  # rotate
        for protocol, k in order:
            runs.append(run_once(protocol, objects, k, rep, base))
    summary = summarise(runs, total_bytes)
    print(render(summary, len(files), total_bytes))
    if args.json:
        text = json.dumps(
            {"summary": summary, "runs": [asdict(r) for r in runs]}, indent=2, default=str
        )
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
