"""Who is asking and what they may do: sessions, API tokens, CSRF, roles, login limits.

A browser session is a row in ``web_sessions`` (``users.create_session``); its cookie
holds a random id and nothing else, so logout, a password change, disabling or deleting
the user end it on the server at once. It ends by itself ``web.session_max_age_s`` after
the login and after ``web.session_idle_s`` without activity (a page refreshing itself,
``X-Partial``, is no activity). Browsers must send the session's CSRF token (form field
``csrf_token`` or header ``X-CSRF-Token``) on every state-changing request; bearer-token
API calls carry no cookie and are exempt.

Every route declares the role it needs with one dependency, ``require_viewer``,
``require_reviewer``, ``require_operator`` or ``require_admin``, all made by
``_require`` (which also checks the CSRF token of every non-GET request); ``users.may``
decides. ``route_roles`` reads
the declarations back (the README's role table and its test), and ``check_routes``
refuses an app with a route that declares none and is not open by design.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute
from starlette.routing import Mount

from dicom_node import audit
from dicom_node.web import users

COOKIE = "dicom_node_session"
# Open by design (no patient data): the login form, health, readiness, metrics, static.
OPEN_ROUTES = {
    ("GET", "/login"),
    ("POST", "/login"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}


@dataclass(frozen=True)
class Principal:
    """A logged-in user (``via`` "session") or an API token's user (``via`` "token")."""

    username: str
    role: str
    csrf: str | None  # None for bearer tokens
    via: str = "session"
    token_name: str | None = None
    token_id: int | None = None

    def may(self, needed: str) -> bool:
        """Whether this user may use what needs the role ``needed``."""
        return users.may(self.role, needed)

    @property
    def is_admin(self) -> bool:
        return self.may("admin")

    @property
    def can_review(self) -> bool:
        return self.may("reviewer")

    @property
    def can_operate(self) -> bool:
        return self.may("operator")

    @property
    def sees_patient_ids(self) -> bool:
        return self.role in users.SEES_PATIENT_IDS


class LoginRequired(Exception):
    """Raised for pages: the handler redirects to the login form."""


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def actor(request: Request, who: Principal | None) -> audit.Actor:
    """The audit trail's actor for a request: the user (by session or token) and the
    client's address; "anonymous" before a login."""
    if who is None:
        return audit.Actor("anonymous", "anonymous", client_address(request))
    return audit.Actor(who.username, who.via, client_address(request))


def token_detail(who: Principal) -> dict[str, Any] | None:
    """The token a request came with, for audit details (None for sessions)."""
    return {"token": who.token_name, "token_id": who.token_id} if who.via == "token" else None


def audit_record(
    request: Request,
    who: Principal | None,
    action: audit.Action,
    *,
    detail: dict[str, Any] | None = None,
    **fields: Any,
) -> None:
    """``audit.record`` for a web request: the actor from ``who`` and the client address,
    the token named in the detail, patient names as ``log_patient_names`` says."""
    node = request.app.state.service
    extra = token_detail(who) if who is not None else None
    audit.record(
        node.db,
        action,
        actor(request, who),
        detail={**(detail or {}), **(extra or {})} or None,
        patient_names=node.settings.log_patient_names,
        **fields,
    )


class LoginLimiter:
    """At most ``per_user`` attempts per username and ``per_ip`` per client in a window.

    ``allow(..., user_reset_at)`` forgets a user's attempts before that wall-clock time
    (an admin unlocked the account or reset its password, perhaps from the CLI)."""

    def __init__(self, per_user: int = 5, per_ip: int = 20, window_s: float = 300.0) -> None:
        self.limits = {"user": per_user, "ip": per_ip}
        self.window_s = window_s
        self._hits: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, username: str, ip: str, user_reset_at: float | None = None) -> bool:
        now = time.time()
        with self._lock:
            keys = [("user", username.lower()), ("ip", ip)]
            for key in keys:
                hits = self._hits[key]
                oldest = now - self.window_s
                if key[0] == "user" and user_reset_at is not None:
                    oldest = max(oldest, user_reset_at)
                while hits and hits[0] < oldest:
                    hits.popleft()
                if len(hits) >= self.limits[key[0]]:
                    return False
            for key in keys:
                self._hits[key].append(now)
            return True

    def forget_user(self, username: str) -> None:
        with self._lock:
            self._hits.pop(("user", username.lower()), None)


def principal(request: Request) -> Principal | None:
    """Who is asking: a bearer token or a logged-in session; None when nobody (or the
    token is expired or revoked, the session ended, the user disabled or deleted)."""
    node = request.app.state.service
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        found = users.token_identity(node.db, header[7:].strip())
        if found is None:
            return None
        return Principal(
            found.username, found.role, None, "token", found.token_name, found.token_id
        )
    found = users.session_identity(
        node.db,
        request.cookies.get(COOKIE),
        node.settings.web.session_idle_s,
        activity=request.headers.get("x-partial") != "1",
    )
    return Principal(found.username, found.role, found.csrf) if found else None


def html_page(request: Request) -> None:
    """Router dependency of the HTML pages: without a login they redirect to the login
    page; every other route (the JSON API, the seed service's path API) answers 401."""
    request.state.html_page = True


def _is_page(request: Request) -> bool:
    return getattr(request.state, "html_page", False)


def _logged_in(request: Request) -> Principal:
    who = principal(request)
    if who is None:
        if _is_page(request):
            raise LoginRequired()
        raise HTTPException(401, "login or a bearer token required")
    request.state.principal = who
    return who


async def check_csrf(request: Request, who: Principal) -> None:
    if who.csrf is None:  # bearer token: no ambient cookie, no CSRF
        return
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get("csrf_token")
    if not sent or not secrets.compare_digest(str(sent), who.csrf):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")


def _deny(request: Request, who: Principal, needed: str) -> HTTPException:
    audit_record(
        request,
        who,
        audit.Action.REQUEST_DENIED,
        outcome=audit.Outcome.DENIED,
        object_type="route",
        object_id=f"{request.method} {request.url.path}",
        detail={"role": who.role, "needs": needed},
    )
    return HTTPException(403, users.denial_message(who.username, who.role, needed))


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


async def _require(request: Request, role: str) -> Principal:
    """A logged-in user who may use what needs ``role``, with a valid CSRF token for
    sessions on every state-changing (non-GET) request."""
    who = _logged_in(request)
    if request.method not in SAFE_METHODS:
        await check_csrf(request, who)
    if not who.may(role):
        raise _deny(request, who, role)
    return who


def _declares(role: str):  # noqa: ANN202 - a FastAPI dependency
    async def dependency(request: Request) -> Principal:
        return await _require(request, role)

    dependency.role = role  # type: ignore[attr-defined]  # read by route_roles
    dependency.__name__ = f"require_{role}"
    dependency.__qualname__ = dependency.__name__
    return dependency


require_viewer = _declares("viewer")
require_reviewer = _declares("reviewer")
require_operator = _declares("operator")
require_admin = _declares("admin")
# A viewer's POST (logout, dry run, own password): the same check; the name says why.
require_csrf = require_viewer


def _declared_role(dependant: Any) -> str | None:
    stack = list(dependant.dependencies)
    while stack:
        dep = stack.pop()
        role = getattr(dep.call, "role", None)
        if role is not None:
            return role
        stack.extend(dep.dependencies)
    return None


def _routes(app: FastAPI) -> list[Any]:
    """Every route as served, with the prefixes and dependencies of the routers it was
    included through (FastAPI keeps included routers as branches since 0.13x)."""
    contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    return list(contexts(app.routes)) if contexts is not None else list(app.routes)


def route_roles(app: FastAPI) -> dict[tuple[str, str], str | None]:
    """(method, path) -> the role each API and page route declares (None: open)."""
    table: dict[tuple[str, str], str | None] = {}
    for route in _routes(app):
        if isinstance(getattr(route, "original_route", route), APIRoute):
            for method in sorted(set(route.methods) - {"HEAD"}):
                table[(method, route.path)] = _declared_role(route.dependant)
    return table


def check_routes(app: FastAPI) -> None:
    """Refuse (``RuntimeError``) an app with a route that declares no role and is not in
    ``OPEN_ROUTES``: nothing gets served by accident without a login."""
    missing = [
        f"{method} {path}"
        for (method, path), role in route_roles(app).items()
        if role is None and (method, path) not in OPEN_ROUTES
    ]
    missing += [
        repr(r)
        for r in _routes(app)
        if not isinstance(getattr(r, "original_route", r), APIRoute | Mount)
    ]
    if missing:
        raise RuntimeError(f"routes without a declared role: {', '.join(missing)}")
