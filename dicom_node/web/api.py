"""The JSON API under /api/: everything the pages show, and the actions.

Actions answer JSON to API clients; an HTML form posting to them is redirected back to
the page it came from (``next`` field), so pages and API share one implementation. Who
may act: viewers nothing, reviewers approve or reject held results, operators act on
jobs, sends and destinations, admins all of it (``auth.require_<role>``). Every path and
query parameter is validated (ids within 64-bit integers, UIDs as DICOM UIDs, limits
bounded): a bad one answers 422, never a server error. Views of a study or result and
every action go into the audit trail (``dicom_node.audit``).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import Field, ValidationError
from sqlalchemy import select

from db.models import Result, Series, Study
from dicom_node import audit, image_evidence
from dicom_node.explain import collect_series, explain_study, pipeline_items, received_study_series
from dicom_node.view import ServiceView
from dicom_node.web import queries, viewer
from dicom_node.web.auth import (
    Principal,
    audit_record,
    require_operator,
    require_reviewer,
    require_viewer,
)
from dicom_node.web.preview import PreviewError, SourceUnreadableError, preview_png, result_files
from dicom_node.web.queries import as_utc
from inference import queue as jobs
from kernel import outbox
from kernel.strict import StrictModel
from kernel.vocabulary import SeriesState

log = logging.getLogger("dicom_node.web")
router = APIRouter(prefix="/api", tags=["api"])
# Upload limits of the dry run (it reads headers only, but must not fill the disk).
DRY_RUN_MAX_FILES = 2000
DRY_RUN_MAX_BYTES = 2_000_000_000
# Database ids are 64-bit signed integers; larger numbers cannot name a row.
MAX_ID = 2**63 - 1
# A DICOM UID as the node stores it (PS3.5 9.1: digits and dots, at most 64 characters).
UID_PATTERN = r"^[0-9.]{1,64}$"
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description="a database id")]
StudyUid = Annotated[str, Path(pattern=UID_PATTERN, description="Study Instance UID")]
SeriesUidQuery = Annotated[
    str, Query(pattern=r"^[0-9.]{0,64}$", description="Series Instance UID (or empty)")
]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="rows to skip")]
SearchText = Annotated[str, Query(max_length=128)]
StudyDate = Annotated[
    str, Query(pattern=r"^(\d{8}|\d{4}-\d{2}-\d{2})?$", description="YYYYMMDD or YYYY-MM-DD")
]
StatusFilter = Annotated[
    Literal["", *queries.STUDY_FILTERS],  # type: ignore[valid-type]
    Query(description="a status, or in_progress"),
]
# How often slice downloads of one result by one user are audited (the viewer fetches a
# slice per scroll step; one record per look is what the trail needs).
SLICE_AUDIT_EVERY_S = 600.0


def _node(request: Request) -> ServiceView:
    return request.app.state.service


def _viewer(request: Request, who: Principal | None) -> queries.Viewer:
    return request.app.state.viewer(who)


async def _json_model(request: Request, model: type[StrictModel]) -> Any:
    """The JSON body validated by ``model``; 422 naming the problem otherwise."""
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(422, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "the body must be a JSON object")
    try:
        return model(**body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise HTTPException(422, problems) from None


async def answer_action(request: Request, payload: dict[str, Any], status: int = 200) -> Response:
    """JSON for API clients; back to the page (with a message) for HTML forms."""
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        target = str(form.get("next") or "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        sep = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{sep}msg={quote(payload['message'])}", 303)
    return JSONResponse(payload, status)


async def body_field(request: Request, name: str) -> str:
    """A field of a JSON body or of a form ("" when absent)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(422, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "the body must be a JSON object")
        return str(body.get(name) or "")
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        return str((await request.form()).get(name) or "")
    return ""


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    app = request.app
    return get_openapi(title=app.title, version=app.version, routes=app.routes)


@router.get("/dashboard")
def dashboard(request: Request, who: Principal = Depends(require_viewer)) -> dict[str, Any]:
    return request.app.state.dashboard(who)


def search_studies(
    request: Request,
    who: Principal,
    *,
    q: str,
    date: str,
    status: str,
    limit: int,
    offset: int,
) -> dict[str, Any]:
    """One page of the studies list; a search by text goes into the audit trail (it may
    name a patient ID)."""
    with _node(request).db.session() as s:
        page = queries.studies(
            s, _viewer(request, who), q=q, date=date, status=status, limit=limit, offset=offset
        )
    if q:
        audit_record(
            request,
            who,
            audit.Action.STUDIES_SEARCHED,
            object_type="studies",
            object_id=q,
            detail={"date": date or None, "status": status or None, "found": len(page["items"])},
        )
    return page


@router.get("/studies")
def studies(
    request: Request,
    q: SearchText = "",
    date: StudyDate = "",
    status: StatusFilter = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Offset = 0,
    who: Principal = Depends(require_viewer),
) -> dict[str, Any]:
    """Studies, newest first, each with its status (``status``: a status value, or
    ``in_progress``, filters)."""
    return search_studies(request, who, q=q, date=date, status=status, limit=limit, offset=offset)


def study_viewed(request: Request, who: Principal, study_uid: str) -> dict[str, Any]:
    """A study's detail for ``who``, recorded in the audit trail; 404 when unknown."""
    with _node(request).db.session() as s:
        detail = queries.study_detail(s, study_uid, _viewer(request, who))
    if detail is None:
        raise HTTPException(404, f"study {study_uid} is not known to this node")
    audit_record(
        request,
        who,
        audit.Action.STUDY_VIEWED,
        object_type="study",
        object_id=study_uid,
        study_uid=study_uid,
        detail={"via": "page" if getattr(request.state, "html_page", False) else "api"},
    )
    return detail


@router.get("/studies/{study_uid}")
def study(request: Request, study_uid: StudyUid, who: Principal = Depends(require_viewer)) -> Any:
    return study_viewed(request, who, study_uid)


# -- results: preview, viewer, review ----------------------------------------------------


def _volume(request: Request, result_id: int) -> viewer.ResultVolume:
    """The result's viewer volume: 404 when it is gone, 409 when its source is damaged."""
    node = _node(request)
    try:
        files = result_files(node.db, result_id)
        return request.app.state.volumes.get(files.sop_uid, files.path, files.source_paths)
    except SourceUnreadableError as exc:  # the result exists; its source cannot be shown
        raise HTTPException(409, str(exc)) from None
    except PreviewError as exc:
        raise HTTPException(404, str(exc)) from None


def _result_audit(
    request: Request, who: Principal, action: audit.Action, result_id: int, **detail: Any
) -> None:
    audit_record(
        request,
        who,
        action,
        object_type="result",
        object_id=result_id,
        study_uid=audit.study_of_result(_node(request).db, result_id),
        detail=detail or None,
    )


@router.get("/results/{result_id}/preview.png", response_class=Response)
def preview(
    request: Request, result_id: RowId, who: Principal = Depends(require_viewer)
) -> Response:
    """The default viewer slice (the smallest label present where it is largest)."""
    node = _node(request)
    try:
        png = preview_png(
            node.db,
            result_id,
            FilePath(node.settings.data_dir) / "previews",
            request.app.state.volumes,
        )
    except SourceUnreadableError as exc:  # the result exists; its source cannot be shown
        raise HTTPException(409, str(exc)) from None
    except PreviewError as exc:
        raise HTTPException(404, str(exc)) from None
    _result_audit(request, who, audit.Action.PREVIEW_DOWNLOADED, result_id)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.get("/results/{result_id}")
def result(request: Request, result_id: RowId, who: Principal = Depends(require_viewer)) -> Any:
    """A result for the viewer: study, source series, sends and review state, and (when
    the source can be read) the slices, the default slice and the legend with volumes."""
    with _node(request).db.session() as s:
        detail = queries.result_detail(s, result_id)
    if detail is None:
        raise HTTPException(404, f"result {result_id} does not exist")
    audit_record(
        request,
        who,
        audit.Action.RESULT_VIEWED,
        object_type="result",
        object_id=result_id,
        study_uid=detail.get("study_uid"),
        detail={"via": "page" if getattr(request.state, "html_page", False) else "api"},
    )
    try:
        volume = _volume(request, result_id)
    except HTTPException as exc:
        return {**detail, "viewable": False, "problem": exc.detail}
    return {
        **detail,
        "viewable": True,
        "problem": None,
        "slices": volume.slices,
        "default_slice": volume.default_slice,
        "positions_mm": [round(p, 2) for p in volume.positions_mm],
        "legend": volume.legend(),
        "windows": {name: {"width": w, "level": lv} for name, (w, lv) in viewer.WINDOWS.items()},
    }


@router.get("/results/{result_id}/slices/{z}.png", response_class=Response)
def result_slice(
    request: Request,
    result_id: RowId,
    z: Annotated[int, Path(ge=0, le=100_000, description="slice index")],
    overlay: bool = True,
    window: Annotated[
        Literal[*viewer.WINDOWS],  # type: ignore[valid-type]
        Query(description="display window"),
    ] = viewer.DEFAULT_WINDOW,
    who: Principal = Depends(require_viewer),
) -> Response:
    """Slice ``z`` of the source (0 = first along the slice normal) with the result.
    Audited once per user and result every ``SLICE_AUDIT_EVERY_S``."""
    volume = _volume(request, result_id)
    try:
        png = viewer.render_slice(volume, z, overlay=overlay, window=window)
    except IndexError as exc:
        raise HTTPException(404, str(exc)) from None
    seen = request.app.state.slice_views
    key, now = (who.username, result_id), time.monotonic()
    if key not in seen or now - seen[key] >= SLICE_AUDIT_EVERY_S:
        if len(seen) > 10_000:  # forget looks older than the window
            for old in [k for k, at in seen.items() if now - at >= SLICE_AUDIT_EVERY_S]:
                del seen[old]
        seen[key] = now
        _result_audit(request, who, audit.Action.SLICES_VIEWED, result_id, first_slice=z)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _review_audit(
    request: Request,
    who: Principal,
    action: audit.Action,
    result_id: int,
    problem: str | None,
    sends: int = 0,
    note: str | None = None,
) -> None:
    audit_record(
        request,
        who,
        action,
        outcome=audit.Outcome.FAILURE if problem else audit.Outcome.SUCCESS,
        object_type="result",
        object_id=result_id,
        study_uid=audit.study_of_result(_node(request).db, result_id),
        detail={"sends": sends, "note": note or None, "problem": problem},
    )


def _result_row(request: Request, result_id: int) -> tuple[str, str]:
    with _node(request).db.session() as s:
        row = s.get(Result, result_id)
        if row is None:
            raise HTTPException(404, f"result {result_id} does not exist")
        return row.sop_uid, f"{row.pipeline or 'result'} {row.kind} {row.sop_uid}"


@router.post("/results/{result_id}/approve")
async def approve(
    request: Request, result_id: RowId, who: Principal = Depends(require_reviewer)
) -> Response:
    """Send a result held for review (all its held sends, or ``destination``'s)."""
    sop_uid, what = _result_row(request, result_id)
    destination = await body_field(request, "destination")
    note = await body_field(request, "note")
    try:
        count = outbox.approve(
            _node(request).db,
            sop_uid,
            who.username,
            note or None,
            [destination] if destination else None,
        )
    except outbox.ReviewError as exc:
        _review_audit(request, who, audit.Action.RESULT_APPROVED, result_id, str(exc))
        raise HTTPException(409, str(exc)) from None
    _node(request).wake_dispatcher()
    _review_audit(request, who, audit.Action.RESULT_APPROVED, result_id, None, count, note)
    log.info("user %s approved %s (%d sends)", who.username, what, count)
    return await answer_action(
        request, {"ok": True, "message": f"{what} approved: {count} send(s)"}
    )


@router.post("/results/{result_id}/reject")
async def reject(
    request: Request, result_id: RowId, who: Principal = Depends(require_reviewer)
) -> Response:
    """Never send a result held for review; ``reason`` is required and recorded."""
    sop_uid, what = _result_row(request, result_id)
    destination = await body_field(request, "destination")
    reason = await body_field(request, "reason")
    try:
        count = outbox.reject(
            _node(request).db,
            sop_uid,
            who.username,
            reason,
            [destination] if destination else None,
        )
    except outbox.ReviewError as exc:
        _review_audit(request, who, audit.Action.RESULT_REJECTED, result_id, str(exc))
        raise HTTPException(409 if reason.strip() else 422, str(exc)) from None
    _review_audit(request, who, audit.Action.RESULT_REJECTED, result_id, None, count, reason)
    log.info("user %s rejected %s (%d sends)", who.username, what, count)
    return await answer_action(
        request, {"ok": True, "message": f"{what} rejected ({count} send(s) not sent)"}
    )


# -- queue ---------------------------------------------------------------------------------


@router.get("/queue")
def queue_status(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    with _node(request).db.session() as s:
        return queries.queue(s)


class PriorityBody(StrictModel):
    priority: str = Field(max_length=16)


async def _priority_of(request: Request) -> str:
    if request.headers.get("content-type", "").startswith("application/json"):
        return (await _json_model(request, PriorityBody)).priority
    return str(await body_field(request, "priority"))


_JOB_ACTIONS = {
    "retry": audit.Action.JOB_RETRIED,
    "cancel": audit.Action.JOB_CANCELLED,
    "priority": audit.Action.JOB_PRIORITY,
}


@router.post("/jobs/{job_id}/{action}")
async def job_action(
    request: Request,
    job_id: RowId,
    action: Literal["retry", "cancel", "priority"],
    who: Principal = Depends(require_operator),
) -> Response:
    """retry | cancel | priority (body: {"priority": "urgent" | "normal"})."""
    db = _node(request).db
    priority = await _priority_of(request) if action == "priority" else None
    study_uid = audit.study_of_job(db, job_id)

    def trail(outcome: audit.Outcome, message: str) -> None:
        audit_record(
            request,
            who,
            _JOB_ACTIONS[action],
            outcome=outcome,
            object_type="job",
            object_id=job_id,
            study_uid=study_uid,
            detail={"message": message, "priority": priority},
        )

    try:
        if action == "retry":
            jobs.retry(db, job_id, by=who.username)
            message = f"job {job_id} queued again"
        elif action == "cancel":
            message = f"job {job_id} {jobs.cancel(db, job_id, by=who.username)}"
        else:
            jobs.set_priority(db, job_id, priority or "", by=who.username)
            message = f"job {job_id} is now {priority}"
    except jobs.JobActionError as exc:
        trail(audit.Outcome.FAILURE, str(exc))
        raise HTTPException(409, str(exc)) from None
    trail(audit.Outcome.SUCCESS, message)
    log.info("user %s: %s", who.username, message)
    return await answer_action(request, {"ok": True, "message": message})


# -- rules ---------------------------------------------------------------------------------


@router.get("/rules")
def rules(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    holder = _node(request).rules
    rs = holder.get()
    last = holder.last_reload
    return {
        "source": str(rs.source) if rs.source else None,
        "last_reload": {"at": as_utc(last.at), "ok": last.ok, "message": last.message},
        "rules": [r.model_dump() for r in rs.spec.rules],
        "pipelines": sorted(rs.pipelines),
    }


class DryRunError(Exception):
    """The dry run cannot be done (status code and message for the user)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _annotated(items: list[dict[str, Any]], series: dict[str, dict[str, Any]]) -> None:
    for item in items:
        attrs = series.get(item["series_uid"], {})
        item["series_number"] = attrs.get("SeriesNumber")
        item["series_description"] = attrs.get("SeriesDescription")
        item["modality"] = attrs.get("Modality")
        item["orientation"] = attrs.get("Orientation")
    items.sort(key=lambda i: (i["series_number"] is None, i["series_number"] or 0))


def dry_run_series(node: ServiceView, series_uid: str) -> dict[str, Any]:
    """What the rules in force do with a received series, planned with every complete
    series of its study exactly as the live router plans it. Raises ``DryRunError``."""
    with node.db.session() as s:
        row = s.scalars(select(Series).where(Series.series_uid == series_uid)).first()
        if row is None:
            raise DryRunError(404, f"series {series_uid} is not known to this node")
        if row.state != SeriesState.COMPLETE:
            raise DryRunError(409, f"series {series_uid} is still receiving; try again soon")
        study = s.get_one(Study, row.study_id)
        series = received_study_series(s, study)
        study_uid = study.study_uid
    ruleset = node.rules.get()
    items, plans = explain_study(
        ruleset, study_uid, series, node.target_spacing_mm, image_evidence.from_database(node.db)
    )
    _annotated(items, series)
    return {
        "source": f"received series {series_uid} with the {len(series)} complete series "
        f"of its study",
        "study_uid": study_uid,
        "series_uid": series_uid,
        "series": items,
        "pipelines": pipeline_items(plans),
    }


def dry_run_files(node: ServiceView, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    """What the rules in force do with uploaded files (one or more series, planned per
    study as ``route explain`` plans them). Raises ``DryRunError``."""
    if not files:
        raise DryRunError(422, "upload DICOM files or give a series UID")
    if len(files) > DRY_RUN_MAX_FILES:
        raise DryRunError(413, f"at most {DRY_RUN_MAX_FILES} files")
    ruleset = node.rules.get()
    with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
        for i, (_name, data) in enumerate(files):
            (Path(tmp) / f"{i:05d}.dcm").write_bytes(data)
        studies = collect_series([tmp])
        if not studies:
            raise DryRunError(422, "none of the uploaded files is a readable DICOM file")
        items: list[dict[str, Any]] = []
        pipelines: list[dict[str, Any]] = []
        not_measured = {
            "state": "none",
            "reason": "not measured for uploaded files: the web app runs no model; "
            "`dicom-node route explain` measures it",
        }
        for study_uid, series in studies.items():
            found, plans = explain_study(
                ruleset, study_uid, series, node.target_spacing_mm, lambda _uid: not_measured
            )
            _annotated(found, series)
            items += found
            pipelines += pipeline_items(plans)
    names = ", ".join(name for name, _ in files[:3]) + (", ..." if len(files) > 3 else "")
    return {
        "source": f"{len(files)} uploaded file(s): {names}",
        "study_uid": next(iter(studies)),
        "series_uid": None,
        "series": items,
        "pipelines": pipelines,
    }


async def dry_run_request(request: Request, series_uid: str = "") -> dict[str, Any]:
    """The dry run of a request: form or JSON ``series_uid``, or uploaded ``file``s."""
    node = _node(request)
    uploads: list[tuple[str, bytes]] = []
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        series_uid = series_uid or str(form.get("series_uid") or "")
        total = 0
        for upload in form.getlist("file"):
            if getattr(upload, "filename", None):
                data = await upload.read()
                total += len(data)
                if total > DRY_RUN_MAX_BYTES:
                    raise DryRunError(413, f"at most {DRY_RUN_MAX_BYTES} bytes")
                uploads.append((upload.filename, data))
    else:
        series_uid = series_uid or await body_field(request, "series_uid")
    if uploads:
        return dry_run_files(node, uploads)
    if series_uid.strip():
        if not re.fullmatch(UID_PATTERN, series_uid.strip()):
            raise DryRunError(422, "series_uid must be a DICOM UID (digits and dots)")
        return dry_run_series(node, series_uid.strip())
    raise DryRunError(422, "upload DICOM files or give a received series UID")


@router.post("/rules/dry-run")
async def dry_run(
    request: Request,
    series_uid: SeriesUidQuery = "",
    who: Principal = Depends(require_viewer),
) -> dict[str, Any]:
    """What the rules in force would do with uploaded files or a received series, and
    why: the live router's planning on the whole study (phases, each rule's first
    failing condition, pipelines and their inputs, forwards).

    Changes nothing, so viewers may use it (it still needs the CSRF token).
    """
    try:
        answer = await dry_run_request(request, series_uid)
    except DryRunError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    dry_run_audit(request, who, answer)
    return answer


def dry_run_audit(request: Request, who: Principal, answer: dict[str, Any]) -> None:
    """A dry run on a received series shows that study: it goes into the audit trail."""
    if answer.get("series_uid"):
        audit_record(
            request,
            who,
            audit.Action.DRY_RUN,
            object_type="series",
            object_id=answer["series_uid"],
            study_uid=answer.get("study_uid"),
        )


# -- destinations --------------------------------------------------------------------------

DestinationName = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("/destinations")
def destinations(
    request: Request, who: Principal = Depends(require_viewer)
) -> list[dict[str, Any]]:
    """Every destination with its health (state, reason, since), outbox counts by state
    and latest C-ECHO."""
    with _node(request).db.session() as s:
        return queries.destinations(s, _viewer(request, who))


def _destination(request: Request, name: str) -> Any:
    for d in _node(request).settings.destinations:
        if d.name == name:
            return d
    raise HTTPException(404, f"destination {name!r} is not configured")


@router.post("/destinations/{name}/echo")
async def echo_destination(
    request: Request, name: DestinationName, who: Principal = Depends(require_operator)
) -> Response:
    """C-ECHO the destination now; the answer is kept with the periodic ones."""
    dest = _destination(request, name)
    node = _node(request)
    if node.echo_destination is None:
        raise HTTPException(503, "C-ECHO is not available in this node")
    answer = node.echo_destination(name, who.username)
    probe = "QIDO-RS check of" if dest.kind == "dicomweb" else "C-ECHO to"
    message = f"{probe} {name}: " + ("success" if answer.ok else f"failed: {answer.detail}")
    audit_record(
        request,
        who,
        audit.Action.DESTINATION_ECHOED,
        outcome=audit.Outcome.SUCCESS if answer.ok else audit.Outcome.FAILURE,
        object_type="destination",
        object_id=name,
        detail={"answer": answer.detail if not answer.ok else "success"},
    )
    return await answer_action(request, {"ok": answer.ok, "message": message})


class ResendBody(StrictModel):
    dispatch_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(max_length=10_000)


def _resend(request: Request, who: Principal, ids: list[int], destination: str | None) -> int:
    """Queue the sends again and record, per study, who resent which sends."""
    node = _node(request)
    count = outbox.resend(node.db, ids, by=who.username)
    node.wake_dispatcher()
    for study_uid, of_study in audit.studies_of_dispatches(node.db, ids).items():
        audit_record(
            request,
            who,
            audit.Action.SENDS_RESENT,
            object_type="destination" if destination else "dispatches",
            object_id=destination or ",".join(map(str, sorted(of_study)))[:256],
            study_uid=study_uid,
            detail={"dispatch_ids": sorted(of_study), "requeued_in_all": count},
        )
    return count


@router.post("/destinations/{name}/resend")
async def resend_failed(
    request: Request, name: DestinationName, who: Principal = Depends(require_operator)
) -> Response:
    """Queue every failed send to this destination again."""
    _destination(request, name)
    with _node(request).db.session() as s:
        ids = queries.failed_dispatch_ids(s, name)
    count = _resend(request, who, ids, name)
    return await answer_action(
        request, {"ok": True, "message": f"{count} sends to {name} re-queued"}
    )


@router.post("/dispatches/resend")
async def resend(request: Request, who: Principal = Depends(require_operator)) -> Response:
    """Queue chosen sends again (not those held for or rejected by a reviewer)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        ids = (await _json_model(request, ResendBody)).dispatch_ids
    else:
        raw = (await request.form()).getlist("dispatch_id")
        if not all(isinstance(v, str) and v.isdigit() and 0 < int(v) <= MAX_ID for v in raw):
            raise HTTPException(422, "dispatch_id must be positive whole numbers")
        ids = [int(v) for v in raw]
    count = _resend(request, who, ids, None)
    skipped = len(set(ids)) - count
    message = f"{count} sends re-queued" + (
        f"; {skipped} left alone (being sent, or waiting for / rejected by a reviewer)"
        if skipped > 0
        else ""
    )
    return await answer_action(request, {"ok": True, "message": message})
