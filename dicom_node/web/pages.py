"""Server-rendered admin pages (Jinja2); the data comes from ``queries`` like the API's.

Every page names the node (AE title, port, version) in its header and itself and its
study in its title; times are local (``time_zone``), statuses those of
``dicom_node.status``. Logins, logouts and views of a study or result go into the audit
trail; the Users, Audit and Settings pages are for admins, the Account page for everyone.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicom_node import audit, sources
from dicom_node.web import admin_api, api, queries, users
from dicom_node.web.auth import (
    COOKIE,
    Principal,
    audit_record,
    check_csrf,
    client_address,
    html_page,
    require_admin,
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
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


@router.get("/login")
def login_form(request: Request, next: Annotated[str, Query(max_length=2048)] = "/") -> Response:
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
    ip = client_address(request)
    app = request.app
    node = app.state.service
    username = username[:64]
    reset = users.unlocked_at(node.db, username)
    if not app.state.limiter.allow(username, ip, reset.timestamp() if reset else None):
        log.warning("login rate limit hit for user %r from %s", username, ip)
        _login_audit(request, username, audit.Outcome.DENIED, "too many attempts")
        return _login_again(request, target, "Too many attempts; wait a few minutes.", 429)
    outcome = users.login(node.db, username, password)
    if not outcome.ok:
        log.warning("failed login for user %r from %s", username, ip)
        _login_audit(request, username, audit.Outcome.FAILURE, outcome.reason)
        return _login_again(request, target, "Wrong username or password.", 401)
    app.state.limiter.forget_user(username)
    log.info("user %s logged in from %s", username, ip)
    web = node.settings.web
    cookie, _csrf = users.create_session(node.db, outcome.username, web.session_max_age_s, ip)
    _login_audit(request, outcome.username, audit.Outcome.SUCCESS, None)
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE, cookie, httponly=True, samesite="lax", max_age=int(web.session_max_age_s)
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


def _login_audit(
    request: Request, username: str, outcome: audit.Outcome, reason: str | None
) -> None:
    """A login attempt in the audit trail: the name given, the client, why it failed."""
    node = request.app.state.service
    audit.record(
        node.db,
        audit.Action.LOGIN,
        audit.Actor(
            username or "?", "session" if reason is None else "anonymous", client_address(request)
        ),
        outcome=outcome,
        object_type="user",
        object_id=username or None,
        detail={"reason": reason} if reason else None,
    )


def _login_again(request: Request, target: str, error: str, status: int) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request, "login.html", None, "Log in", login_csrf=token, next=target, error=error
    )
    response.status_code = status
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", max_age=3600)
    return response


@router.post("/logout")
def logout(request: Request, who: Principal = Depends(require_csrf)) -> Response:
    """End the session on the server (its cookie is worthless from now on)."""
    users.end_session(request.app.state.service.db, request.cookies.get(COOKIE))
    audit_record(request, who, audit.Action.LOGOUT, object_type="user", object_id=who.username)
    response = RedirectResponse("/login", 303)
    response.delete_cookie(COOKIE)
    return response


@router.get("/")
def dashboard_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    return render(request, "dashboard.html", who, "Dashboard", d=request.app.state.dashboard(who))


@router.get("/studies")
def studies_page(
    request: Request,
    q: api.SearchText = "",
    date: api.StudyDate = "",
    status: api.StatusFilter = "",
    offset: api.Offset = 0,
    who: Principal = Depends(require_viewer),
) -> Response:
    page = api.search_studies(request, who, q=q, date=date, status=status, limit=50, offset=offset)
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
        retrieve_sources=[
            sources.source_dict(x) for x in request.app.state.service.settings.sources
        ],
    )


@router.get("/studies/{study_uid}")
def study_page(
    request: Request, study_uid: api.StudyUid, who: Principal = Depends(require_viewer)
) -> Response:
    detail = api.study_viewed(request, who, study_uid)
    return render(request, "study.html", who, detail["heading"], st=detail)


@router.get("/results/{result_id}")
def result_page(
    request: Request, result_id: api.RowId, who: Principal = Depends(require_viewer)
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
    request: Request,
    series_uid: Annotated[str, Query(max_length=128)] = "",
    who: Principal = Depends(require_viewer),
) -> Response:
    """The rules in force; with ``series_uid``, the dry run of that received series."""
    dry, error = None, None
    uid = series_uid.strip()
    if uid and not re.fullmatch(api.UID_PATTERN, uid):
        error = "series_uid must be a DICOM UID (digits and dots)"
    elif uid:
        try:
            dry = api.dry_run_series(request.app.state.service, uid)
            api.dry_run_audit(request, who, dry)
        except api.DryRunError as exc:
            error = str(exc)
    return _rules_page(request, who, dry, error, series_uid)


@router.post("/rules")
async def rules_dry_run(request: Request, who: Principal = Depends(require_csrf)) -> Response:
    """The dry run of uploaded files (or a series UID) from the page's form."""
    await check_csrf(request, who)
    dry, error = None, None
    try:
        dry = await api.dry_run_request(request)
        api.dry_run_audit(request, who, dry)
    except api.DryRunError as exc:
        error = str(exc)
    uid = str((await request.form()).get("series_uid") or "")
    return _rules_page(request, who, dry, error, uid)


@router.get("/destinations")
def destinations_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    return render(
        request, "destinations.html", who, "Destinations", dests=api.destinations(request, who)
    )


# -- accounts, audit trail, settings ---------------------------------------------------------


@router.get("/account")
def account_page(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    """The user's own account: role, password change (which ends every session)."""
    return render(
        request,
        "account.html",
        who,
        "Account",
        min_length=request.app.state.service.settings.web.password_min_length,
    )


@router.get("/users")
def users_page(request: Request, who: Principal = Depends(require_admin)) -> Response:
    """Users (add, disable, enable, unlock, reset password, role, delete) and API tokens
    (list, revoke)."""
    db = request.app.state.service.db
    return render(
        request,
        "users.html",
        who,
        "Users",
        users=[admin_api.user_dict(u) for u in users.list_users(db)],
        tokens=[admin_api.token_dict(t) for t in users.list_tokens(db)],
        roles=users.ROLES,
        min_length=request.app.state.service.settings.web.password_min_length,
    )


@router.get("/audit")
def audit_page(
    request: Request,
    query: audit.Query = Depends(admin_api.audit_query),
    who: Principal = Depends(require_admin),
) -> Response:
    """Search the audit trail (newest first, 100 a page) and export what was found."""
    items = audit.search(request.app.state.service.db, query, 100)
    filters = {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in query.__dict__.items()
        if v is not None and k not in ("before_id", "after_id")
    }
    return render(
        request,
        "audit.html",
        who,
        "Audit",
        items=items,
        filters=filters,
        actions=list(audit.Action),
        outcomes=list(audit.Outcome),
        export_query=urlencode(filters),
    )


@router.get("/settings")
def settings_page(request: Request, who: Principal = Depends(require_admin)) -> Response:
    """The settings in force (database password left out) and their digest."""
    node = request.app.state.service
    audit_record(request, who, audit.Action.SETTINGS_VIEWED, object_type="settings")
    return render(
        request,
        "settings.html",
        who,
        "Settings",
        settings=admin_api.settings_view(node.settings),
        digest=audit.settings_digest(node.settings),
    )
