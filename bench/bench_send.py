"""Send throughput: the node's dispatcher vs DCMTK storescu, both to the same receiver.

A synthetic series of 512x512 CT instances (``devkit.synth``, as ``bench_receive.py``) is
sent to a fresh Orthanc (or DCMTK storescp, ``--receiver storescp``) for each run, in turn:

- ``storescu``: DCMTK storescu over K associations at once (K processes, contiguous
  chunks), timed from its start to the last one's exit;
- ``node``: the node's own sender code (``dicom_node.dispatch.DestinationSender``, as
  ``dicom-node serve`` runs it, one per association, ``max_associations`` = K) on rows
  queued in a migrated SQLite outbox with ``kernel.outbox.queue_many``, exactly as a
  forward rule queues them; timed from the senders' start until every row is recorded
  ``sent`` (association set-up, claims, each outcome's transaction included).

Repetitions are interleaved (the order rotates). After every run the receiver must hold
every instance, otherwise the run is a failure, not a number.

    .venv/bin/python bench/bench_send.py [--instances 300] [--repeat 3]
        [--associations 1,2] [--receiver orthanc|storescp] [--json [PATH]] [--workdir DIR]

Prints median images/s per sender and number of associations, and node/storescu ratios
(same K, and the node at each K over storescu over one association). Goal (issue 17):
node >= 0.8x storescu to the same Orthanc. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from bench_receive import (
    CALLING_AE,
    HOST,
    OrthancReceiver,
    Receiver,
    StorescpReceiver,
    make_instances,
    send_all,
)
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Dispatch
from db.session import Database
from devkit.dcmtk import dcmtk_tool
from devkit.memwatch import peak_rss
from dicom_node.dispatch import Dispatcher
from kernel import outbox
from kernel.settings import Destination, DispatchSettings
from kernel.vocabulary import OutboxKind

SENDERS = ("storescu", "node")
RECEIVERS = {"orthanc": OrthancReceiver, "storescp": StorescpReceiver}
SETTLE_S = 10.0  # how long the receiver's count may lag behind the sender's end


@dataclass
class RunResult:
    sender: str
    associations: int
    repetition: int
    expected: int
    received: int = 0
    seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.received == self.expected

    @property
    def images_per_s(self) -> float | None:
        return self.expected / self.seconds if self.ok and self.seconds else None


# -- senders --------------------------------------------------------------------------


def sop_objects(files: list[Path]) -> list[tuple[str, str, str]]:
    """(SOP Instance UID, SOP Class UID, path) of each file, as the outbox stores them."""
    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path)))
    return out


def node_send(
    objects: list[tuple[str, str, str]], aet: str, port: int, associations: int, workdir: Path
) -> float:
    """The node's senders deliver ``objects`` over ``associations`` C-STORE associations
    from a fresh outbox; returns the seconds (``deliver``)."""
    dest = Destination(
        name="bench", ae_title=aet, host=HOST, port=port, max_associations=associations
    )
    return deliver(objects, dest, workdir)[0]


def deliver(
    objects: list[tuple[str, str, str]],
    dest: Destination,
    workdir: Path,
    measure_memory: bool = False,
) -> tuple[float, float | None]:
    """``dest``'s senders (its kind's, ``max_associations`` of them) deliver ``objects``
    from a fresh outbox in ``workdir``: (seconds from their start until the last row was
    recorded, peak RSS growth in MiB when ``measure_memory``, else None). Raises when a
    row is not ``sent``."""
    url = f"sqlite:///{workdir / 'node.db'}"
    upgrade(url)
    db = Database(url)
    try:
        with db.session() as s:
            outbox.queue_many(
                s, study_id=None, kind=OutboxKind.FORWARD, objects=objects, destination=dest.name
            )
        dispatcher = Dispatcher(db, {dest.name: dest}, DispatchSettings(), CALLING_AE)
        senders = [dispatcher.sender(dest, slot) for slot in range(dest.max_associations)]
        threads = [threading.Thread(target=sender.send_due) for sender in senders]
        with peak_rss() if measure_memory else nullcontext() as memory:
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
        with db.session() as s:
            states = Counter(s.scalars(select(Dispatch.state)))
            errors = sorted({e for e in s.scalars(select(Dispatch.last_error)) if e})
        if states != {"sent": len(objects)}:
            raise RuntimeError(f"rows {dict(states)}; errors: {errors[:3]}")
        return seconds, memory.growth_mb if memory is not None else None
    finally:
        db.dispose()


def _settled_count(receiver: Receiver, expected: int) -> int:
    deadline = time.monotonic() + SETTLE_S
    while True:
        received = receiver.count()
        if received >= expected or time.monotonic() > deadline:
            return received
        time.sleep(0.2)


def run_once(
    sender: str,
    receiver_name: str,
    files: list[Path],
    objects: list[tuple[str, str, str]],
    associations: int,
    repetition: int,
    base: Path,
) -> RunResult:
    result = RunResult(sender, associations, repetition, expected=len(files))
    receiver = RECEIVERS[receiver_name]()
    workdir = Path(tempfile.mkdtemp(prefix=f"{sender}-{associations}-{repetition}-", dir=base))
    try:
        receiver.start(workdir)
        if sender == "storescu":
            result.seconds, output = send_all(files, receiver.aet, receiver.port, associations)
        else:
            output = ""
            result.seconds = node_send(objects, receiver.aet, receiver.port, associations, workdir)
        result.received = _settled_count(receiver, len(files))
        if result.received != len(files):
            result.error = f"received {result.received} of {len(files)} instances"
            if output:
                result.error += f"; storescu said: {output[-500:]}"
    except Exception as exc:  # a benchmark reports failures instead of stopping
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# -- report ---------------------------------------------------------------------------


def _key(sender: str, associations: int) -> str:
    return f"{sender}@{associations}"


def summarise(runs: list[RunResult], total_bytes: int) -> dict[str, Any]:
    good = [r for r in runs if r.ok and r.seconds]
    rates = [r.images_per_s for r in good if r.images_per_s]
    median_s = statistics.median([r.seconds for r in good if r.seconds]) if good else None
    return {
        "sender": runs[0].sender,
        "associations": runs[0].associations,
        "runs": len(runs),
        "failures": len(runs) - len(good),
        "median_s": median_s,
        "median_images_per_s": statistics.median(rates) if rates else None,
        "min_images_per_s": min(rates) if rates else None,
        "max_images_per_s": max(rates) if rates else None,
        "median_mb_per_s": total_bytes / 1e6 / median_s if median_s else None,
        "errors": sorted({r.error for r in runs if r.error}),
    }


def ratios(summary: dict[str, dict[str, Any]], associations: list[int]) -> dict[str, float | None]:
    """node/storescu at the same number of associations, and the node at each K over
    storescu over one association (what a forward costs against a plain storescu)."""

    def rate(sender: str, k: int) -> float | None:
        s = summary.get(_key(sender, k))
        return s["median_images_per_s"] if s else None

    out: dict[str, float | None] = {}
    for k in associations:
        node, scu = rate("node", k), rate("storescu", k)
        if _key("node", k) in summary and _key("storescu", k) in summary:
            out[f"node x{k} / storescu x{k}"] = node / scu if node and scu else None
    single = rate("storescu", 1)
    for k in associations:
        if k > 1 and _key("node", k) in summary and _key("storescu", 1) in summary:
            node = rate("node", k)
            out[f"node x{k} / storescu x1"] = node / single if node and single else None
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"send throughput to {cfg['receiver']}: {cfg['instances']} x 512x512 CT "
        f"({cfg['total_mb']:.0f} MB), {cfg['repeat']} repetitions",
        f"host: {cfg['cpus']} CPUs, load average before run {cfg['load_average']}, "
        f"after {cfg['load_average_after']}",
        "",
        f"{'sender':<9} {'assocs':>6} {'ok/runs':>8} {'median s':>9} {'images/s':>9} "
        f"{'min':>8} {'max':>8} {'MB/s':>7} {'ms/img':>7}",
    ]
    for s in report["summary"].values():
        rate, ok = s["median_images_per_s"], s["runs"] - s["failures"]
        lines.append(
            f"{s['sender']:<9} {s['associations']:>6} {ok:>3}/{s['runs']:<4} "
            f"{_fmt(s['median_s'], '.2f'):>9} {_fmt(rate):>9} "
            f"{_fmt(s['min_images_per_s']):>8} {_fmt(s['max_images_per_s']):>8} "
            f"{_fmt(s['median_mb_per_s']):>7} {_fmt(1000 / rate if rate else None, '.2f'):>7}"
        )
    if report["ratios"]:
        lines.append("")
        for key, value in report["ratios"].items():
            lines.append(f"ratio {key:<24} {_fmt(value, '.2f')}")
    lines += ["", "| sender | associations | img/s (median) | ratio to storescu, same K |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for s in report["summary"].values():
        k = s["associations"]
        ratio = report["ratios"].get(f"node x{k} / storescu x{k}")
        ratio = ratio if s["sender"] == "node" else None
        lines.append(
            f"| {s['sender']} | {k} | {_fmt(s['median_images_per_s'], '.0f')} | "
            f"{_fmt(ratio, '.2f') if ratio else '-'} |"
        )
    failures = [(s["sender"], e) for s in report["summary"].values() for e in s["errors"]]
    if failures:
        lines += ["", "failures:"]
        for name, error in failures:
            parts = error.strip().splitlines()
            shown = parts if len(parts) <= 5 else [parts[0], "...", *parts[-3:]]
            lines.append(f"  {name}: {' | '.join(p.strip() for p in shown)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300, help="CT instances per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per sender")
    parser.add_argument(
        "--associations",
        default="1,2",
        help="associations at once (storescu processes / the node's max_associations); "
        "a comma-separated list runs each",
    )
    parser.add_argument("--only", default=",".join(SENDERS), help="subset of storescu,node")
    parser.add_argument("--receiver", choices=sorted(RECEIVERS), default="orthanc")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="PATH",
        help="write the results as JSON to PATH ('-' or no value: stdout instead of the table)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="folder for temporary files (default: TMP)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - set(SENDERS))
    if unknown:
        parser.error(f"unknown sender(s) {unknown}; choose from {', '.join(SENDERS)}")
    try:
        args.associations = sorted({int(k) for k in args.associations.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--associations needs numbers, got {args.associations!r}")
    if not args.associations or not 1 <= min(args.associations) <= max(args.associations) <= 16:
        parser.error("--associations must be 1 to 16")
    if args.instances < 1 or args.repeat < 1:
        parser.error("--instances and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp"):
        if dcmtk_tool(tool) is None:
            print(f"{tool} not found: install the Debian package 'dcmtk'", file=sys.stderr)
            return 2
    load_average = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-send-", dir=args.workdir) as tmp:
        base = Path(tmp)
        files = make_instances(base / "input", args.instances, seed=args.seed)
        objects = sop_objects(files)
        total_bytes = sum(f.stat().st_size for f in files)
        for repetition in range(args.repeat):
            shift = repetition % len(args.only)  # no sender always first (cold caches)
            for k in args.associations:
                for sender in args.only[shift:] + args.only[:shift]:
                    result = run_once(sender, args.receiver, files, objects, k, repetition, base)
                    runs.setdefault(_key(sender, k), []).append(result)
                    status = f"{result.images_per_s:.1f} images/s" if result.ok else result.error
                    print(f"  run {repetition + 1} {sender} x{k}: {status}", file=sys.stderr)
    order = [_key(s, k) for s in SENDERS for k in args.associations if _key(s, k) in runs]
    summary = {key: summarise(runs[key], total_bytes) for key in order}
    report: dict[str, Any] = {
        "config": {
            "instances": args.instances,
            "associations": args.associations,
            "receiver": args.receiver,
            "repeat": args.repeat,
            "total_mb": total_bytes / 1e6,
            "cpus": os.cpu_count(),
            "load_average": load_average,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "summary": summary,
        "ratios": ratios(summary, args.associations),
        "runs": [{**asdict(r), "images_per_s": r.images_per_s} for rs in runs.values() for r in rs],
    }
    if args.json in (None, "-"):
        print(json.dumps(report, indent=2) if args.json == "-" else render_table(report))
    else:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(render_table(report))
    return 0 if all(s["failures"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
