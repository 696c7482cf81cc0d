"""Server-rendered admin pages (Jinja2); the data comes from ``queries`` like the API's."""

from __future__ import annotations

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
    html_page,
    require_csrf,
    require_viewer,
)

log = logging.getLogger("dicom_node.web")
router = APIRouter(include_in_schema=False, dependencies=[Depends(html_page)])
templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
LOGIN_COOKIE = "dicom_node_login"


def _fmt_s(value: float | None) -> str:
    if value is None:
        return ""
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


templates.env.filters["duration"] = _fmt_s


def render(request: Request, name: str, who: Principal | None, **ctx: Any) -> HTMLResponse:
    """A page, or only its main block when the page's refresh script asks (X-Partial)."""
    ctx.update(
        user=who,
        csrf=who.csrf if who else None,
        msg=request.query_params.get("msg"),
        partial=request.headers.get("x-partial") == "1",
        path=request.url.path,
        full_path=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )
    return templates.TemplateResponse(request, name, ctx)


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, login_csrf=token, next=_safe_next(next))
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
    response = render(request, "login.html", None, login_csrf=token, next=target, error=error)
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
    return render(request, "dashboard.html", who, d=request.app.state.dashboard())


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
            s, admin=who.is_admin, q=q, date=date, status=status, limit=50, offset=offset
        )
    return render(
        request,
        "studies.html",
        who,
        page=page,
        q=q,
        date=date,
        status=status,
        statuses=queries.STUDY_STATUSES,
    )


@router.get("/studies/{study_uid}")
def study_page(
    request: Request, study_uid: str, who: Principal = Depends(require_viewer)
) -> Response:
    with request.app.state.service.db.session() as s:
        detail = queries.study_detail(s, study_uid, admin=who.is_admin)
    if detail is None:
        raise HTTPException(404, f"study {study_uid} is not known to this node")
    return render(request, "study.html", who, st=detail)


@router.get("/queue")
def queue_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    with request.app.state.service.db.session() as s:
        data = queries.queue(s)
    return render(request, "queue.html", who, qd=data)


@router.get("/rules")
def rules_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    return render(request, "rules.html", who, r=api.rules(request, who))


@router.get("/destinations")
def destinations_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    return render(request, "destinations.html", who, dests=api.destinations(request, who))
