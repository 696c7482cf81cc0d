"""Server-rendered admin pages (Jinja2); the data comes from ``queries`` like the API's.

Every page names the node (AE title, port, version) in its header and itself and its
study in its title; times are local (``time_zone``), statuses those of
``dicom_node.status``.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicom_node.web import api, queries, users
from dicom_node.web.auth import (
    COOKIE,
    SESSION_MAX_AGE_S,
    Principal,
    check_csrf,
    html_page,
    require_csrf,
    require_viewer,
)
from dicom_node.web.display import duration, study_heading

log = logging.getLogger("dicom_node.web")
router = APIRouter(include_in_schema=False, dependencies=[Depends(html_page)])
templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
LOGIN_COOKIE = "dicom_node_login"

templates.env.filters["duration"] = duration
templates.env.filters["pretty_json"] = lambda value: json.dumps(
    value, indent=2, ensure_ascii=False, sort_keys=True, default=str
)


def render(
    request: Request, name: str, who: Principal | None, title: str, **ctx: Any
) -> HTMLResponse:
    """A page, or only its main block when the page's refresh script asks (X-Partial)."""
    app = request.app
    clock = app.state.clock
    ctx.update(
        user=who,
        csrf=who.csrf if who else None,
        msg=request.query_params.get("msg"),
        partial=request.headers.get("x-partial") == "1",
        path=request.url.path,
        full_path=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
        node=app.state.identity(),
        zone=clock.name,
        title=title,
        datetime=clock.datetime,
        time=clock.time,
        when=clock.short,
    )
    return templates.TemplateResponse(request, name, ctx)


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request, "login.html", None, "Log in", login_csrf=token, next=_safe_next(next)
    )
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", max_age=3600)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    username = str(form.get("username", ""))
    password = str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "/")))
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected or not secrets.compare_digest(expected, str(form.get("csrf_token", ""))):
        raise HTTPException(403, "missing or wrong CSRF token; reload the login page")
    ip = request.client.host if request.client else "?"
    app = request.app
    if not app.state.limiter.allow(username, ip):
        log.warning("login rate limit hit for user %r from %s", username, ip)
        return _login_again(request, target, "Too many attempts; wait a few minutes.", 429)
    found = users.authenticate(app.state.service.db, username, password)
    if found is None:
        log.warning("failed login for user %r from %s", username, ip)
        return _login_again(request, target, "Wrong username or password.", 401)
    app.state.limiter.forget_user(username)
    log.info("user %s logged in from %s", username, ip)
    cookie = app.state.sessions.dumps({"u": found[0], "csrf": secrets.token_urlsafe(24)})
    response = RedirectResponse(target, 303)
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="lax", max_age=SESSION_MAX_AGE_S)
    response.delete_cookie(LOGIN_COOKIE)
    return response


def _login_again(request: Request, target: str, error: str, status: int) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request, "login.html", None, "Log in", login_csrf=token, next=target, error=error
    )
    response.status_code = status
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", max_age=3600)
    return response


@router.post("/logout")
def logout(_: Principal = Depends(require_csrf)) -> Response:
    response = RedirectResponse("/login", 303)
    response.delete_cookie(COOKIE)
    return response


@router.get("/")
def dashboard_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    return render(request, "dashboard.html", who, "Dashboard", d=request.app.state.dashboard(who))


@router.get("/studies")
def studies_page(
    request: Request,
    q: str = "",
    date: str = "",
    status: str = "",
    offset: int = 0,
    who: Principal = Depends(require_viewer),
) -> Response:
    with request.app.state.service.db.session() as s:
        page = queries.studies(
            s,
            request.app.state.viewer(who),
            q=q,
            date=date,
            status=status,
            limit=50,
            offset=offset,
        )
    return render(
        request,
        "studies.html",
        who,
        "Studies",
        page=page,
        q=q,
        date=date,
        status=status,
        statuses=queries.STUDY_FILTERS,
    )


@router.get("/studies/{study_uid}")
def study_page(
    request: Request, study_uid: str, who: Principal = Depends(require_viewer)
) -> Response:
    with request.app.state.service.db.session() as s:
        detail = queries.study_detail(s, study_uid, request.app.state.viewer(who))
    if detail is None:
        raise HTTPException(404, f"study {study_uid} is not known to this node")
    return render(request, "study.html", who, detail["heading"], st=detail)


@router.get("/results/{result_id}")
def result_page(
    request: Request, result_id: int, who: Principal = Depends(require_viewer)
) -> Response:
    """The result viewer: source slices with the result, legend, review actions."""
    r = api.result(request, result_id, who)
    heading = study_heading(
        r["accession_number"], r["study_description"], r["study_date"], r["study_uid"] or ""
    )
    kind = r["result_type"] if r["result_type"] == "RTSTRUCT" else r["kind"]
    title = f"{r['pipeline'] or 'Result'} {kind} · {heading}"
    return render(request, "viewer.html", who, title, r=r, heading=heading, kind=kind)


@router.get("/queue")
def queue_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    with request.app.state.service.db.session() as s:
        data = queries.queue(s)
    return render(request, "queue.html", who, "Queue", qd=data)


def _rules_page(
    request: Request, who: Principal, dry: dict[str, Any] | None, error: str | None, uid: str
) -> Response:
    return render(
        request,
        "rules.html",
        who,
        "Rules",
        r=api.rules(request, who),
        dry=dry,
        dry_error=error,
        series_uid=uid,
    )


@router.get("/rules")
def rules_page(
    request: Request, series_uid: str = "", who: Principal = Depends(require_viewer)
) -> Response:
    """The rules in force; with ``series_uid``, the dry run of that received series."""
    dry, error = None, None
    if series_uid.strip():
        try:
            dry = api.dry_run_series(request.app.state.service, series_uid.strip())
        except api.DryRunError as exc:
            error = str(exc)
    return _rules_page(request, who, dry, error, series_uid)


@router.post("/rules")
async def rules_dry_run(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    """The dry run of uploaded files (or a series UID) from the page's form."""
    await check_csrf(request, who)
    dry, error = None, None
    try:
        dry = await api.dry_run_request(request)
    except api.DryRunError as exc:
        error = str(exc)
    uid = str((await request.form()).get("series_uid") or "")
    return _rules_page(request, who, dry, error, uid)


@router.get("/destinations")
def destinations_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    return render(
        request, "destinations.html", who, "Destinations", dests=api.destinations(request, who)
    )
