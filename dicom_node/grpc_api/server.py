"""The gRPC path API: ``PathInference`` (``path_inference.proto``) on a grpcio server.

The four inference methods and ``GetJob`` are the HTTP path API's ``POST
/inference/<pipeline>`` and ``GET /inference/jobs/<id>``; ``WatchJob`` streams a job's
state. All of them go through ``dicom_node.path_requests`` (checks, roles, queue, audit
records, answers), so the two transports answer alike; this module only reads the
caller's token from the metadata (``authorization: Bearer <token>``) and maps each
``Problem`` to a gRPC status code with the same message.

The server runs in the node's process on its own thread pool (``grpc.max_concurrent_calls``
threads; calls beyond that are refused with RESOURCE_EXHAUSTED). Models never run here:
jobs go to the queue and the node's worker children, which are started with ``spawn``,
so no process is forked from a process with gRPC's threads (gRPC does not survive fork).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from dicom_node import path_requests
from dicom_node.grpc_api import path_inference_pb2 as pb2
from dicom_node.grpc_api import path_inference_pb2_grpc as pb2_grpc
from dicom_node.path_requests import Caller, PathRequestError, Problem
from dicom_node.tls import explain
from dicom_node.view import ServiceView
from kernel.settings import ConfigError, NodeSettings

log = logging.getLogger("dicom_node.grpc")

SERVICE = pb2.DESCRIPTOR.services_by_name["PathInference"].full_name
# gRPC status of each path API refusal (HTTP: dicom_node.web.inference_api.HTTP_STATUS).
GRPC_CODE: dict[Problem, grpc.StatusCode] = {
    Problem.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Problem.ROLE_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Problem.PATH_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Problem.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Problem.NO_PIPELINE: grpc.StatusCode.NOT_FOUND,
    Problem.NO_JOB: grpc.StatusCode.NOT_FOUND,
    Problem.NOT_QUEUED: grpc.StatusCode.ABORTED,
    Problem.UNREADABLE: grpc.StatusCode.FAILED_PRECONDITION,
    Problem.FAILED: grpc.StatusCode.INTERNAL,
    Problem.NO_MASK: grpc.StatusCode.INTERNAL,
    Problem.CANCELLED: grpc.StatusCode.CANCELLED,
    Problem.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
}
Reply = TypeVar("Reply")


class GrpcSetupError(ConfigError):
    """The gRPC server cannot start: its port cannot be bound, or the TLS certificate
    and key cannot be used; the message names the settings key (``serve`` stops)."""


def peer_address(peer: str) -> str:
    """The client's address from ``context.peer()``: ``ipv4:10.0.0.7:50122`` ->
    ``10.0.0.7``, ``ipv6:[::1]:50122`` -> ``::1``; anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token of the ``authorization: Bearer <token>`` metadata, None without one."""
    for key, value in context.invocation_metadata():
        if key.lower() == "authorization" and isinstance(value, str):
            if value[:7].lower() == "bearer ":
                return value[7:].strip() or None
            return None
    return None


class PathInferenceService(pb2_grpc.PathInferenceServicer):
    """The servicer: each method authenticates, authorises and hands over to
    ``path_requests``; a ``PathRequestError`` becomes ``context.abort`` with its code."""

    def __init__(self, stopping: threading.Event) -> None:
        self.view: ServiceView | None = None  # set by GrpcServer.start, before any call
        self.stopping = stopping

    # -- the seed service's four calls --------------------------------------------------
    def Totalseg(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._infer("totalseg", "Totalseg", request, context)

    def Vessel(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._infer("vessel", "Vessel", request, context)

    def Ureter(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._infer("ureter", "Ureter", request, context)

    def Tumor(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._infer("tumor", "Tumor", request, context)

    # -- jobs ---------------------------------------------------------------------------
    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The job's mask path once done; its state while queued or running."""

        def handle() -> Any:
            view, _ = self._authorised(context, "GetJob")
            answer = path_requests.job_answer(view, _job_id(request))
            return _mask_reply(answer)

        return self._answer(handle, context)

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """The job's status now and at every change of state or attempt, until it ended;
        UNAVAILABLE when the node stops first (watch again after its restart)."""
        view, _ = self._answer(lambda: self._authorised(context, "WatchJob"), context)
        job_id = self._answer(lambda: _job_id(request), context)
        seen: tuple[str, int] | None = None
        while True:
            status = self._answer(lambda: path_requests.job_status(view, job_id), context)
            if (status.state, status.attempts) != seen:
                seen = (status.state, status.attempts)
                error = status.error
                yield pb2.JobStatus(
                    job_id=job_id,
                    state=status.state,
                    attempts=status.attempts,
                    max_attempts=status.max_attempts,
                    progress=status.progress,
                    mask_path=status.mask_path or "",
                    probabilities_path=status.probabilities_path or "",
                    error_code=GRPC_CODE[error.problem].name if error else "",
                    error=error.message if error else "",
                )
            if status.ended or not context.is_active():
                return
            if self.stopping.wait(path_requests.POLL_S):
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the node is stopping; watch job {job_id} again after its restart",
                )

    # -- helpers --------------------------------------------------------------------------
    def _infer(self, pipeline: str, method: str, request: Any, context: Any) -> Any:
        def handle() -> Any:
            view, caller = self._authorised(context, method)
            wait_s = path_requests.check_wait_s(
                request.wait_s if request.HasField("wait_s") else None
            )
            # The set path fields (proto3: an empty string is "not given").
            body = {f.name: v for f, v in request.ListFields() if f.name.endswith("_path")}
            if request.HasField("update_url"):
                body["update_url"] = request.update_url
            job_id = path_requests.submit(view, caller, pipeline, body)
            answer = path_requests.wait_for(
                view,
                job_id,
                wait_s,
                keep_waiting=lambda: context.is_active() and not self.stopping.is_set(),
            )
            return _mask_reply(answer)

        return self._answer(handle, context)

    def _authorised(self, context: grpc.ServicerContext, method: str) -> tuple[ServiceView, Caller]:
        """The node's view and the caller, once the caller's token and role are good
        (else raises ``PathRequestError``)."""
        view = self.view
        assert view is not None, "GrpcServer.start sets the view before serving"
        caller = path_requests.token_caller(
            view, bearer_token(context), peer_address(context.peer()), "grpc"
        )
        path_requests.authorise(view, caller, f"gRPC /{SERVICE}/{method}")
        return view, caller

    @staticmethod
    def _answer(handle: Callable[[], Reply], context: grpc.ServicerContext) -> Reply:
        try:
            return handle()
        except PathRequestError as exc:
            context.abort(GRPC_CODE[exc.problem], exc.message)
            raise  # abort raises; this line only satisfies type checkers


def _mask_reply(answer: path_requests.JobAnswer) -> Any:
    """``MaskReply`` for an answer (proto3: an unset path is the empty string)."""
    return pb2.MaskReply(
        job_id=answer.job_id,
        state=answer.state,
        mask_path=answer.mask_path or "",
        probabilities_path=answer.probabilities_path or "",
    )


def _job_id(request: Any) -> int:
    if request.job_id < 1:
        raise PathRequestError(
            Problem.INVALID, f"job_id must be a positive integer, not {request.job_id}"
        )
    return int(request.job_id)


def _server_credentials(settings: NodeSettings) -> grpc.ServerCredentials:
    """The node's certificate and key (``tls.certificate``, ``tls.private_key``) as gRPC
    server credentials, checked to belong together first (grpcio would only fail at the
    first handshake). Raises GrpcSetupError naming the files."""
    cert, key = settings.tls.certificate, settings.tls.private_key
    assert cert is not None and key is not None  # NodeSettings checks grpc.tls
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            str(cert),
            str(key),
            password=lambda: b"",  # an encrypted key fails, never prompts
        )
        chain, private = cert.read_bytes(), key.read_bytes()
    except (OSError, ssl.SSLError) as exc:
        raise GrpcSetupError(
            f"grpc.tls: cannot use certificate {cert} with key {key}: {explain(exc)}"
        ) from exc
    return grpc.ssl_server_credentials([(private, chain)])


class GrpcServer:
    """The gRPC path API server of a node: built and bound by the constructor (so a
    port in use or an unusable certificate stops the node before anything runs:
    ``GrpcSetupError``), serving from ``start(view)`` until ``stop()``."""

    def __init__(self, settings: NodeSettings) -> None:
        cfg = settings.grpc
        self.stopping = threading.Event()
        self.service = PathInferenceService(self.stopping)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.max_concurrent_calls, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=cfg.max_concurrent_calls,
            # No SO_REUSEPORT: a second server on the same port must fail, not share it.
            options=[("grpc.so_reuseport", 0)],
        )
        pb2_grpc.add_PathInferenceServicer_to_server(self.service, self.server)
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        self.tls = cfg.tls
        credentials = _server_credentials(settings) if cfg.tls else None
        try:
            if credentials is not None:
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises (older versions answer 0) when it cannot bind
            self.port = 0
        if not self.port:
            raise GrpcSetupError(
                f"grpc: cannot listen on {address} (grpc.host, grpc.port): the port is in "
                "use or the address is not one of this host's"
            )
        self.host = cfg.host

    def start(self, view: ServiceView) -> None:
        """Serve calls on the bound port, answering from ``view``."""
        self.service.view = view
        self.server.start()
        log.info(
            "gRPC path API on %s:%d (%s)", self.host, self.port, "TLS" if self.tls else "plaintext"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, end status streams (UNAVAILABLE) and waiting calls (they
        answer their job id), and wait up to ``grace_s`` for them."""
        self.stopping.set()
        self.server.stop(grace_s).wait(grace_s + 1.0)
