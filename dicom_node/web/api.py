"""The JSON API under /api/: everything the pages show, and the admin actions.

Actions answer JSON to API clients; an HTML form posting to them is redirected back to
the page it came from (``next`` field), so pages and API share one implementation.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request, UploadFile
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from db.models import Instance, Series, utcnow
from dicom_node.echo import echo
from dicom_node.instance import header_attributes
from dicom_node.view import ServiceView
from dicom_node.web import queries
from dicom_node.web.auth import Principal, require_admin, require_viewer
from dicom_node.web.preview import PreviewError, preview_png
from dicom_node.web.queries import as_utc
from inference import queue as jobs
from kernel import outbox
from kernel.strict import StrictModel

log = logging.getLogger("dicom_node.web")
router = APIRouter(prefix="/api", tags=["api"])


def _node(request: Request) -> ServiceView:
    return request.app.state.service


async def _answer(request: Request, payload: dict[str, Any]) -> Response:
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
    return JSONResponse(payload)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    app = request.app
    return get_openapi(title=app.title, version=app.version, routes=app.routes)


@router.get("/dashboard")
def dashboard(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    return request.app.state.dashboard()


@router.get("/studies")
def studies(
    request: Request,
    q: str = "",
    date: str = "",
    status: str = "",
    limit: int = 50,
    offset: int = 0,
    who: Principal = Depends(require_viewer),
) -> dict[str, Any]:
    with _node(request).db.session() as s:
        return queries.studies(
            s, admin=who.is_admin, q=q, date=date, status=status, limit=limit, offset=offset
        )


@router.get("/studies/{study_uid}")
def study(request: Request, study_uid: str, who: Principal = Depends(require_viewer)) -> Any:
    with _node(request).db.session() as s:
        detail = queries.study_detail(s, study_uid, admin=who.is_admin)
    if detail is None:
        raise HTTPException(404, f"study {study_uid} is not known to this node")
    return detail


@router.get("/results/{result_id}/preview.png", response_class=Response)
def preview(request: Request, result_id: int, _: Principal = Depends(require_viewer)) -> Response:
    node = _node(request)
    try:
        png = preview_png(node.db, result_id, Path(node.settings.data_dir) / "previews")
    except PreviewError as exc:
        raise HTTPException(404, str(exc)) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.get("/queue")
def queue_status(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    with _node(request).db.session() as s:
        return queries.queue(s)


class PriorityBody(StrictModel):
    priority: str


async def _priority_of(request: Request) -> str:
    if request.headers.get("content-type", "").startswith("application/json"):
        return PriorityBody(**(await request.json())).priority
    return str((await request.form()).get("priority", ""))


@router.post("/jobs/{job_id}/{action}")
async def job_action(
    request: Request, job_id: int, action: str, who: Principal = Depends(require_admin)
) -> Response:
    """retry | cancel | priority (body: {"priority": "urgent" | "normal"})."""
    db = _node(request).db
    try:
        if action == "retry":
            jobs.retry(db, job_id, by=who.username)
            message = f"job {job_id} queued again"
        elif action == "cancel":
            message = f"job {job_id} {jobs.cancel(db, job_id, by=who.username)}"
        elif action == "priority":
            priority = await _priority_of(request)
            jobs.set_priority(db, job_id, priority, by=who.username)
            message = f"job {job_id} is now {priority}"
        else:
            raise HTTPException(404, f"unknown job action {action!r}")
    except jobs.JobActionError as exc:
        raise HTTPException(409, str(exc)) from None
    log.info("user %s: %s", who.username, message)
    return await _answer(request, {"ok": True, "message": message})


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


def dry_run_attrs(request: Request, path: str) -> dict[str, Any]:
    try:
        return header_attributes(path)
    except Exception as exc:
        raise HTTPException(422, f"not a readable DICOM file: {exc}") from None


@router.post("/rules/dry-run")
async def dry_run(
    request: Request,
    series_uid: str = "",
    _: Principal = Depends(require_viewer),
) -> dict[str, Any]:
    """What the rules in force would do with one file or a received series, and why.

    Changes nothing, so viewers may use it (it still needs the CSRF token).
    """
    from dicom_node.web.auth import check_csrf

    await check_csrf(request, request.state.principal)
    node = _node(request)
    file: UploadFile | None = None
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        series_uid = series_uid or str(form.get("series_uid") or "")
        upload = form.get("file")
        file = upload if getattr(upload, "filename", None) else None
    if file is not None:
        with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
            tmp.write(await file.read())
            tmp.flush()
            attrs = dry_run_attrs(request, tmp.name)
        source = f"uploaded file {file.filename}"
    elif series_uid:
        with node.db.session() as s:
            path = s.scalars(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.series_uid == series_uid)
                .limit(1)
            ).first()
        if path is None:
            raise HTTPException(404, f"series {series_uid} is not known to this node")
        attrs = dry_run_attrs(request, path)
        source = f"series {series_uid}"
    else:
        raise HTTPException(422, "upload a DICOM file or give a series_uid")
    decision = node.rules.get().decide(attrs)
    shown = {k: attrs.get(k) for k in ("Modality", "SeriesDescription", "ContrastBolusAgent")}
    return {"source": source, "attributes": shown, "decision": dataclasses.asdict(decision)}


@router.get("/destinations")
def destinations(request: Request, _: Principal = Depends(require_viewer)) -> list[dict[str, Any]]:
    node = _node(request)
    with node.db.session() as s:
        counts = queries.destination_counts(s)
    echoes = request.app.state.echoes
    return [
        {
            "name": d.name,
            "ae_title": d.ae_title,
            "host": d.host,
            "port": d.port,
            "counts": counts.get(d.name, {}),
            "last_echo": echoes.get(d.name),
        }
        for d in node.settings.destinations
    ]


def _destination(request: Request, name: str) -> Any:
    for d in _node(request).settings.destinations:
        if d.name == name:
            return d
    raise HTTPException(404, f"destination {name!r} is not configured")


@router.post("/destinations/{name}/echo")
async def echo_destination(
    request: Request, name: str, who: Principal = Depends(require_admin)
) -> Response:
    dest = _destination(request, name)
    node = _node(request)
    calling = dest.calling_ae_title or node.settings.ae_title
    ok = echo(dest.host, dest.port, dest.ae_title, calling, timeout_s=5)
    request.app.state.echoes[name] = {"at": as_utc(utcnow()), "ok": ok}
    message = f"C-ECHO to {name}: {'success' if ok else 'no answer'}"
    return await _answer(request, {"ok": ok, "message": message})


class ResendBody(StrictModel):
    dispatch_ids: list[int]


@router.post("/destinations/{name}/resend")
async def resend_failed(
    request: Request, name: str, who: Principal = Depends(require_admin)
) -> Response:
    """Queue every failed send to this destination again."""
    _destination(request, name)
    node = _node(request)
    with node.db.session() as s:
        ids = queries.failed_dispatch_ids(s, name)
    count = outbox.resend(node.db, ids, by=who.username)
    node.wake_dispatcher()
    return await _answer(request, {"ok": True, "message": f"{count} sends to {name} re-queued"})


@router.post("/dispatches/resend")
async def resend(request: Request, who: Principal = Depends(require_admin)) -> Response:
    if request.headers.get("content-type", "").startswith("application/json"):
        ids = ResendBody(**(await request.json())).dispatch_ids
    else:
        ids = [int(v) for v in (await request.form()).getlist("dispatch_id")]
    node = _node(request)
    count = outbox.resend(node.db, ids, by=who.username)
    node.wake_dispatcher()
    return await _answer(request, {"ok": True, "message": f"{count} sends re-queued"})
