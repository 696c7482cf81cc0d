"""Receiving under failure (issue 17), against ``dicom-node serve`` with two receiving
processes (``listener.processes: 2``) and real DCMTK senders.

- kill -9 of every process of the node in the middle of associations (one sender, then
  eight at once): after a restart every instance storescu saw acknowledged is recorded
  and its file is whole; no file under a final name is partial; the temporary files of
  the killed processes are gone.
- kill -9 of one receiving process only: the node records what it acknowledged and
  starts it again; its senders' acknowledged instances are all there.
- a series sent over several associations at once (accepted by both processes), one of
  them silent for longer than the quiet period: it completes once, with every instance,
  and is routed once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from devkit.dcmtk import dcmtk_tool
from devkit.net import free_port, wait_for_port
from dicom_node.echo import echo
from tests.conftest import wait_until
from tests.dicom_factory import ct_series
from tests.scp_helpers import associate

AET = "DICOM_NODE"
SUCCESS_LINE = "Received Store Response (Success)"


class Serve:
    """``dicom-node serve`` in its own process group (so kill -9 reaches every process)."""

    def __init__(self, data_dir: Path, processes: int = 2, quiet_period_s: float = 5.0) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")},
            "DICOM_NODE_AE_TITLE": AET,
            "DICOM_NODE_BIND_ADDRESS": "127.0.0.1",
            "DICOM_NODE_PORT": str(self.port),
            "DICOM_NODE_DATA_DIR": str(data_dir),
            "DICOM_NODE_PEERS": json.dumps([{"ae_title": "*", "host": "127.0.0.1"}]),
            "DICOM_NODE_MIN_FREE_BYTES": "0",
            "DICOM_NODE_QUIET_PERIOD_S": str(quiet_period_s),
            "DICOM_NODE_WEB__ENABLED": "false",
            "DICOM_NODE_WORKER__ENABLED": "false",
            "DICOM_NODE_HEALTH__ECHO_INTERVAL_S": "0",
            "DICOM_NODE_LISTENER__PROCESSES": str(processes),
        }
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port("127.0.0.1", self.port, 60)
        except TimeoutError as exc:  # say why: the node's own log
            exited = self.process.poll()
            raise AssertionError(
                f"{exc} (serve exit status {exited}); its log ends:\n{self.log_text()[-3000:]}"
            ) from None
        wait_until(lambda: echo("127.0.0.1", self.port, AET), 30, "the node to answer C-ECHO")
        if self.env["DICOM_NODE_LISTENER__PROCESSES"] != "1":
            wait_until(lambda: "receiving processes" in self.log_text(), 30, "receivers")
        return self

    def pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *_children(self.process.pid)]

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "node.db")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Sender:
    """DCMTK storescu, verbose: which files it saw acknowledged, as they are."""

    def __init__(self, files: list[Path], port: int) -> None:
        exe = dcmtk_tool("storescu")
        if exe is None:
            pytest.fail("DCMTK storescu is not installed (apt-get install dcmtk)")
        self.acked: list[Path] = []
        self._current: Path | None = None
        self.process = subprocess.Popen(
            [exe, "-v", "-nh", "-aet", "SENDER", "-aec", AET, "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "Sending file: " in line:
                self._current = Path(line.split("Sending file: ", 1)[1].strip())
            elif SUCCESS_LINE in line and self._current is not None:
                self.acked.append(self._current)
                self._current = None

    def wait(self) -> None:
        self.process.wait(timeout=120)
        self._reader.join(timeout=10)


def _recorded_sops(node: Serve) -> set[str]:
    with node.db() as conn:
        return {row[0] for row in conn.execute("SELECT sop_uid FROM instances")}


def _assert_spool_whole(data_dir: Path) -> int:
    """Every file under a final name parses whole; no temporary file is left."""
    spool = data_dir / "spool"
    files = list(spool.glob("*/*/*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2, f"{path} is not whole"
    leftovers = [p for p in spool.glob(".incoming*/*") if p.is_file()]
    assert leftovers == [], f"temporary files left: {leftovers}"
    return len(files)


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _kill_mid_transfer(tmp_path: Path, senders: int, per_sender: int, kill_after: int) -> None:
    node = Serve(tmp_path / "data").start()
    series = [ct_series(tmp_path / f"in{i}", n=per_sender, rows=64) for i in range(senders)]
    running = [Sender(files, node.port) for files in series]
    try:
        wait_until(
            lambda: sum(len(s.acked) for s in running) >= kill_after,
            60,
            f"{kill_after} acknowledged instances",
        )
        assert len(node.pids()) == 2, node.pids()  # the node and one receiving process
        node.kill9()
        for sender in running:
            sender.wait()
    finally:
        node.stop()
    acked = [path for sender in running for path in sender.acked]
    sent = senders * per_sender
    assert kill_after <= len(acked) < sent, "the kill came after the transfer"

    restarted = Serve(tmp_path / "data", processes=1).start()  # records what it finds
    try:
        recorded = _recorded_sops(restarted)
        missing = sorted({_sop(p) for p in acked} - recorded)
        assert missing == [], f"{len(missing)} acknowledged instances lost: {missing[:3]}"
        spooled = _assert_spool_whole(tmp_path / "data")
        assert spooled == len(recorded) >= len(acked)
        reindexed = [
            line for line in restarted.log_text().splitlines() if "database did not know" in line
        ]
    finally:
        restarted.stop()
    print(
        f"\nkill -9 after {len(acked)} of {sent} acknowledged: all recorded; at restart: "
        f"{reindexed[-1].split(': ', 1)[-1] if reindexed else 'nothing to re-index'}"
    )


def test_kill_9_mid_association_loses_no_acknowledged_instance(tmp_path):
    _kill_mid_transfer(tmp_path, senders=1, per_sender=300, kill_after=100)


def test_kill_9_with_eight_parallel_senders_loses_no_acknowledged_instance(tmp_path):
    _kill_mid_transfer(tmp_path, senders=8, per_sender=40, kill_after=120)


def test_a_receiving_process_killed_alone_is_replaced_and_its_instances_recorded(tmp_path):
    node = Serve(tmp_path / "data").start()
    try:
        files = [ct_series(tmp_path / f"in{i}", n=60, rows=64) for i in range(4)]
        running = [Sender(f, node.port) for f in files]
        wait_until(lambda: sum(len(s.acked) for s in running) >= 60, 60, "60 acknowledged")
        (receiver,) = _receivers(node)
        os.kill(receiver, signal.SIGKILL)
        for sender in running:
            sender.wait()
        acked = {_sop(p) for s in running for p in s.acked}
        wait_until(lambda: "starting it again" in node.log_text(), 20, "the node to notice")
        wait_until(lambda: acked <= _recorded_sops(node), 30, "every acknowledged instance")
        wait_until(lambda: _receivers(node) not in ([], [receiver]), 30, "a new receiver")
        # The new receiving process takes associations like the old one.
        again = Sender(ct_series(tmp_path / "after", n=20, rows=64), node.port)
        again.wait()
        assert len(again.acked) == 20
    finally:
        node.stop()
    assert node.process is not None and node.process.returncode == 0


def _receivers(node: Serve) -> list[int]:
    return [p for p in node.pids()[1:] if "dicom_node.receivers" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_series_over_several_associations_completes_once_and_routes_once(tmp_path):
    quiet_s = 1.0
    node = Serve(tmp_path / "data", quiet_period_s=quiet_s).start()
    try:
        files = ct_series(tmp_path / "in", n=90, rows=64)
        parts = [files[0:30], files[30:60]]
        slow_part = files[60:90]
        # One association holds the series open: half its instances, silence for three
        # quiet periods while the others finish, then the rest.
        slow = associate(node.port, calling_ae="SLOW_SCU", called_ae=AET)
        assert slow.is_established
        for path in slow_part[:15]:
            assert slow.send_c_store(pydicom.dcmread(path)).Status == 0
        senders = [Sender(part, node.port) for part in parts]
        for sender in senders:
            sender.wait()
            assert len(sender.acked) == 30
        time.sleep(3 * quiet_s)
        with node.db() as conn:
            states = [r[0] for r in conn.execute("SELECT state FROM series")]
        assert states == ["receiving"], "completed while an association still carried it"
        for path in slow_part[15:]:
            assert slow.send_c_store(pydicom.dcmread(path)).Status == 0
        slow.release()

        def events(kind: str) -> list[str]:
            query = "SELECT message FROM events WHERE kind = ?"
            with node.db() as conn:
                return [r[0] for r in conn.execute(query, (kind,))]

        wait_until(lambda: events("routed"), 30, "the series to be routed")
        time.sleep(2 * quiet_s)  # a second completion or routing would come by now
        with node.db() as conn:
            (count,) = conn.execute("SELECT instance_count FROM series").fetchone()
        assert count == 90
        assert len(events("series_complete")) == 1
        assert len(events("routed")) == 1
        assert events("series_reopened") == []
        handled = [line for line in node.log_text().splitlines() if "association from" in line]
        print(
            f"\nassociations: {sum('[rx1]' in h for h in handled)} of {len(handled)} in the "
            "receiving process"
        )
    finally:
        node.stop()
