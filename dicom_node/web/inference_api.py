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
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse

from db.models import Job
from dicom_node import audit, records
from dicom_node.view import ServiceView
from dicom_node.web.auth import Principal, audit_record, require_operator, require_viewer
from inference import queue as jobs
from inference.path_api import PathInputError, PathNotAllowedError, is_path_job, path_inputs
from kernel.vocabulary import JobState

router = APIRouter(tags=["inference"])
POLL_S = 0.2


def _node(request: Request) -> ServiceView:
    return request.app.state.service


def allowed_roots(node: ServiceView) -> list[FilePath]:
    """The folders the path API may read: the data folder and ``path_api.allowed_roots``."""
    return [FilePath(node.settings.data_dir).absolute(), *node.settings.path_api.allowed_roots]


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


@router.post("/inference/{pipeline}")
async def run_pipeline(
    pipeline: Annotated[str, Path(min_length=1, max_length=64)],
    request: Request,
    body: dict[str, Any] = Body(...),  # noqa: B008
    wait_s: Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False)] = 600.0,
    who: Principal = Depends(require_operator),
) -> Any:
    """Queue the pipeline on the given paths and answer the mask path when it is done.

    ``wait_s=0`` answers 202 with the job id at once (poll ``GET /inference/jobs/<id>``).
    """
    node = _node(request)
    spec = node.rules.get().pipelines.get(pipeline)
    if spec is None:
        raise HTTPException(404, f"pipeline {pipeline!r} is not defined in the pipeline catalog")
    try:
        inputs = path_inputs(spec, body, allowed_roots(node))
    except PathNotAllowedError as exc:
        audit_record(
            request,
            who,
            audit.Action.PATH_JOB_QUEUED,
            outcome=audit.Outcome.DENIED,
            object_type="pipeline",
            object_id=pipeline,
            detail={"problem": str(exc)},
        )
        raise HTTPException(403, f"pipeline {pipeline}: {exc}") from None
    except PathInputError as exc:
        raise HTTPException(400, f"pipeline {pipeline}: {exc}") from None
    with node.db.session() as s:
        study = records.path_study(s, inputs)
        job = jobs.enqueue(
            s,
            study,
            pipeline,
            inputs,
            priority=spec.priority,
            max_attempts=node.settings.worker.max_attempts,
        )
        if job is None:  # the same request is already queued: wait for that one
            job = jobs.identical_job(s, study, pipeline, inputs)
        job_id = job.id if job is not None else None
    if job_id is None:
        raise HTTPException(409, "the request could not be queued; retry")
    audit_record(
        request,
        who,
        audit.Action.PATH_JOB_QUEUED,
        object_type="job",
        object_id=job_id,
        detail={"pipeline": pipeline, "paths": {r: v["path"] for r, v in inputs.items()}},
    )
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        answer = _job_answer(node, job_id)
        if answer is not None or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    return answer or JSONResponse({"job_id": job_id, "state": JobState.QUEUED}, status_code=202)


@router.get("/inference/jobs/{job_id}")
def job_state(
    job_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    request: Request,
    _: Principal = Depends(require_operator),
) -> Any:
    """The mask path of a finished path API job; 202 while it is queued or running."""
    answer = _job_answer(_node(request), job_id)
    return answer or JSONResponse({"job_id": job_id, "state": JobState.RUNNING}, status_code=202)


def _job_answer(node: ServiceView, job_id: int) -> Any:
    """The final answer for a finished job, None while it is queued or running."""
    with node.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or not is_path_job(job.inputs):
            raise HTTPException(404, f"job {job_id} is not a path API job")
        state, summary, error = job.state, job.summary or {}, job.last_error or ""
    if state == JobState.DONE and "mask_path" in summary:
        return {"mask_path": summary["mask_path"], "job_id": job_id}
    if state == JobState.DONE:
        raise HTTPException(500, f"job {job_id} finished without a mask")
    if state == JobState.FAILED:
        status = 422 if "PathInputError" in error or "SeriesReadError" in error else 500
        raise HTTPException(status, f"job {job_id} failed: {error}")
    if state == JobState.CANCELLED:
        raise HTTPException(409, f"job {job_id} was cancelled")
    if state == JobState.EXPIRED:
        raise HTTPException(
            410, f"job {job_id} expired: it waited longer than worker.max_queue_age_s"
        )
    return None
