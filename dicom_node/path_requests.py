"""Path API requests, whatever the transport: the one place the HTTP routes
(``dicom_node.web.inference_api``) and the gRPC service (``dicom_node.grpc_api``) turn a
request into a queued job and a job into an answer, so the two cannot drift.

A request names a pipeline and its image paths (``image_path``, or ``image_<ROLE>_path``
per input role). ``submit`` checks them (``inference.path_api.path_inputs``: absolute,
under ``data_dir`` or ``path_api.allowed_roots``, NIfTI or a DICOM folder), queues the
job (``inference.queue.enqueue``; an identical queued request is joined) and writes the
audit record; ``job_answer`` reads a job back: the mask path once it is done, nothing
while it is queued or running, a ``PathRequestError`` when it ended without a mask.

Every refusal is a ``PathRequestError`` whose ``problem`` each transport maps to its own
status (HTTP: ``inference_api.HTTP_STATUS``; gRPC: ``grpc_api.service.GRPC_CODE``) and
whose text is the answer's message on both. Who may ask: an ``operator`` or ``admin``
(``ROLE``); ``authorise`` refuses anyone else with the words and the audit record of the
web app's role check (``dicom_node.web.auth``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from db.models import Job
from dicom_node import audit, records
from dicom_node.view import ServiceView
from dicom_node.web import users
from inference import queue as jobs
from inference.path_api import PathInputError, PathNotAllowedError, is_path_job, path_inputs
from kernel import webhooks
from kernel.vocabulary import JobState

# The role a caller needs (README "Security", roles table: the path API is operations).
ROLE = "operator"
POLL_S = 0.2  # how often a waiting request looks at its job
DEFAULT_WAIT_S = 600.0
MAX_WAIT_S = 3600.0
ENDED = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})


class Problem(StrEnum):
    """Why a path API request got no mask (transport-neutral; HTTP status / gRPC code)."""

    UNAUTHENTICATED = "unauthenticated"  # no or an unusable token (401, UNAUTHENTICATED)
    ROLE_DENIED = "role_denied"  # the user's role may not (403, PERMISSION_DENIED)
    PATH_DENIED = "path_denied"  # a path outside the allowed folders (403, PERMISSION_DENIED)
    INVALID = "invalid"  # missing, relative, non-existent or non-image path (400)
    NO_PIPELINE = "no_pipeline"  # not in the pipeline catalog (404, NOT_FOUND)
    NO_JOB = "no_job"  # no path API job with that id (404, NOT_FOUND)
    NOT_QUEUED = "not_queued"  # lost a race with an identical request (409, ABORTED)
    UNREADABLE = "unreadable"  # the job failed on reading its input (422)
    FAILED = "failed"  # the job failed otherwise, after its retries (500)
    NO_MASK = "no_mask"  # done without a mask: a bug (500, INTERNAL)
    CANCELLED = "cancelled"  # an operator cancelled the job (409, CANCELLED)
    EXPIRED = "expired"  # waited longer than worker.max_queue_age_s (410)


class PathRequestError(Exception):
    """A refused or unanswerable path API request: ``problem`` says which kind, the text
    is the message both transports answer with."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message


@dataclass(frozen=True)
class Caller:
    """Who asks, over which transport: the user (``via`` "session" or "token", with the
    token's name and id), the client's address, and ``transport`` ("grpc"; None for the
    web app, whose audit records carry no transport key)."""

    username: str
    role: str
    via: str
    address: str | None
    token_name: str | None = None
    token_id: int | None = None
    transport: str | None = None

    @property
    def actor(self) -> audit.Actor:
        return audit.Actor(self.username, self.via, self.address or "?")

    def detail(self) -> dict[str, Any]:
        """What every audit record of this caller adds to its detail."""
        extra: dict[str, Any] = {}
        if self.via == "token":
            extra |= {"token": self.token_name, "token_id": self.token_id}
        if self.transport is not None:
            extra["transport"] = self.transport
        return extra


@dataclass(frozen=True)
class JobAnswer:
    """A path API job as its caller sees it: its state and, once done, the mask path
    (and the probability NIfTI's path when the pipeline writes one)."""

    job_id: int
    state: JobState
    mask_path: str | None = None
    probabilities_path: str | None = None

    @property
    def finished(self) -> bool:
        return self.mask_path is not None


@dataclass(frozen=True)
class JobStatus:
    """One look at a path API job for a status stream: ``error`` is the refusal the job
    answers with once it ended without a mask (None otherwise)."""

    job_id: int
    state: JobState
    attempts: int
    max_attempts: int
    progress: float
    mask_path: str | None
    error: PathRequestError | None
    probabilities_path: str | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


# -- who asks --------------------------------------------------------------------------


def token_caller(
    view: ServiceView, token: str | None, address: str | None, transport: str
) -> Caller:
    """The caller a bearer token acts for (``users.token_identity``: not revoked, not
    expired, user enabled); raises ``PathRequestError(UNAUTHENTICATED)`` otherwise."""
    found = users.token_identity(view.db, token.strip()) if token else None
    if found is None:
        raise PathRequestError(
            Problem.UNAUTHENTICATED,
            "a valid bearer token is required (metadata 'authorization: Bearer <token>')",
        )
    return Caller(
        found.username, found.role, "token", address, found.token_name, found.token_id, transport
    )


def denial_message(username: str, role: str, needed: str) -> str:
    """The words of a role refusal (``users.denial_message``: the web app's role check
    says the same)."""
    return users.denial_message(username, role, needed)


def authorise(view: ServiceView, caller: Caller, what: str) -> None:
    """Refuse a caller below ``ROLE``: an audit record ``request_denied`` naming ``what``
    (the route or RPC method) and ``PathRequestError(ROLE_DENIED)``."""
    if users.may(caller.role, ROLE):
        return
    _audit(
        view,
        caller,
        audit.Action.REQUEST_DENIED,
        outcome=audit.Outcome.DENIED,
        object_type="route",
        object_id=what,
        detail={"role": caller.role, "needs": ROLE},
    )
    raise PathRequestError(Problem.ROLE_DENIED, denial_message(caller.username, caller.role, ROLE))


def _audit(
    view: ServiceView,
    caller: Caller,
    action: audit.Action,
    *,
    detail: dict[str, Any],
    **fields: Any,
) -> None:
    audit.record(
        view.db,
        action,
        caller.actor,
        detail={**detail, **caller.detail()},
        patient_names=view.settings.log_patient_names,
        **fields,
    )


# -- requests --------------------------------------------------------------------------


def allowed_roots(view: ServiceView) -> list[Path]:
    """The folders the path API may read: the data folder and ``path_api.allowed_roots``."""
    return [Path(view.settings.data_dir).absolute(), *view.settings.path_api.allowed_roots]


def check_wait_s(wait_s: float | None) -> float:
    """How long a request waits for its mask: ``DEFAULT_WAIT_S`` when not given, else
    0..``MAX_WAIT_S`` seconds (0: answer the job id at once); raises
    ``PathRequestError(INVALID)`` outside that."""
    if wait_s is None:
        return DEFAULT_WAIT_S
    if not (0.0 <= wait_s <= MAX_WAIT_S):  # also refuses NaN
        raise PathRequestError(
            Problem.INVALID, f"wait_s must be between 0 and {MAX_WAIT_S:g} seconds, not {wait_s}"
        )
    return float(wait_s)


def submit(view: ServiceView, caller: Caller, pipeline: str, body: dict[str, Any]) -> int:
    """Queue ``pipeline`` on the image paths of ``body``; returns the job id.

    ``body``: ``{"image_path": "/abs/ct.nii.gz"}`` or ``{"image_A_path": ..., ...}``.
    Raises ``PathRequestError``: NO_PIPELINE (not in the catalog in force), PATH_DENIED
    (a path outside ``allowed_roots``: audited, same words whether or not it exists),
    INVALID (anything else wrong with the paths; nothing is queued), NOT_QUEUED (an
    identical request ended between the check and the insert: retry). An identical
    request still queued is joined instead of queued twice. The queued job is audited
    (``path_job_queued`` with its paths).
    ``body`` may also hold ``update_url``: an http(s) URL told when the job ends
    (``kernel.webhooks``), besides the pipeline's own; another scheme is INVALID.
    """
    spec = view.rules.get().pipelines.get(pipeline)
    if spec is None:
        raise PathRequestError(
            Problem.NO_PIPELINE, f"pipeline {pipeline!r} is not defined in the pipeline catalog"
        )
    update_url = body.get("update_url")
    try:
        if update_url not in (None, ""):
            allowed = view.settings.webhooks.allowed_hosts
            update_url = webhooks.check_url(update_url, "update_url", allowed)
        else:
            update_url = None
    except webhooks.WebhookUrlError as exc:
        raise PathRequestError(Problem.INVALID, f"pipeline {pipeline}: {exc}") from None
    try:
        inputs = path_inputs(spec, body, allowed_roots(view))
    except PathNotAllowedError as exc:
        _audit(
            view,
            caller,
            audit.Action.PATH_JOB_QUEUED,
            outcome=audit.Outcome.DENIED,
            object_type="pipeline",
            object_id=pipeline,
            detail={"problem": str(exc)},
        )
        raise PathRequestError(Problem.PATH_DENIED, f"pipeline {pipeline}: {exc}") from None
    except PathInputError as exc:
        raise PathRequestError(Problem.INVALID, f"pipeline {pipeline}: {exc}") from None
    with view.db.session() as s:
        study = records.path_study(s, inputs)
        job = jobs.enqueue(
            s,
            study,
            pipeline,
            inputs,
            priority=spec.priority,
            max_attempts=view.settings.worker.max_attempts,
            update_urls=webhooks.merge_urls(spec.update_url, update_url) or None,
        )
        if job is None:  # the same request is already queued: wait for that one
            job = jobs.identical_job(s, study, pipeline, inputs)
        job_id = job.id if job is not None else None
    if job_id is None:
        raise PathRequestError(Problem.NOT_QUEUED, "the request could not be queued; retry")
    _audit(
        view,
        caller,
        audit.Action.PATH_JOB_QUEUED,
        object_type="job",
        object_id=job_id,
        detail={
            "pipeline": pipeline,
            "paths": {r: v["path"] for r, v in inputs.items()},
            **({"update_url": webhooks.display_url(update_url)} if update_url else {}),
        },
    )
    return job_id


# -- answers ---------------------------------------------------------------------------


def _ending(
    job_id: int, state: str, summary: dict[str, Any], error: str
) -> PathRequestError | None:
    """The refusal a job that ended without a mask answers with; None otherwise."""
    if state == JobState.DONE and "mask_path" not in summary:
        return PathRequestError(Problem.NO_MASK, f"job {job_id} finished without a mask")
    if state == JobState.FAILED:
        unreadable = "PathInputError" in error or "SeriesReadError" in error
        if unreadable:  # the worker's "<exception class>: " is for the log, not the caller
            error = error.removeprefix("PathInputError: ").removeprefix("SeriesReadError: ")
        return PathRequestError(
            Problem.UNREADABLE if unreadable else Problem.FAILED, f"job {job_id} failed: {error}"
        )
    if state == JobState.CANCELLED:
        return PathRequestError(Problem.CANCELLED, f"job {job_id} was cancelled")
    if state == JobState.EXPIRED:
        return PathRequestError(
            Problem.EXPIRED,
            f"job {job_id} expired: it waited longer than worker.max_queue_age_s",
        )
    return None


def job_status(view: ServiceView, job_id: int) -> JobStatus:
    """A path API job as it is now; raises ``PathRequestError(NO_JOB)`` for an id that
    is no path API job (DICOM-triggered jobs are not the path API's to show)."""
    with view.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or not is_path_job(job.inputs):
            raise PathRequestError(Problem.NO_JOB, f"job {job_id} is not a path API job")
        state, summary, error = JobState(job.state), job.summary or {}, job.last_error or ""
        attempts, max_attempts, progress = job.attempts, job.max_attempts, job.progress
    done = state == JobState.DONE
    mask = summary.get("mask_path") if done else None
    probabilities = summary.get("probabilities_path") if done else None
    return JobStatus(
        job_id,
        state,
        attempts,
        max_attempts,
        float(progress or 0.0),
        str(mask) if mask is not None else None,
        _ending(job_id, state, summary, error),
        str(probabilities) if probabilities is not None else None,
    )


def job_answer(view: ServiceView, job_id: int) -> JobAnswer:
    """The mask path of a done job, or the state of one still queued or running; raises
    ``PathRequestError`` for an unknown id (NO_JOB) and a job that ended without a mask
    (UNREADABLE, FAILED, CANCELLED, EXPIRED, NO_MASK) with the reason."""
    status = job_status(view, job_id)
    if status.error is not None:
        raise status.error
    return JobAnswer(job_id, status.state, status.mask_path, status.probabilities_path)


def wait_for(
    view: ServiceView, job_id: int, wait_s: float, keep_waiting: Callable[[], bool] = lambda: True
) -> JobAnswer:
    """``job_answer`` once the job ended or ``wait_s`` passed (or ``keep_waiting`` says
    no: the client went away, the node stops), whichever is first; blocks the thread."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        answer = job_answer(view, job_id)
        if answer.finished or time.monotonic() >= deadline or not keep_waiting():
            return answer
        time.sleep(POLL_S)


async def wait_for_async(view: ServiceView, job_id: int, wait_s: float) -> JobAnswer:
    """``wait_for`` for an event loop (the web app): sleeps without blocking it."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        answer = job_answer(view, job_id)
        if answer.finished or time.monotonic() >= deadline:
            return answer
        await asyncio.sleep(POLL_S)
