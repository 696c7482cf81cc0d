"""Sessions, CSRF, API tokens, roles and login rate limiting for the web app.

A session is a signed cookie holding the username and a per-session CSRF token; the role
is looked up on every request so that demoting or deleting a user takes effect at once.
Browsers must send the CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``)
on every state-changing request; bearer-token API calls carry no cookie and are exempt.

Roles are levels (``users.ROLES``: viewer < reviewer < admin); every route depends on one
``require_<role>`` dependency, all made by ``_require``, so who may do what is decided
in this one place.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from dicom_node.web import users

COOKIE = "dicom_node_session"
SESSION_MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    csrf: str | None  # None for bearer tokens

    @property
    def level(self) -> int:
        return users.ROLE_LEVELS.get(self.role, -1)

    def at_least(self, role: str) -> bool:
        """Whether this user's role is ``role`` or a more trusted one."""
        return self.level >= users.ROLE_LEVELS[role]

    @property
    def is_admin(self) -> bool:
        return self.at_least("admin")

    @property
    def can_review(self) -> bool:
        return self.at_least("reviewer")


class LoginRequired(Exception):
    """Raised for pages: the handler redirects to the login form."""


def load_secret(data_dir: Path) -> bytes:
    """The cookie-signing key in data_dir/web_secret, created 0600 on first start."""
    path = Path(data_dir) / "web_secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class SessionCodec:
    def __init__(self, secret: bytes) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="dicom-node-session")

    def dumps(self, data: dict[str, Any]) -> str:
        return self._s.dumps(data)

    def loads(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie:
            return None
        try:
            return self._s.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            return None


class LoginLimiter:
    """At most ``per_user`` attempts per username and ``per_ip`` per client in a window."""

    def __init__(self, per_user: int = 5, per_ip: int = 20, window_s: float = 300.0) -> None:
        self.limits = {"user": per_user, "ip": per_ip}
        self.window_s = window_s
        self._hits: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, username: str, ip: str) -> bool:
        now = time.monotonic()
        with self._lock:
            keys = [("user", username.lower()), ("ip", ip)]
            for key in keys:
                hits = self._hits[key]
                while hits and now - hits[0] > self.window_s:
                    hits.popleft()
                if len(hits) >= self.limits[key[0]]:
                    return False
            for key in keys:
                self._hits[key].append(now)
            return True

    def forget_user(self, username: str) -> None:
        with self._lock:
            self._hits.pop(("user", username.lower()), None)


def _session(request: Request) -> dict[str, Any] | None:
    return request.app.state.sessions.loads(request.cookies.get(COOKIE))


def principal(request: Request) -> Principal | None:
    """Who is asking: a bearer token or a logged-in session; None when nobody."""
    db = request.app.state.service.db
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        found = users.token_user(db, header[7:].strip())
        return Principal(found[0], found[1], None) if found else None
    data = _session(request)
    if not data or "u" not in data:
        return None
    role = users.role_of(db, data["u"])
    return Principal(data["u"], role, data.get("csrf")) if role else None


def html_page(request: Request) -> None:
    """Router dependency of the HTML pages: without a login they redirect to the login
    page; every other route (the JSON API, the seed service's path API) answers 401."""
    request.state.html_page = True


def _is_page(request: Request) -> bool:
    return getattr(request.state, "html_page", False)


def require_viewer(request: Request) -> Principal:
    """Dependency of every page and API route: someone must be logged in."""
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


async def _require(request: Request, role: str) -> Principal:
    """A logged-in user of at least ``role``, with a valid CSRF token for sessions."""
    who = require_viewer(request)
    await check_csrf(request, who)
    if not who.at_least(role):
        allowed = " or ".join(
            r for r in users.ROLES if users.ROLE_LEVELS[r] >= users.ROLE_LEVELS[role]
        )
        raise HTTPException(
            403, f"user {who.username!r} is a {who.role}; only {allowed} users can do this"
        )
    return who


async def require_reviewer(request: Request) -> Principal:
    """Dependency of the review actions (approve, reject): a reviewer or an admin."""
    return await _require(request, "reviewer")


async def require_admin(request: Request) -> Principal:
    """Dependency of every other action: an admin, with a valid CSRF token for sessions."""
    return await _require(request, "admin")


async def require_csrf(request: Request) -> Principal:
    """Dependency of state-changing requests any logged-in user may make (logout)."""
    who = require_viewer(request)
    await check_csrf(request, who)
    return who
