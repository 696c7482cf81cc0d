"""``dicom-node serve``: every stage of the node in one process.

scp -> spool -> assembler -> routing -> queue -> worker -> writer -> dispatch, each loop
in its own thread, talking through the database. SIGTERM stops accepting associations,
lets the loops finish what they are doing (a running model gets ``stop_grace_s``) and
leaves anything unfinished in a state the next start picks up.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from db.migrate import upgrade
from db.session import Database
from dicom_node import audit, retrieve
from dicom_node.assembler import Assembler, AssociationTracker
from dicom_node.dispatch import Dispatcher
from dicom_node.echo import EchoAnswer
from dicom_node.health import EchoLoop, echo_destination
from dicom_node.ingest import Intake
from dicom_node.receivers import ReceiverPool
from dicom_node.records import reindex_spool
from dicom_node.retriever import Retriever
from dicom_node.routing import Router
from dicom_node.rules_holder import RulesHolder
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.view import ServiceView
from dicom_node.webhook_sender import WebhookSender
from inference import queue
from inference.gpu import Admission, worker_devices
from inference.keeper import QueueKeeper
from inference.model_spacing import target_spacing_mm
from inference.registry import load_registry
from inference.results import product_version
from inference.supervisor import worker_name
from inference.worker import LocalWorker
from kernel import webhooks
from kernel.catalog import PipelineSpec
from kernel.settings import ConfigError, NodeSettings

log = logging.getLogger("dicom_node.service")


class Node:
    """The whole node in one process: ``start()``, then ``stop()`` (or ``serve_forever``).

    ``start`` migrates the database, checks the model registry and the rules (raising
    ``RegistryError`` / ``RulesError`` naming the problem), re-indexes spooled files the
    database missed, requeues jobs and sends a previous run left unfinished, and starts
    the loops: assembler + settle check, dispatcher, webhook sender, destination C-ECHO,
    one worker per device (or Celery publishing), queue keeper, web app, the gRPC path
    API (when `grpc.enabled`; bound before any loop starts) and last the DICOM listener.
    """

    def __init__(self, settings: NodeSettings, stop_grace_s: float = 60.0) -> None:
        self.settings = settings
        self.stop_grace_s = stop_grace_s
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.web_server = None
        self.web_port: int | None = None
        self.grpc_server = None  # dicom_node.grpc_api.server.GrpcServer when grpc.enabled
        self.grpc_port: int | None = None
        self.workers: list[LocalWorker] = []
        self.retriever: Retriever | None = None

    # -- start -------------------------------------------------------------------------
    def start(self) -> Node:
        """Start every loop, the listener and the web app. A step that fails (a port in
        use, an unreadable file) stops what was started before the error goes on: a
        half-started node would keep its threads and never exit."""
        try:
            return self._start()
        except BaseException:
            log.error("start failed; stopping what was started")
            self.stop()
            raise

    def _start(self) -> Node:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.db_url)
        self.db = Database(s.db_url)
        self.spool = Spool(s.spool_dir, s.min_free_bytes, fsync=s.spool_fsync)
        self.registry = load_registry(s.models_file)
        # Before any loop runs: embedded workers asked for where torch is missing (the
        # dicom-node image) stop the start here, as a settings error, naming the fix.
        self.worker_devices = self._worker_devices()
        self.rules = RulesHolder(
            s.rules_file,
            self.db,
            known_destinations={d.name for d in s.destinations},
            known_models={m: spec.channels for m, spec in self.registry.models.items()},
            webhook_allowed_hosts=s.webhooks.allowed_hosts,
        )
        self._reindex_spool()
        # Only this node's own local workers: Celery workers' jobs are left to the lease.
        self.local_worker_prefix = worker_name("local", "").split("/local/")[0] + "/local/"
        queue.requeue_abandoned(self.db, self.local_worker_prefix)
        self.tracker = AssociationTracker()
        self.router = Router(
            self.db, self.rules.get, s.worker.max_attempts, self.pipeline_spacing_mm
        )
        self.assembler = Assembler(self.db, self.tracker, s.quiet_period_s, self._on_complete)
        self.intake = Intake(self.db, self.spool, self.tracker)  # STOW-RS requests
        self.dispatcher = Dispatcher(
            self.db, {d.name: d for d in s.destinations}, s.dispatch, s.ae_title
        )
        self.dispatcher.reset_interrupted()
        # Job status webhooks: an unusable secret file stops the start here; deliveries a
        # stopped node left mid-POST go again.
        self.webhook_sender = WebhookSender(self.db, s.webhooks)
        again = webhooks.reset_interrupted(self.db)
        if again:
            log.warning("%d webhook deliveries interrupted by the last stop go again", again)
        # listener.processes > 1: this process and N - 1 receiving processes share the port.
        self.receivers = ReceiverPool(s, self.db, self.spool, self.tracker)
        sockets = self.receivers.bind()
        shared = self.receivers.shared(0) if sockets else None
        self.scp = StorageSCP(s, self.db, self.spool, self.tracker, shared=shared, sockets=sockets)
        if s.grpc.enabled:  # bound here: a port in use stops the start before any loop runs
            from dicom_node.grpc_api.server import GrpcServer

            self.grpc_server = GrpcServer(s)
            self.grpc_port = self.grpc_server.port
        self._spawn("assembler", self._assembler_loop)
        self._spawn("dispatcher", self.dispatcher.run_forever, self.stop_event)
        self._spawn("webhooks", self.webhook_sender.run_forever, self.stop_event, daemon=True)
        self.echo_loop = EchoLoop(self.db, s, self.dispatcher.wake.set)
        self._spawn("destination-echo", self.echo_loop.run_forever, self.stop_event)
        self._start_audit()
        self._start_workers()
        if s.web.enabled:
            self._start_web()
        if self.grpc_server is not None:
            self.grpc_server.start(self.view())
        self.receivers.start()
        self.scp.start()
        self._start_retriever()
        return self

    def _start_retriever(self) -> None:
        """With ``sources``: the retrieval loop (``dicom_node.retriever``), after the
        listener, which a C-MOVE stores to; requests a stop interrupted go again."""
        if not self.settings.sources:
            return
        again = retrieve.requeue_interrupted(self.db)
        if again:
            log.warning("%d retrieve requests interrupted by the last stop are asked again", again)
        self.retriever = Retriever(self.db, self.settings, self.spool, self.tracker)
        self._spawn("retriever", self.retriever.run_forever, self.stop_event, daemon=True)

    def wake_retriever(self) -> None:
        """A new retrieve request: the loop looks now instead of at its next poll."""
        if self.retriever is not None:
            self.retriever.wake.set()

    def _start_audit(self) -> None:
        """Record this start (version, settings digest, rules file digest) in the audit
        trail and, with ``audit.syslog``, forward the trail to the collector."""
        s = self.settings
        audit.record(
            self.db,
            audit.Action.NODE_STARTED,
            audit.SYSTEM,
            object_type="node",
            object_id=s.ae_title,
            detail={
                "version": product_version(),
                "settings_sha256": audit.settings_digest(s),
                "rules_file": str(s.rules_file),
                "rules_sha256": audit.file_digest(s.rules_file),
            },
        )
        if s.audit.syslog is not None:
            forwarder = audit.SyslogForwarder(self.db, s.audit.syslog)
            self._spawn("audit-syslog", forwarder.run_forever, self.stop_event, daemon=True)

    def _worker_devices(self) -> list[str]:
        """The devices of embedded workers (none with Celery or ``worker.enabled: false``);
        counted without importing torch here (``inference.gpu.worker_devices``)."""
        w = self.settings.worker
        if w.broker_url or not w.enabled:
            return []
        return worker_devices(w.device, w.devices)

    def _start_workers(self) -> None:
        """Embedded: one worker thread (+ warm child) per device; Celery: publish only."""
        w = self.settings.worker
        publish = None
        if w.broker_url:
            from inference.celery_app import make_app, publisher

            self.celery = make_app(self.settings)
            publish = publisher(self.celery, w.celery_queue)
        elif w.enabled:
            for device in self.worker_devices:
                admission = Admission(device, self.pipeline, self.registry)
                worker = LocalWorker(
                    self.db, self.settings, device, admission, on_job_end=self._job_ended
                )
                self.workers.append(worker)
                self._spawn(f"worker-{device}", worker.run_forever, self.stop_event, daemon=True)
        self.keeper = QueueKeeper(self.db, w, publish)
        self._spawn("queue-keeper", self.keeper.run_forever, self.stop_event, daemon=True)

    def _job_ended(self) -> None:
        """A local job ended: its SEG sends and status webhooks (rows the child wrote)
        go now instead of at the senders' next poll (up to 1 s later)."""
        self.dispatcher.wake.set()
        self.webhook_sender.wake.set()

    def pipeline(self, name: str) -> PipelineSpec | None:
        """A pipeline of the catalog in force (the rules file's ``pipelines``)."""
        return self.rules.get().pipelines.get(name)

    def pipeline_spacing_mm(self, name: str) -> float | None:
        """The slice spacing the pipeline's first model works at (input preference)."""
        spec = self.pipeline(name)
        if spec is None or spec.models[0] not in self.registry.models:
            return None
        return target_spacing_mm(self.registry.models[spec.models[0]])

    def loops(self) -> dict[str, bool]:
        """Name -> alive for every loop thread but the web server's."""
        return {t.name: t.is_alive() for t in self.threads if t.name != "web"}

    def view(self) -> ServiceView:
        """The small typed view the web app gets of this node."""
        scp = self.scp
        return ServiceView(
            settings=self.settings,
            db=self.db,
            rules=self.rules,
            registry=self.registry,
            loops=self.loops,
            listening=scp.is_listening,
            listener_address=scp.address,
            devices=tuple(w.device for w in self.workers),
            associations_requested=lambda: scp.associations_requested,
            wake_dispatcher=self.dispatcher.wake.set,
            echo_destination=self.echo,
            target_spacing_mm=self.pipeline_spacing_mm,
            wake_retriever=self.wake_retriever,
            intake=self.intake,
        )

    def echo(self, name: str, requested_by: str | None = None) -> EchoAnswer:
        """C-ECHO a destination now for a user; kept with the periodic answers."""
        return echo_destination(
            self.db, self.settings, name, "manual", requested_by, self.dispatcher.wake.set
        )

    def _spawn(self, name: str, target, *args, daemon: bool = False) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=daemon)
        t.start()
        self.threads.append(t)

    def _on_complete(self, series_uid: str) -> None:
        self.router.route_series(series_uid)

    def _assembler_loop(self) -> None:
        interval = min(1.0, max(0.1, self.settings.quiet_period_s / 4))
        last_settle_check = 0.0
        while not self.stop_event.wait(interval):
            try:
                self.assembler.poll()
                self.router.poll_image_evidence()
                if time.monotonic() - last_settle_check >= 2.0:
                    last_settle_check = time.monotonic()
                    self.router.poll_settled()
            except Exception:
                log.exception("assembler loop error")
        self.dispatcher.wake.set()

    def _start_web(self) -> None:
        import uvicorn

        from dicom_node.web import create_app

        app = create_app(self.view())
        config = uvicorn.Config(
            app,
            host=self.settings.web.host,
            port=self.settings.web.port,
            log_level="warning",
            lifespan="off",
        )
        self.web_server = uvicorn.Server(config)
        self.web_server.install_signal_handlers = lambda: None  # signals are ours
        self._spawn("web", self.web_server.run)
        thread = self.threads[-1]
        deadline = time.monotonic() + 30
        while not self.web_server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.web_server.started:  # uvicorn logs why and ends its thread
            raise ConfigError(
                f"web: the status page cannot listen on {self.settings.web.host}:"
                f"{self.settings.web.port} (port in use, or not an address of this machine)"
            )
        sock = self.web_server.servers[0].sockets[0]
        self.web_port = sock.getsockname()[1]
        log.info("web status page on http://%s:%d/", self.settings.web.host, self.web_port)

    def _reindex_spool(self) -> None:
        """Index spooled files the database missed (a crash between the acknowledgement
        and the recorder's batch): ``records.reindex_spool``."""
        reindex_spool(self.db, self.spool)

    # -- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        log.info("stopping: no new associations; finishing work in flight")
        if hasattr(self, "scp"):
            self.scp.stop()
        if hasattr(self, "receivers"):
            self.receivers.stop()
        self.stop_event.set()
        # Loops that sleep on their own wake event see the stop now, not at their next poll.
        if hasattr(self, "dispatcher"):
            self.dispatcher.wake.set()
        if hasattr(self, "webhook_sender"):
            self.webhook_sender.wake.set()
        self.wake_retriever()
        if self.web_server is not None:
            self.web_server.should_exit = True
        if self.grpc_server is not None:
            self.grpc_server.stop()
        deadline = time.monotonic() + self.stop_grace_s
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        busy = [w.current_job for w in self.workers if w.current_job is not None]
        for worker in self.workers:
            worker.shutdown(grace_s=max(0.5, deadline - time.monotonic()))
        if busy:
            log.warning("jobs %s still running at shutdown; they run again at next start", busy)
            queue.requeue_abandoned(self.db, self.local_worker_prefix)
        if hasattr(self, "db"):
            self.db.dispose()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM / SIGINT."""
        done = threading.Event()

        def _signal(signum: int, _frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            done.wait()
        finally:
            self.stop()
