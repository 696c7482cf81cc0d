"""Receive throughput: DCMTK storescp vs Orthanc vs bare pynetdicom vs this node.

``storescu`` sends synthetic 512x512 CT instances to each receiver in turn, over one
association (``--parallel 1``, the default: ``--instances`` in one call) or over K
associations at once (``--parallel K``: K storescu processes started together, each with
``--per-association`` instances of the same series). ``--parallel 1,8`` measures both in
one invocation. Repetitions are interleaved across receivers so that background load
drifting over time hits all of them alike. After every run the receiver's own count must
equal what was sent, otherwise the run is a failure, not a number. The resident memory of
each receiver's process tree is sampled: its peak during the run and its growth from
just before the first instance.

    .venv/bin/python bench/bench_receive.py [--instances 300] [--repeat 3]
        [--parallel 1,8] [--per-association 100]
        [--only storescp,orthanc,pynetdicom,node] [--json [PATH]] [--workdir DIR]

Prints a table of median images/s and the node/Orthanc and node/storescp ratios per
number of associations, and the node's K-association rate over its one-association rate.
See bench/README.md for what each receiver does with the data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from devkit import net
from devkit.dcmtk import dcmtk_tool
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from dicom_node.echo import echo

RECEIVERS = ("storescp", "orthanc", "pynetdicom", "node")
BARE_SCP = Path(__file__).with_name("bare_pynetdicom_scp.py")
HOST = "127.0.0.1"
CALLING_AE = "BENCHSCU"
# DCMTK sets TCP_NODELAY only when asked; without it delayed ACKs cap every receiver at
# ~20 images/s and the benchmark measures the kernel instead of the receivers.
DCMTK_ENV = {"TCP_NODELAY": "1"}
SETTLE_S = 10.0  # how long a count may lag behind storescu's exit before it is a loss
START_TIMEOUT_S = 60.0


# -- input ----------------------------------------------------------------------------


def make_instances(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """One portal-venous series of ``count`` 512x512 CT instances from the phantom."""
    study = generate_study(out_dir, seed=seed, phases="P", rows=512, columns=512, slices=count)
    files = [Path(p) for p in study.series[0].files]
    if len(files) != count:
        raise RuntimeError(f"generate_study made {len(files)} instances, asked for {count}")
    return files


# -- receivers ------------------------------------------------------------------------


class Receiver(Protocol):
    name: str
    aet: str
    port: int

    def start(self, workdir: Path) -> None: ...
    def count(self) -> int: ...
    def stop(self) -> None: ...
    def pid(self) -> int | None: ...


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_tree(pid: int | None) -> list[int]:
    return [] if pid is None else [pid, *_children(pid)]


def _status_kb(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def reset_peaks(pids: list[int]) -> bool:
    """Reset each process's peak RSS (VmHWM) to its current RSS (Linux clear_refs 5)."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def rss_mb(pids: list[int], peak: bool = False) -> float:
    """Resident memory of ``pids`` together (``peak``: their peaks, VmHWM), MB."""
    return sum(_status_kb(p, "VmHWM" if peak else "VmRSS") for p in pids) / 1024


def cpu_s(pids: list[int]) -> float:
    """CPU time (user + system) ``pids`` used so far, their ended threads included, s."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5))
    return total / tick


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop_process(process: subprocess.Popen[bytes] | None, grace_s: float = 15.0) -> None:
    """SIGTERM by PID, SIGKILL after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def _log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _wait_ready(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S:g} s:\n{_log_tail(log)}")
        time.sleep(0.1)


class StorescpReceiver:
    """DCMTK storescp writing each received dataset straight to a file (the baseline)."""

    name = "storescp"
    aet = "STORESCP"

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._out_dir = Path()

    def start(self, workdir: Path) -> None:
        self._out_dir = workdir / "received"
        self._out_dir.mkdir(parents=True)
        self.port = net.free_port(HOST)
        log = workdir / "storescp.log"
        # +B writes the incoming stream to disk without re-encoding, +xa accepts every
        # transfer syntax, -pdu 131072 is DCMTK's largest PDU, -dhl skips reverse DNS;
        # single process (no --fork), no --exec-on-reception. DCMTK 3.6.7 has no bind
        # address option: it listens on all interfaces for the few seconds of the run.
        cmd = [_dcmtk("storescp"), "-aet", self.aet, "+xa", "+B", "-pdu", "131072", "-dhl",
               "--output-directory", str(self._out_dir), str(self.port)]  # fmt: skip
        with open(log, "ab") as out:
            self._process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **DCMTK_ENV}
            )
        _wait_ready(self._process, lambda: net.port_is_open(HOST, self.port), "storescp", log)

    def count(self) -> int:
        return sum(1 for p in self._out_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        _stop_process(self._process)
        self._process = None

    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


class PynetdicomReceiver:
    """``bare_pynetdicom_scp.py``: pynetdicom's server writing ``encoded_dataset()`` with
    the node's fsyncs and nothing else (the floor of a pynetdicom receiver)."""

    name = "pynetdicom"
    aet = "BARE"

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._out_dir = Path()

    def start(self, workdir: Path) -> None:
        self._out_dir = workdir / "received"
        self.port = net.free_port(HOST)
        log = workdir / "bare.log"
        cmd = [sys.executable, str(BARE_SCP), str(self.port), str(self._out_dir), self.aet]
        with open(log, "ab") as out:
            self._process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _wait_ready(
            self._process,
            lambda: (
                net.port_is_open(HOST, self.port) and echo(HOST, self.port, self.aet, CALLING_AE)
            ),
            "bare pynetdicom SCP",
            log,
        )

    def count(self) -> int:
        return sum(1 for _ in self._out_dir.glob("*.dcm"))

    def stop(self) -> None:
        _stop_process(self._process)
        self._process = None

    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


class OrthancReceiver:
    """Orthanc 1.x with its default storage settings (SQLite index, files on disk)."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self) -> None:
        self.port = 0
        self._server: OrthancServer | None = None

    def start(self, workdir: Path) -> None:
        self._server = OrthancServer(workdir / "orthanc", aet=self.aet).start()
        self.port = self._server.dicom_port

    def count(self) -> int:
        assert self._server is not None
        return self._server.count_instances()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def pid(self) -> int | None:
        return self._server.pid if self._server is not None else None


def default_node_command() -> list[str]:
    """``dicom-node serve`` from the same virtualenv as this interpreter."""
    script = Path(sys.executable).parent / "dicom-node"
    if not script.exists():
        script = Path(shutil.which("dicom-node") or "dicom-node")
    return [str(script), "serve"]


class NodeReceiver:
    """``dicom-node serve`` configured only by environment variables."""

    name = "node"
    aet = "DICOM_NODE"

    # Replaced by --node-command, e.g. to compare another checkout's node.
    command: ClassVar[list[str] | None] = None
    # Added by --node-env, e.g. to try a setting's effect on receive speed.
    extra_env: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._data_dir = Path()

    def start(self, workdir: Path) -> None:
        self._data_dir = workdir / "node-data"
        self._data_dir.mkdir(parents=True)
        rules = workdir / "rules.yaml"
        rules.write_text("rules: []\n")
        self.port = net.free_port(HOST)
        web_port = net.free_port(HOST)
        while web_port == self.port:
            web_port = net.free_port(HOST)
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOM_NODE_")}
        env.update(
            DICOM_NODE_AE_TITLE=self.aet,
            DICOM_NODE_BIND_ADDRESS=HOST,
            DICOM_NODE_PORT=str(self.port),
            DICOM_NODE_DATA_DIR=str(self._data_dir),
            DICOM_NODE_PEERS=json.dumps([{"ae_title": "*", "host": HOST}]),
            DICOM_NODE_RULES_FILE=str(rules),
            DICOM_NODE_WEB__PORT=str(web_port),
            # Receiving only: no model worker (and no warm child process) in the numbers.
            DICOM_NODE_WORKER__ENABLED="false",
        )
        env.update(self.extra_env)
        log = workdir / "node.log"
        with open(log, "ab") as out:
            self._process = subprocess.Popen(
                self.command or default_node_command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        _wait_ready(
            self._process,
            lambda: (
                net.port_is_open(HOST, self.port) and echo(HOST, self.port, self.aet, CALLING_AE)
            ),
            "dicom-node serve",
            log,
        )

    def count(self) -> int:
        return sum(1 for _ in (self._data_dir / "spool").rglob("*.dcm"))

    def stop(self) -> None:
        _stop_process(self._process)
        self._process = None

    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


RECEIVER_TYPES: dict[str, Callable[[], Receiver]] = {
    "storescp": StorescpReceiver,
    "orthanc": OrthancReceiver,
    "pynetdicom": PynetdicomReceiver,
    "node": NodeReceiver,
}


# -- running --------------------------------------------------------------------------


@dataclass
class RunResult:
    receiver: str
    parallel: int
    repetition: int
    expected: int
    received: int = 0
    seconds: float | None = None
    peak_rss_mb: float | None = None
    rss_growth_mb: float | None = None
    # CPU per instance, ms: the receiver's processes, and the storescu processes sending.
    cpu_ms_per_image: float | None = None
    sender_cpu_ms_per_image: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.received == self.expected

    @property
    def images_per_s(self) -> float | None:
        return self.expected / self.seconds if self.ok and self.seconds else None


@dataclass
class Summary:
    receiver: str
    parallel: int
    runs: int
    failures: int
    median_s: float | None
    median_images_per_s: float | None
    min_images_per_s: float | None
    max_images_per_s: float | None
    median_mb_per_s: float | None
    peak_rss_mb: float | None
    rss_growth_mb: float | None
    cpu_ms_per_image: float | None = None
    sender_cpu_ms_per_image: float | None = None
    errors: list[str] = field(default_factory=list)


def _dcmtk(tool: str) -> str:
    path = dcmtk_tool(tool)
    if path is None:
        raise RuntimeError(f"DCMTK {tool} not found: install the Debian package 'dcmtk'")
    return path


def split(files: list[Path], parallel: int) -> list[list[Path]]:
    """``files`` in ``parallel`` contiguous chunks of (nearly) equal size."""
    size, extra = divmod(len(files), parallel)
    chunks, start = [], 0
    for i in range(parallel):
        end = start + size + (1 if i < extra else 0)
        chunks.append(files[start:end])
        start = end
    return [c for c in chunks if c]


def send_all(files: list[Path], aet: str, port: int, parallel: int = 1) -> tuple[float, str]:
    """storescu over ``parallel`` associations at once (one storescu process each, all
    started together); returns (seconds until the last one ended, their output)."""
    base = [_dcmtk("storescu"), "-aet", CALLING_AE, "-aec", aet, "-R", "-nh", HOST, str(port)]
    env = {**os.environ, **DCMTK_ENV}
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            base + [str(f) for f in chunk],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for chunk in split(files, parallel)
    ]
    outputs = [p.communicate(timeout=3600)[0] for p in processes]
    seconds = time.perf_counter() - started
    return seconds, "\n".join(o.strip() for o in outputs if o.strip())


def _settled_count(receiver: Receiver, expected: int) -> int:
    deadline = time.monotonic() + SETTLE_S
    while True:
        received = receiver.count()
        if received >= expected or time.monotonic() > deadline:
            return received
        time.sleep(0.2)


def run_once(name: str, files: list[Path], parallel: int, repetition: int, base: Path) -> RunResult:
    result = RunResult(name, parallel, repetition, expected=len(files))
    receiver = RECEIVER_TYPES[name]()
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{parallel}-{repetition}-", dir=base))
    try:
        receiver.start(workdir)
        pids = process_tree(receiver.pid())
        reset = reset_peaks(pids)
        before = rss_mb(pids)
        cpu_before, sender_before = cpu_s(pids), _children_cpu_s()
        result.seconds, output = send_all(files, receiver.aet, receiver.port, parallel)
        sender_cpu = _children_cpu_s() - sender_before
        result.cpu_ms_per_image = (cpu_s(pids) - cpu_before) * 1000 / len(files)
        result.sender_cpu_ms_per_image = sender_cpu * 1000 / len(files)
        pids = process_tree(receiver.pid())  # receiving processes started meanwhile count
        if reset:
            result.peak_rss_mb = rss_mb(pids, peak=True)
            result.rss_growth_mb = result.peak_rss_mb - before
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


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(name: str, parallel: int, results: list[RunResult], total_bytes: int) -> Summary:
    good = [r for r in results if r.ok and r.seconds]
    rates = [r.images_per_s for r in good if r.images_per_s]
    median_s = _median([r.seconds for r in good if r.seconds])
    return Summary(
        receiver=name,
        parallel=parallel,
        runs=len(results),
        failures=len(results) - len(good),
        median_s=median_s,
        median_images_per_s=_median(rates),
        min_images_per_s=min(rates) if rates else None,
        max_images_per_s=max(rates) if rates else None,
        median_mb_per_s=total_bytes / 1e6 / median_s if median_s else None,
        peak_rss_mb=_median([r.peak_rss_mb for r in good if r.peak_rss_mb is not None]),
        rss_growth_mb=_median([r.rss_growth_mb for r in good if r.rss_growth_mb is not None]),
        cpu_ms_per_image=_median([r.cpu_ms_per_image for r in good if r.cpu_ms_per_image]),
        sender_cpu_ms_per_image=_median(
            [r.sender_cpu_ms_per_image for r in good if r.sender_cpu_ms_per_image]
        ),
        errors=sorted({r.error for r in results if r.error}),
    )


def _key(name: str, parallel: int) -> str:
    return f"{name}@{parallel}"


def ratios(summaries: dict[str, Summary], parallels: list[int]) -> dict[str, float | None]:
    """node/orthanc and node/storescp per number of associations, and the node's rate at
    each K > 1 over its rate at one association."""

    def rate(name: str, parallel: int) -> float | None:
        summary = summaries.get(_key(name, parallel))
        return summary.median_images_per_s if summary else None

    out: dict[str, float | None] = {}
    for parallel in parallels:
        node = rate("node", parallel)
        if _key("node", parallel) not in summaries:
            continue
        for other in ("orthanc", "storescp", "pynetdicom"):
            if _key(other, parallel) in summaries:
                base = rate(other, parallel)
                out[f"node/{other} x{parallel}"] = node / base if node and base else None
        single = rate("node", 1)
        if parallel > 1 and _key("node", 1) in summaries:
            out[f"node x{parallel}/node x1"] = node / single if node and single else None
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _assocs(parallel: int) -> str:
    return "1 association" if parallel == 1 else f"{parallel} parallel associations"


def render_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    runs = ", ".join(
        f"{_assocs(k)}: {n} instances ({mb:.0f} MB)"
        for k, n, mb in zip(cfg["parallel"], cfg["instances"], cfg["total_mb"], strict=True)
    )
    lines = [
        f"receive throughput, 512x512 CT, {cfg['repeat']} repetitions; {runs}",
        f"host: {cfg['cpus']} CPUs, load average before run {cfg['load_average']}, "
        f"after {cfg['load_average_after']}",
        "",
        f"{'receiver':<11} {'assocs':>6} {'ok/runs':>8} {'median s':>9} {'images/s':>9} "
        f"{'min':>8} {'max':>8} {'MB/s':>7} {'peak RSS':>9} {'growth':>7} {'CPU':>6} "
        f"{'scu CPU':>7}",
    ]
    for s in report["summary"].values():
        lines.append(
            f"{s['receiver']:<11} {s['parallel']:>6} {s['runs'] - s['failures']:>3}/{s['runs']:<4} "
            f"{_fmt(s['median_s'], '.2f'):>9} {_fmt(s['median_images_per_s']):>9} "
            f"{_fmt(s['min_images_per_s']):>8} {_fmt(s['max_images_per_s']):>8} "
            f"{_fmt(s['median_mb_per_s']):>7} {_fmt(s['peak_rss_mb'], '.0f'):>9} "
            f"{_fmt(s['rss_growth_mb'], '.0f'):>7} {_fmt(s['cpu_ms_per_image'], '.2f'):>6} "
            f"{_fmt(s['sender_cpu_ms_per_image'], '.2f'):>7}"
        )
    lines.append("(peak RSS and growth: MB, the receiver's processes together, during the run;")
    lines.append(" CPU, scu CPU: ms per instance, user + system, the receiver's processes and")
    lines.append(" the storescu processes, medians)")
    if report["ratios"]:
        lines.append("")
        for key, value in report["ratios"].items():
            lines.append(f"ratio {key:<24} {_fmt(value, '.2f')}")
    lines += ["", *_markdown(report)]
    failures = [(s["receiver"], e) for s in report["summary"].values() for e in s["errors"]]
    if failures:
        lines.append("")
        lines.append("failures:")
        for name, error in failures:
            # First line says what failed; a log or traceback ends with the cause.
            parts = error.strip().splitlines()
            shown = parts if len(parts) <= 5 else [parts[0], "...", *parts[-3:]]
            lines.append(f"  {name}: {' | '.join(p.strip() for p in shown)}")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> list[str]:
    """The issue's table: median images/s per receiver and number of associations, the
    node's with its ratio to Orthanc."""
    parallels = report["config"]["parallel"]
    summary = report["summary"]
    names = list(dict.fromkeys(s["receiver"] for s in summary.values()))
    out = [
        "| receiver | " + " | ".join(_assocs(k) for k in parallels) + " |",
        "| --- |" + " ---: |" * len(parallels),
    ]
    for name in names:
        cells = []
        for k in parallels:
            s = summary.get(_key(name, k))
            cell = "-" if s is None else f"{_fmt(s['median_images_per_s'], '.0f')} img/s"
            ratio = report["ratios"].get(f"node/orthanc x{k}")
            if name == "node" and s is not None and ratio is not None:
                cell += f" ({ratio:.2f}x Orthanc)"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--instances", type=int, default=300, help="CT instances of a one-association run"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver")
    parser.add_argument(
        "--parallel",
        default="1",
        help="associations at once; a comma-separated list runs each (e.g. 1,8)",
    )
    parser.add_argument(
        "--per-association",
        type=int,
        default=100,
        help="instances each association sends when --parallel is more than 1",
    )
    parser.add_argument(
        "--only",
        default=",".join(RECEIVERS),
        help="comma-separated subset of " + ",".join(RECEIVERS),
    )
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="PATH",
        help="write the results as JSON to PATH ('-' or no value: stdout instead of the table)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="folder for temporary files (default: TMP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--node-command",
        help="command line that starts the node instead of 'dicom-node serve' "
        "(it gets the same DICOM_NODE_* environment)",
    )
    parser.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the node (repeatable)",
    )
    args = parser.parse_args(argv)
    bad_env = [item for item in args.node_env if "=" not in item]
    if bad_env:
        parser.error(f"--node-env needs KEY=VALUE, got {bad_env}")
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - set(RECEIVERS))
    if unknown:
        parser.error(f"unknown receiver(s) {unknown}; choose from {', '.join(RECEIVERS)}")
    try:
        args.parallel = sorted({int(k) for k in args.parallel.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--parallel needs numbers, got {args.parallel!r}")
    if not args.parallel or min(args.parallel) < 1:
        parser.error("--parallel must be at least 1")
    if args.instances < 1 or args.repeat < 1 or args.per_association < 1:
        parser.error("--instances, --per-association and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.node_command:
        command = shlex.split(args.node_command)
        # The node runs in its own work folder: anchor a relative program path here.
        if "/" in command[0]:
            command[0] = str(Path(command[0]).absolute())
        NodeReceiver.command = command
    NodeReceiver.extra_env = dict(item.split("=", 1) for item in args.node_env)
    for tool in ("storescu", "storescp"):
        if dcmtk_tool(tool) is None:
            print(f"{tool} not found: install the Debian package 'dcmtk'", file=sys.stderr)
            return 2
    load_average = [round(x, 2) for x in os.getloadavg()]
    counts = {k: args.instances if k == 1 else k * args.per_association for k in args.parallel}
    with tempfile.TemporaryDirectory(prefix="bench-receive-", dir=args.workdir) as tmp:
        base = Path(tmp)
        files = make_instances(base / "input", max(counts.values()), seed=args.seed)
        sizes = {k: sum(f.stat().st_size for f in files[:n]) for k, n in counts.items()}
        results: dict[str, list[RunResult]] = {
            _key(name, k): [] for k in args.parallel for name in args.only
        }
        for repetition in range(args.repeat):
            # Rotate the order so no receiver always runs first (cold caches) or last.
            shift = repetition % len(args.only)
            for parallel in args.parallel:
                for name in args.only[shift:] + args.only[:shift]:
                    result = run_once(name, files[: counts[parallel]], parallel, repetition, base)
                    results[_key(name, parallel)].append(result)
                    status = f"{result.images_per_s:.1f} images/s" if result.ok else result.error
                    print(
                        f"  run {repetition + 1} {name} x{parallel}: {status}",
                        file=sys.stderr,
                        flush=True,
                    )

    summaries = {
        key: summarise(runs[0].receiver, runs[0].parallel, runs, sizes[runs[0].parallel])
        for key, runs in results.items()
        if runs
    }
    report: dict[str, Any] = {
        "config": {
            "instances": [counts[k] for k in args.parallel],
            "parallel": args.parallel,
            "repeat": args.repeat,
            "rows": 512,
            "columns": 512,
            "total_mb": [sizes[k] / 1e6 for k in args.parallel],
            "cpus": os.cpu_count(),
            "load_average": load_average,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "summary": {key: asdict(s) for key, s in summaries.items()},
        "ratios": ratios(summaries, args.parallel),
        "runs": [
            {**asdict(r), "images_per_s": r.images_per_s} for rs in results.values() for r in rs
        ],
    }
    if args.json in (None, "-"):
        print(json.dumps(report, indent=2) if args.json == "-" else render_table(report))
    else:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(render_table(report))
    return 0 if all(s.failures == 0 for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
