"""The seed service's path API: ``POST /inference/<pipeline>`` -> ``{"mask_path"}``, and
``GET /models``.

Requests become ordinary jobs in the queue (priority, time limit, retries and cancel as
for DICOM-triggered work); the worker runs them with ``inference.path_api.run_path_job``.
Input errors (bad paths, wrong number of images) are answered 4xx before anything is
queued; an image that cannot be read answers 422 once the job has failed on it.

Only operators and admins may use it, and it reads only under ``data_dir`` and
``path_api.allowed_roots``: a path outside them answers 403 with the same words whether
it exists or not (no file-system oracle). Queued jobs and refused paths go into the
audit trail.

The request handling itself lives in ``dicom_node.path_requests``, shared with the gRPC
service (``dicom_node.grpc_api``); this module maps its answers to HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse

from dicom_node import path_requests
from dicom_node.path_requests import Caller, PathRequestError, Problem
from dicom_node.view import ServiceView
from dicom_node.web.auth import Principal, client_address, require_operator, require_viewer
from kernel.vocabulary import JobState

router = APIRouter(tags=["inference"])

# HTTP status of each path API refusal (the gRPC service maps the same problems).
HTTP_STATUS: dict[Problem, int] = {
    Problem.UNAUTHENTICATED: 401,
    Problem.ROLE_DENIED: 403,
    Problem.PATH_DENIED: 403,
    Problem.INVALID: 400,
    Problem.NO_PIPELINE: 404,
    Problem.NO_JOB: 404,
    Problem.NOT_QUEUED: 409,
    Problem.UNREADABLE: 422,
    Problem.FAILED: 500,
    Problem.NO_MASK: 500,
    Problem.CANCELLED: 409,
    Problem.EXPIRED: 410,
}


def _node(request: Request) -> ServiceView:
    return request.app.state.service


def _caller(request: Request, who: Principal) -> Caller:
    return Caller(
        who.username, who.role, who.via, client_address(request), who.token_name, who.token_id
    )


def _http(exc: PathRequestError) -> HTTPException:
    return HTTPException(HTTP_STATUS[exc.problem], exc.message)


@router.get("/models")
def models(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    """The model registry: what each model reads and outputs."""
    registry = _node(request).registry
    return {
        "models": [
            {
                "id": m.id,
                "kind": m.kind,
                "version": m.version,
                "description": m.description,
                "task": m.task,
                "folder": str(m.folder) if m.folder else None,
                "channels": m.channels,
                "labels": {str(v): lab.name for v, lab in sorted(m.labels.items())},
            }
            for m in registry.models.values()
        ]
    }


def _done(answer: path_requests.JobAnswer) -> dict[str, Any]:
    """A finished job's answer: the mask path, and the probability map's path when the
    pipeline writes one (``probabilities: [nifti]``)."""
    out: dict[str, Any] = {"mask_path": answer.mask_path, "job_id": answer.job_id}
    if answer.probabilities_path is not None:
        out["probabilities_path"] = answer.probabilities_path
    return out


@router.post("/inference/{pipeline}")
async def run_pipeline(
    pipeline: Annotated[str, Path(min_length=1, max_length=64)],
    request: Request,
    body: dict[str, Any] = Body(...),  # noqa: B008
    wait_s: Annotated[
        float, Query(ge=0, le=path_requests.MAX_WAIT_S, allow_inf_nan=False)
    ] = path_requests.DEFAULT_WAIT_S,
    who: Principal = Depends(require_operator),
) -> Any:
    """Queue the pipeline on the given paths and answer the mask path when it is done.

    ``wait_s=0`` answers 202 with the job id at once (poll ``GET /inference/jobs/<id>``).
    """
    node = _node(request)
    caller = _caller(request, who)
    try:
        path_requests.authorise(node, caller, f"{request.method} {request.url.path}")
        job_id = path_requests.submit(node, caller, pipeline, body)
        answer = await path_requests.wait_for_async(node, job_id, wait_s)
    except PathRequestError as exc:
        raise _http(exc) from None
    if not answer.finished:
        return JSONResponse({"job_id": job_id, "state": JobState.QUEUED}, status_code=202)
    return _done(answer)


@router.get("/inference/jobs/{job_id}")
def job_state(
    job_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    request: Request,
    who: Principal = Depends(require_operator),
) -> Any:
    """The mask path of a finished path API job; 202 while it is queued or running."""
    node = _node(request)
    try:
        path_requests.authorise(node, _caller(request, who), f"GET {request.url.path}")
        answer = path_requests.job_answer(node, job_id)
    except PathRequestError as exc:
        raise _http(exc) from None
    if not answer.finished:
        return JSONResponse({"job_id": job_id, "state": JobState.RUNNING}, status_code=202)
    return _done(answer)
