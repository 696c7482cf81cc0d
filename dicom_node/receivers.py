"""Several receiving processes on the DICOM port(s) (``listener.processes``).

One Python process serves C-STOREs with one interpreter lock: on 2 cores, 8 associations
at once got no more through than one (bench/README.md). With ``listener.processes`` N > 1
the node process binds the listening socket(s) itself and starts N - 1 receiving
processes that accept from the same socket(s), as pre-forking servers share a port:
whichever process is free first takes the next connection (a busy one comes back to
accept later), and one that holds more connections than another leaves a new one to it
for a moment (``listener.GuardedServer.get_request``), so a burst of associations
spreads evenly. Each receiving process runs the same
``StorageSCP`` as the node process (its own spool writer, its own ``RecordQueue`` writing
instance rows to the shared database, the same statuses and guarantees) and differs in
three things:

- completeness: its associations are held open in the node process's tracker, which the
  assembler reads: it sends ``touch`` (for an association's first instance of each
  series, before that C-STORE is answered) and ``release`` (after the association's rows
  are written) over a socket pair. A series carried by
  associations in several processes stays open until the last of them is released.
- limits: ``listener.max_connections`` and ``max_associations`` count the connections and
  associations of all the processes together (``listener.SharedCounts`` in a small
  memory-mapped file, ``data_dir/.listener-counts``).
- its temporary files are in ``spool/.incoming-<n>``.

A receiving process that ends (killed, crashed) is noticed at once (its socket pair
closes): the node records the instances it had acknowledged but not yet written (the
series folders it was carrying are re-indexed, ``records.reindex_spool``), releases its
associations, and starts it again; the listening socket stays open in the others. When
the node process ends, the receiving processes see their socket pair close and stop too
(after writing what they hold). The node process is the only one that routes, sends,
runs jobs and serves the web pages.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from db.session import Database
from dicom_node.assembler import AssociationTracker
from dicom_node.listener import GuardedServer, SharedCounts
from dicom_node.records import reindex_spool
from dicom_node.spool import Spool
from kernel.settings import NodeSettings

log = logging.getLogger("dicom_node.receivers")

# How long a receiving process may take to start listening.
START_TIMEOUT_S = 60.0
# A receiving process that keeps ending is started again at most this often.
RESTART_INTERVAL_S = 5.0


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (as the single-process listener binds)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(GuardedServer.request_queue_size)
    except OSError:
        sock.close()
        raise
    return sock


class RemoteTracker:
    """A receiving process's side of the completeness tracker: what its associations
    carry is sent to the node process (thread-safe; a closed pipe is ignored, the
    process is about to stop).

    Only the first instance of a series on an association is sent: the node process's
    tracker (``AssociationTracker.touch``) and its record of the series folders carried
    change only then. Sending every instance cost a pickled message and a wake-up of the
    node process's reading thread per instance (~0.04 ms of CPU for the two sides,
    measured alone on the 2-core bench machine, on the cores receiving also needs).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._carried: dict[Hashable, set[str]] = {}  # association -> series sent

    def touch(self, assoc_id: Hashable, series_uid: str, study_uid: str | None = None) -> None:
        with self._lock:
            carried = self._carried.setdefault(assoc_id, set())
            if series_uid in carried:
                return
            carried.add(series_uid)
        self._send(("touch", assoc_id, series_uid, study_uid))

    def release(self, assoc_id: Hashable) -> None:
        with self._lock:
            self._carried.pop(assoc_id, None)
        self._send(("release", assoc_id))

    def open_series(self) -> set[str]:
        return set()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)


class CountsFile:
    """The shared counts (``listener.SharedCounts``) in a small file under the data folder,
    memory-mapped by every receiving process: 2 ints per process, each process writing
    its own."""

    def __init__(self, path: Path, processes: int, create: bool = False) -> None:
        self.path = path
        size = 8 * processes
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.values = memoryview(self._map).cast("i")

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: Any) -> Any:
        return self.values[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.values[index] = value

    def __iter__(self) -> Any:
        return iter(self.values.tolist())


@dataclass
class _Child:
    index: int
    process: Any
    conn: Connection
    # What its associations carry: key -> series folders (for the re-index if it ends).
    carried: dict[Hashable, set[Path]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    listening: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None


class ReceiverPool:
    """The node process's side: starts, watches and stops the receiving processes.

    ``counts`` (``shared(0)``) is what the node process's own listener publishes its
    connections and associations in.
    """

    def __init__(
        self, settings: NodeSettings, db: Database, spool: Spool, tracker: AssociationTracker
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.tracker = tracker
        self.processes = settings.listener.receive_processes()
        self.counts = CountsFile(settings.data_dir / ".listener-counts", self.processes, True)
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.sockets: dict[str, socket.socket] = {}

    def shared(self, index: int = 0) -> SharedCounts:
        return SharedCounts(self.counts, index)

    def bind(self) -> dict[str, socket.socket]:
        """With more than one process: bind the listening socket(s) ("plain", "tls") that
        the node process and the receiving processes share (raises ``OSError`` when a
        port is taken); ``{}`` with one process (the listener binds its own)."""
        if self.processes < 2:
            return {}
        s = self.settings
        if s.tls.serve_plain or not s.tls.enabled:
            self.sockets["plain"] = _listening_socket(s.bind_address, s.port)
        if s.tls.enabled:
            self.sockets["tls"] = _listening_socket(s.bind_address, s.tls.port)
        return self.sockets

    def start(self) -> None:
        """Start the receiving processes on the bound sockets and wait until each accepts
        (before the node process itself serves, so that no early sender lands on it
        alone); raises ``RuntimeError`` naming one that did not start."""
        if self.processes < 2:
            return
        for index in range(1, self.processes):
            self._spawn(index)
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in list(self._children.values()):
            child.listening.wait(max(0.1, deadline - time.monotonic()))
            if not child.listening.is_set():
                why = child.failure or f"not listening after {START_TIMEOUT_S:g} s"
                self.stop()
                raise RuntimeError(f"receiving process {child.index} did not start: {why}")
        log.info(
            "%d receiving processes on the DICOM port(s) (listener.processes), pids %s",
            self.processes,
            [os.getpid(), *(c.process.pid for c in self._children.values())],
        )

    def _spawn(self, index: int) -> None:
        # A fresh interpreter running this module only: a multiprocessing "spawn" child
        # would import the node's main script again (the model side's libraries, ~100 MB).
        ours, theirs = socket.socketpair()
        listening = {name: sock.fileno() for name, sock in self.sockets.items()}
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.receivers", str(index), str(theirs.fileno())],
            pass_fds=[theirs.fileno(), *listening.values()],
        )
        theirs.close()
        parent = Connection(ours.detach())
        parent.send((self.settings, listening, str(self.counts.path), self.processes))
        child = _Child(index, process, parent)
        with self._lock:
            self._children[index] = child
        threading.Thread(
            target=self._serve, args=(child,), name=f"receiver-{index}", daemon=True
        ).start()

    def _serve(self, child: _Child) -> None:
        """Apply what a receiving process reports, until its pipe closes."""
        tracker = self.tracker
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "touch":
                _, key, series_uid, study_uid = message
                tracker.touch(key, series_uid)
                if study_uid:
                    folder = self.spool.root / study_uid / series_uid
                    child.carried.setdefault(key, set()).add(folder)
            elif kind == "release":
                tracker.release(message[1])
                child.carried.pop(message[1], None)
            elif kind == "listening":
                child.listening.set()
            elif kind == "failed":
                child.failure = message[1]
                child.listening.set()
        self._lost(child)

    def _lost(self, child: _Child) -> None:
        """A receiving process ended: record what it acknowledged, free what it held."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=5)
        with contextlib.suppress(OSError):
            child.conn.close()
        self.counts[2 * child.index] = self.counts[2 * child.index + 1] = 0
        if self._stopping:
            return
        log.error(
            "receiving process %d (pid %s) ended with exit code %s; recording what it "
            "received and starting it again",
            child.index,
            child.process.pid,
            child.process.returncode,
        )
        folders = set().union(*child.carried.values()) if child.carried else set()
        try:
            added = reindex_spool(self.db, self.spool, folders)
            if added:
                log.warning(
                    "recorded %d instances receiving process %d had acknowledged",
                    added,
                    child.index,
                )
        except Exception:
            log.exception(
                "could not re-index the series of receiving process %d; the next start "
                "records them",
                child.index,
            )
        for key in list(child.carried):
            self.tracker.release(key)
        wait = RESTART_INTERVAL_S - (time.monotonic() - child.started_at)
        if wait > 0:
            time.sleep(wait)
        if not self._stopping:
            self._spawn(child.index)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask every receiving process to stop (it writes what it holds), then wait."""
        self._stopping = True
        with self._lock:
            children = list(self._children.values())
        for child in children:
            with contextlib.suppress(OSError, ValueError):
                child.conn.send(("stop",))
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiving process %d did not stop; killed", child.index)
                child.process.kill()
                child.process.wait(timeout=5)
        for sock in self.sockets.values():
            sock.close()  # the node process's listener has closed its own use already


def run_receiver(index: int, conn: Connection) -> None:
    """A receiving process: listen until the node says stop or goes away."""
    from dicom_node.scp import StorageSCP  # here: pynetdicom in this process only

    # The node process decides when this one stops (a terminal's Ctrl-C or a service
    # manager's SIGTERM reaches the whole group): it says so over the pipe, or closes it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings, listening, counts_path, processes = conn.recv()
    logging.basicConfig(
        level=getattr(logging, settings.log_level),
        format=f"%(asctime)s %(levelname)s %(name)s[rx{index}]: %(message)s",
    )
    for noisy in ("pynetdicom", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sockets = {name: socket.socket(fileno=fd) for name, fd in listening.items()}
    db = Database(settings.db_url)
    spool = Spool(
        settings.spool_dir,
        settings.min_free_bytes,
        fsync=settings.spool_fsync,
        tmp_name=f".incoming-{index}",
    )
    counts = CountsFile(Path(counts_path), processes)
    scp = StorageSCP(
        settings,
        db,
        spool,
        RemoteTracker(conn),  # type: ignore[arg-type]
        carrier=f"rx{index}",
        shared=SharedCounts(counts, index),
        sockets=sockets,
    )
    try:
        scp.start()
    except Exception as exc:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("listening",))
    try:
        while conn.recv()[0] != "stop":
            pass
    except (EOFError, OSError):
        log.warning("the node process is gone; receiving process %d stops", index)
    finally:
        scp.stop()  # stops accepting, writes what the recorder holds
        db.dispose()


def main(argv: list[str] | None = None) -> None:
    """``python -m dicom_node.receivers INDEX FD``: started by ``ReceiverPool`` only."""
    parser = argparse.ArgumentParser(description="a receiving process of dicom-node serve")
    parser.add_argument("index", type=int)
    parser.add_argument("fd", type=int, help="the socket to the node process")
    args = parser.parse_args(argv)
    run_receiver(args.index, Connection(args.fd))


if __name__ == "__main__":
    main()
