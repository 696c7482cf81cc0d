"""Accounts, API tokens, the audit trail and the settings in force, under /api/ (admins);
and a user's own password (everyone logged in).

The Users page posts its forms here and is redirected back (``api.answer_action``), as
the other pages' actions are. Every change goes into the audit trail, refused ones too.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.engine import make_url

from db.models import utcnow
from dicom_node import audit
from dicom_node.web import users
from dicom_node.web.api import MAX_ID, answer_action, body_field
from dicom_node.web.auth import COOKIE, Principal, audit_record, require_admin, require_viewer
from kernel.settings import NodeSettings

router = APIRouter(prefix="/api", tags=["admin"])
Username = Annotated[str, Path(min_length=1, max_length=64)]
UserAction = Literal["disable", "enable", "delete", "unlock", "reset-password", "role"]
_USER_ACTIONS = {
    "disable": audit.Action.USER_DISABLED,
    "enable": audit.Action.USER_ENABLED,
    "delete": audit.Action.USER_DELETED,
    "unlock": audit.Action.USER_UNLOCKED,
    "reset-password": audit.Action.PASSWORD_RESET,
    "role": audit.Action.USER_ROLE_CHANGED,
}


def _min_length(request: Request) -> int:
    return request.app.state.service.settings.web.password_min_length


def _db(request: Request) -> Any:
    return request.app.state.service.db


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def user_dict(u: users.UserInfo) -> dict[str, Any]:
    return {
        "username": u.username,
        "role": u.role,
        "state": u.state,
        "created_at": _iso(u.created_at),
        "last_login_at": _iso(u.last_login_at),
        "locked_until": _iso(u.locked_until) if u.state == "locked" else None,
        "password_changed_at": _iso(u.password_changed_at),
        "sessions": u.sessions,
        "tokens": u.tokens,
    }


def token_dict(t: users.TokenInfo) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "user": t.username,
        "role": t.role,
        "created_by": t.created_by,
        "created_at": _iso(t.created_at),
        "last_used_at": _iso(t.last_used_at),
        "expires_at": _iso(t.expires_at),
        "expired": t.expired,
    }


# -- users ---------------------------------------------------------------------------------


@router.get("/users")
def list_users(request: Request, _: Principal = Depends(require_admin)) -> dict[str, Any]:
    """Every user with role, state (enabled, locked, disabled), last login, password age
    and how many sessions and tokens they have."""
    found = users.list_users(_db(request))
    return {"roles": list(users.ROLES), "users": [user_dict(u) for u in found]}


@router.post("/users")
async def add_user(request: Request, who: Principal = Depends(require_admin)) -> Response:
    """Create a user: ``username``, ``role``, ``password`` (JSON or form)."""
    username = await body_field(request, "username")
    role = await body_field(request, "role") or "viewer"
    password = await body_field(request, "password")
    try:
        users.add_user(_db(request), username, password, role, _min_length(request))
    except users.UserError as exc:
        _user_audit(request, who, audit.Action.USER_CREATED, username, str(exc), role=role)
        raise HTTPException(422, str(exc)) from None
    _user_audit(request, who, audit.Action.USER_CREATED, username, None, role=role)
    return await answer_action(
        request, {"ok": True, "message": f"user {username} ({role}) created"}, 201
    )


def _user_audit(
    request: Request,
    who: Principal,
    action: audit.Action,
    username: str,
    problem: str | None,
    **detail: Any,
) -> None:
    audit_record(
        request,
        who,
        action,
        outcome=audit.Outcome.FAILURE if problem else audit.Outcome.SUCCESS,
        object_type="user",
        object_id=username,
        detail={**detail, "problem": problem} if problem else detail or None,
    )


@router.post("/users/{username}/{action}")
async def user_action(
    request: Request,
    username: Username,
    action: UserAction,
    who: Principal = Depends(require_admin),
) -> Response:
    """disable | enable | delete | unlock | reset-password (``password``) | role
    (``role``). Disabling, deleting and resetting end the user's sessions at once; the
    last enabled admin cannot be disabled, deleted or demoted."""
    db = _db(request)
    detail: dict[str, Any] = {}
    try:
        if action == "disable":
            changed = users.set_disabled(db, username, True)
            message = f"user {username} " + ("disabled" if changed else "was already disabled")
        elif action == "enable":
            changed = users.set_disabled(db, username, False)
            message = f"user {username} " + ("enabled" if changed else "was already enabled")
        elif action == "delete":
            tokens = users.delete_user(db, username)
            message = f"user {username} deleted with {tokens} token(s)"
            detail["tokens_revoked"] = tokens
        elif action == "unlock":
            was = users.unlock(db, username)
            request.app.state.limiter.forget_user(username)
            message = f"user {username} " + ("unlocked" if was else "was not locked")
        elif action == "reset-password":
            ended = users.reset_password(
                db, username, await body_field(request, "password"), _min_length(request)
            )
            request.app.state.limiter.forget_user(username)
            message = f"password of {username} reset; {ended} session(s) ended"
            detail["sessions_ended"] = ended
        else:
            role = await body_field(request, "role")
            old = users.set_role(db, username, role)
            message = f"user {username} is now {role} (was {old})"
            detail.update(role=role, was=old)
    except users.NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    except users.UserError as exc:
        _user_audit(request, who, _USER_ACTIONS[action], username, str(exc))
        raise HTTPException(409 if "only enabled admin" in str(exc) else 422, str(exc)) from None
    _user_audit(request, who, _USER_ACTIONS[action], username, None, **detail)
    return await answer_action(request, {"ok": True, "message": message})


# -- tokens --------------------------------------------------------------------------------


@router.get("/tokens")
def list_tokens(
    request: Request,
    user: Annotated[str, Query(max_length=64)] = "",
    _: Principal = Depends(require_admin),
) -> dict[str, Any]:
    """Every API token (of ``user``): name, user, creator, created, last used, expiry;
    never the token itself."""
    return {"tokens": [token_dict(t) for t in users.list_tokens(_db(request), user or None)]}


@router.post("/tokens")
async def create_token(request: Request, who: Principal = Depends(require_admin)) -> Response:
    """A new token for ``user`` named ``name``, optionally expiring after
    ``expires_days``; the answer shows the token once (JSON only, never in a URL)."""
    user = await body_field(request, "user")
    name = await body_field(request, "name")
    days = await body_field(request, "expires_days")
    try:
        expires = None
        if days:
            if not days.isdigit() or not 1 <= int(days) <= 3650:
                raise users.UserError("expires_days must be a whole number of days, 1-3650")
            expires = utcnow() + timedelta(days=int(days))
        token = users.create_token(_db(request), user, name, who.username, expires)
    except users.UserError as exc:
        audit_record(
            request,
            who,
            audit.Action.TOKEN_CREATED,
            outcome=audit.Outcome.FAILURE,
            object_type="token",
            object_id=name,
            detail={"user": user, "problem": str(exc)},
        )
        raise HTTPException(422, str(exc)) from None
    created = users.list_tokens(_db(request), user)[-1]
    audit_record(
        request,
        who,
        audit.Action.TOKEN_CREATED,
        object_type="token",
        object_id=created.id,
        detail={"user": user, "name": name, "expires_at": _iso(expires)},
    )
    return JSONResponse({"token": token, **token_dict(created)}, 201)


@router.post("/tokens/{token_id}/revoke")
async def revoke_token(
    request: Request,
    token_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    who: Principal = Depends(require_admin),
) -> Response:
    """Delete a token: requests with it are refused from now on."""
    try:
        info = users.revoke_token(_db(request), token_id)
    except users.NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    audit_record(
        request,
        who,
        audit.Action.TOKEN_REVOKED,
        object_type="token",
        object_id=token_id,
        detail={"user": info.username, "name": info.name},
    )
    return await answer_action(
        request, {"ok": True, "message": f"token {info.name!r} of {info.username} revoked"}
    )


# -- the user's own password ---------------------------------------------------------------


@router.post("/account/password")
async def change_password(request: Request, who: Principal = Depends(require_viewer)) -> Response:
    """Change one's own password (``current_password``, ``new_password``). Every session
    of the user ends, this one too: a browser goes back to the login page."""
    current = await body_field(request, "current_password")
    new = await body_field(request, "new_password")
    try:
        ended = users.change_password(
            _db(request), who.username, current, new, _min_length(request)
        )
    except users.UserError as exc:
        _user_audit(request, who, audit.Action.PASSWORD_CHANGED, who.username, str(exc))
        raise HTTPException(422, str(exc)) from None
    _user_audit(
        request, who, audit.Action.PASSWORD_CHANGED, who.username, None, sessions_ended=ended
    )
    message = "password changed; log in again with the new one"
    if request.headers.get("content-type", "").startswith("application/json"):
        response: Response = JSONResponse({"ok": True, "message": message})
    else:  # the account page's form
        response = RedirectResponse(f"/login?msg={quote(message)}", 303)
    response.delete_cookie(COOKIE)
    return response


# -- audit trail ---------------------------------------------------------------------------


def audit_query(
    actor: Annotated[str, Query(max_length=128)] = "",
    action: Annotated[Literal["", *audit.Action], Query()] = "",  # type: ignore[valid-type]
    outcome: Annotated[Literal["", *audit.Outcome], Query()] = "",  # type: ignore[valid-type]
    study_uid: Annotated[str, Query(pattern=r"^[0-9.]{0,64}$")] = "",
    patient_id: Annotated[str, Query(max_length=64)] = "",
    source: Annotated[str, Query(max_length=128)] = "",
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> audit.Query:
    """The audit search filters of a request (times: ISO 8601; without a zone, UTC)."""

    def aware(value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    return audit.Query(
        actor=actor or None,
        action=action or None,
        outcome=outcome or None,
        study_uid=study_uid or None,
        patient_id=patient_id or None,
        source=source or None,
        since=aware(since),
        until=aware(until),
        before_id=before_id,
    )


@router.get("/audit")
def search_audit(
    request: Request,
    query: audit.Query = Depends(audit_query),
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    _: Principal = Depends(require_admin),
) -> dict[str, Any]:
    """Audit records matching every given filter, newest first (``before_id`` pages back)."""
    items = audit.search(_db(request), query, limit)
    return {"items": items, "limit": limit, "next_before_id": items[-1]["id"] if items else None}


@router.get("/audit/export", response_class=Response)
def export_audit(
    request: Request,
    query: audit.Query = Depends(audit_query),
    who: Principal = Depends(require_admin),
) -> Response:
    """Every matching record, oldest first, as JSON lines (``application/x-ndjson``); the
    export itself is recorded."""
    audit_record(
        request,
        who,
        audit.Action.AUDIT_EXPORTED,
        object_type="audit",
        detail={k: (str(v) if v is not None else None) for k, v in query.__dict__.items() if v},
    )
    lines: Iterator[str] = audit.export_lines(_db(request), query)
    return StreamingResponse(
        lines,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="audit.jsonl"'},
    )


# -- settings in force ---------------------------------------------------------------------


def settings_view(settings: NodeSettings) -> dict[str, Any]:
    """The settings in force as JSON, the database password left out."""
    data = settings.model_dump(mode="json")
    if settings.database_url:
        data["database_url"] = make_url(settings.database_url).render_as_string(hide_password=True)
    return data


@router.get("/settings")
def settings_in_force(request: Request, who: Principal = Depends(require_admin)) -> Any:
    """The node's settings in force (file and environment merged, defaults filled in)."""
    node = request.app.state.service
    audit_record(request, who, audit.Action.SETTINGS_VIEWED, object_type="settings")
    digest = audit.settings_digest(node.settings)
    return {"settings": settings_view(node.settings), "digest": digest}
