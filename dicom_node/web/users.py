"""Accounts: users (argon2 password hashes, lockout, disable), API tokens (SHA-256
hashes, creator, expiry) and browser sessions kept on the server.

The one writer of the ``users``, ``api_tokens`` and ``web_sessions`` tables; used by the
CLI (``dicom-node user ...``, ``token ...``) and the web app (login, Users page). There
is no default user: the first admin is created on the command line.

Roles (README "Security"): ``viewer`` sees everything but patient IDs and acts on
nothing; ``reviewer`` also approves or rejects held results; ``operator`` also acts on
jobs, sends, destinations and runs the path API, and sees patient IDs; ``admin`` may do
all of that and manages users, tokens and sees the settings and the audit trail. A
route declares the role it needs; ``may(role, needed)`` decides.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select

from db.models import ApiToken, User, WebSession, utcnow
from db.session import Database

ROLES = ("viewer", "reviewer", "operator", "admin")
# Which declared roles each user role satisfies: reviewer and operator are separate
# duties (approving a result is a clinical decision, resending one is operations).
GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"viewer"}),
    "reviewer": frozenset({"viewer", "reviewer"}),
    "operator": frozenset({"viewer", "operator"}),
    "admin": frozenset(ROLES),
}
# Roles that see patient IDs on pages and in the API (patient names: nobody).
SEES_PATIENT_IDS = frozenset({"operator", "admin"})
MAX_FAILED_LOGINS = 5
LOCK_S = 300.0
DEFAULT_MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # argon2 hashes anything; this bounds the work a request can ask for
_hasher = PasswordHasher()
# Verified against when the user does not exist, so timing does not reveal usernames.
_DUMMY_HASH = _hasher.hash("not a password")


def may(role: str | None, needed: str) -> bool:
    """Whether a user of ``role`` may use what needs ``needed`` (a role name)."""
    return role is not None and needed in GRANTS.get(role, frozenset())


def denial_message(username: str, role: str, needed: str) -> str:
    """The words of a role refusal, the same on every transport:
    ``user 'op' is an operator; only admin users can do this``."""
    allowed = " or ".join(r for r in ROLES if may(r, needed))
    article = "an" if role[:1].lower() in "aeiou" else "a"
    return f"user {username!r} is {article} {role}; only {allowed} users can do this"


class UserError(ValueError):
    """A user or token request that cannot be carried out (message is for the operator)."""


class NotFoundError(UserError):
    """The named user or token does not exist."""


# -- checks --------------------------------------------------------------------------------


def check_username(username: str) -> str:
    name = username.strip()
    if not name or len(name) > 64 or any(c.isspace() or not c.isprintable() for c in name):
        raise UserError("a username is 1-64 printable characters without spaces")
    return name


def check_password(password: str, min_length: int, username: str | None = None) -> None:
    """The password policy: at least ``min_length`` characters (``web.password_min_length``),
    at most 1024, not the username. Raises ``UserError`` saying which rule failed."""
    if len(password) < min_length:
        raise UserError(f"a password needs at least {min_length} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"a password has at most {MAX_PASSWORD} characters")
    if username is not None and password.strip().lower() == username.strip().lower():
        raise UserError("the password must not be the username")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")


def _user(s, username: str) -> User:
    user = s.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise NotFoundError(f"user {username!r} does not exist")
    return user


def _other_enabled_admins(s, user: User) -> int:
    return s.scalar(
        select(func.count(User.id)).where(
            User.role == "admin", User.disabled_at.is_(None), User.id != user.id
        )
    )


def _keep_an_admin(s, user: User, what: str) -> None:
    """Refuse to disable, delete or demote the last enabled admin (nobody could manage
    users on the web any more; the CLI can always add one)."""
    if user.role == "admin" and user.disabled_at is None and _other_enabled_admins(s, user) == 0:
        raise UserError(f"{user.username!r} is the only enabled admin; cannot {what} it")


# -- users ---------------------------------------------------------------------------------


def add_user(
    db: Database,
    username: str,
    password: str,
    role: str,
    min_length: int = DEFAULT_MIN_PASSWORD,
) -> None:
    """Create a user. Raises ``UserError`` for a bad name, role or password, or a name
    that exists."""
    _check_role(role)
    username = check_username(username)
    check_password(password, min_length, username)
    with db.session() as s:
        if s.scalars(select(User).where(User.username == username)).first():
            raise UserError(f"user {username!r} already exists")
        s.add(
            User(
                username=username,
                password_hash=_hasher.hash(password),
                role=role,
                password_changed_at=utcnow(),
            )
        )


@dataclass(frozen=True)
class UserInfo:
    username: str
    role: str
    created_at: datetime
    last_login_at: datetime | None
    disabled: bool
    locked_until: datetime | None
    password_changed_at: datetime | None
    sessions: int
    tokens: int

    @property
    def state(self) -> str:
        if self.disabled:
            return "disabled"
        if self.locked_until is not None and self.locked_until > utcnow():
            return "locked"
        return "enabled"


def list_users(db: Database) -> list[UserInfo]:
    """Every user, by name, with state, last login and counts of sessions and tokens."""
    now = utcnow()
    with db.session() as s:
        sessions = dict(
            s.execute(
                select(WebSession.user_id, func.count())
                .where(WebSession.expires_at > now)
                .group_by(WebSession.user_id)
            ).all()
        )
        tokens = dict(
            s.execute(select(ApiToken.user_id, func.count()).group_by(ApiToken.user_id)).all()
        )
        return [
            UserInfo(
                u.username,
                u.role,
                u.created_at,
                u.last_login_at,
                u.disabled_at is not None,
                u.locked_until,
                u.password_changed_at,
                sessions.get(u.id, 0),
                tokens.get(u.id, 0),
            )
            for u in s.scalars(select(User).order_by(User.username))
        ]


@dataclass(frozen=True)
class LoginOutcome:
    """What a login attempt came to: ``ok`` with the user, or the reason for the audit
    trail (the person at the login form only ever hears "wrong username or password")."""

    ok: bool
    username: str
    role: str | None = None
    reason: str | None = None  # unknown user, wrong password, locked, disabled


def login(db: Database, username: str, password: str) -> LoginOutcome:
    """Check a password. Wrong passwords count towards the lockout (``MAX_FAILED_LOGINS``
    in a row lock the account for ``LOCK_S``); the hash is verified in every case so the
    time taken does not tell whether the user exists, is locked or disabled."""
    now = utcnow()
    with db.session() as s:
        user = s.scalars(select(User).where(User.username == username)).first()
        if user is None or len(password) > MAX_PASSWORD:
            with contextlib.suppress(VerificationError):
                _hasher.verify(_DUMMY_HASH, password[:MAX_PASSWORD])
            why = "unknown user" if user is None else "password too long"
            return LoginOutcome(False, username, reason=why)
        try:
            _hasher.verify(user.password_hash, password)
            right = True
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            right = False
        if user.disabled_at is not None:
            return LoginOutcome(False, username, reason="disabled")
        if user.locked_until is not None and user.locked_until > now:
            return LoginOutcome(False, username, reason="locked")
        if not right:
            user.failed_logins += 1
            if user.failed_logins >= MAX_FAILED_LOGINS:
                user.locked_until = now + timedelta(seconds=LOCK_S)
                user.failed_logins = 0
                return LoginOutcome(False, username, reason="wrong password; account locked")
            return LoginOutcome(False, username, reason="wrong password")
        user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        return LoginOutcome(True, user.username, user.role)


def authenticate(db: Database, username: str, password: str) -> tuple[str, str] | None:
    """(username, role) when the password is right and the account enabled and unlocked."""
    outcome = login(db, username, password)
    return (outcome.username, outcome.role) if outcome.ok and outcome.role else None


def role_of(db: Database, username: str) -> str | None:
    """The current role of an enabled user, None for a disabled or unknown one."""
    with db.session() as s:
        return s.scalars(
            select(User.role).where(User.username == username, User.disabled_at.is_(None))
        ).first()


def unlocked_at(db: Database, username: str) -> datetime | None:
    """When an admin last lifted the user's lockout (or reset the password)."""
    with db.session() as s:
        return s.scalar(select(User.unlocked_at).where(User.username == username))


def _end_sessions(s, user: User) -> int:
    return s.execute(delete(WebSession).where(WebSession.user_id == user.id)).rowcount or 0


def set_disabled(db: Database, username: str, disabled: bool) -> bool:
    """Disable (no login, tokens refused, sessions ended at once) or enable a user.
    Returns whether anything changed. Raises ``NotFoundError``, or ``UserError`` for the
    last enabled admin."""
    with db.session() as s:
        user = _user(s, username)
        if disabled == (user.disabled_at is not None):
            return False
        if disabled:
            _keep_an_admin(s, user, "disable")
            user.disabled_at = utcnow()
            _end_sessions(s, user)
        else:
            user.disabled_at = None
        return True


def delete_user(db: Database, username: str) -> int:
    """Delete a user with their tokens and sessions; returns how many tokens went.
    Records naming the user (reviews, audit) keep the name. Raises ``NotFoundError``,
    or ``UserError`` for the last enabled admin."""
    with db.session() as s:
        user = _user(s, username)
        _keep_an_admin(s, user, "delete")
        _end_sessions(s, user)
        tokens = s.execute(delete(ApiToken).where(ApiToken.user_id == user.id)).rowcount or 0
        s.delete(user)
        return tokens


def set_role(db: Database, username: str, role: str) -> str:
    """Change a user's role (effective on their next request); returns the old role."""
    _check_role(role)
    with db.session() as s:
        user = _user(s, username)
        if user.role == "admin" and role != "admin":
            _keep_an_admin(s, user, "demote")
        old, user.role = user.role, role
        return old


def unlock(db: Database, username: str) -> bool:
    """Lift a lockout and forget the failed attempts; returns whether it was locked."""
    now = utcnow()
    with db.session() as s:
        user = _user(s, username)
        was = user.locked_until is not None and user.locked_until > now
        user.failed_logins, user.locked_until, user.unlocked_at = 0, None, now
        return was


def reset_password(
    db: Database, username: str, password: str, min_length: int = DEFAULT_MIN_PASSWORD
) -> int:
    """An admin sets a new password: the lockout is lifted and every session of the user
    ends. Returns how many sessions ended."""
    with db.session() as s:
        user = _user(s, username)
        check_password(password, min_length, username)
        now = utcnow()
        user.password_hash = _hasher.hash(password)
        user.password_changed_at = now
        user.failed_logins, user.locked_until, user.unlocked_at = 0, None, now
        return _end_sessions(s, user)


def change_password(
    db: Database, username: str, current: str, new: str, min_length: int = DEFAULT_MIN_PASSWORD
) -> int:
    """A user changes their own password, giving the current one; every session of the
    user (this one too) ends. Raises ``UserError`` for a wrong current password or a new
    one the policy refuses. Returns how many sessions ended."""
    with db.session() as s:
        user = _user(s, username)
        try:
            _hasher.verify(user.password_hash, current[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise UserError("the current password is wrong") from None
        check_password(new, min_length, username)
        if new == current:
            raise UserError("the new password is the current one")
        user.password_hash = _hasher.hash(new)
        user.password_changed_at = utcnow()
        return _end_sessions(s, user)


# -- API tokens ----------------------------------------------------------------------------


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    db: Database,
    username: str,
    name: str,
    created_by: str | None = None,
    expires_at: datetime | None = None,
) -> str:
    """A new API token for the user; returned once, only its hash is kept. Raises
    ``UserError`` for an unknown or disabled user, an empty or long name, or an expiry in
    the past."""
    name = name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise UserError("a token name is 1-64 printable characters")
    if expires_at is not None and expires_at <= utcnow():
        raise UserError("the expiry must be in the future")
    token = "dn_" + secrets.token_urlsafe(32)
    with db.session() as s:
        user = s.scalars(select(User).where(User.username == username)).first()
        if user is None:
            raise UserError(f"user {username!r} does not exist; create it with `user add`")
        if user.disabled_at is not None:
            raise UserError(f"user {username!r} is disabled")
        s.add(
            ApiToken(
                token_hash=_token_hash(token),
                user_id=user.id,
                name=name,
                created_by=created_by,
                expires_at=expires_at,
            )
        )
    return token


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    username: str
    role: str
    created_by: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= utcnow()


def _token_info(row: ApiToken) -> TokenInfo:
    return TokenInfo(
        row.id,
        row.name,
        row.user.username,
        row.user.role,
        row.created_by,
        row.created_at,
        row.last_used_at,
        row.expires_at,
    )


def list_tokens(db: Database, username: str | None = None) -> list[TokenInfo]:
    """Every token (of ``username``), oldest first; never the token itself."""
    with db.session() as s:
        query = select(ApiToken).join(User).order_by(ApiToken.id)
        if username:
            query = query.where(User.username == username)
        return [_token_info(t) for t in s.scalars(query)]


def revoke_token(db: Database, token_id: int) -> TokenInfo:
    """Delete a token: it stops working at once. Raises ``NotFoundError``."""
    with db.session() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise NotFoundError(f"token {token_id} does not exist")
        info = _token_info(row)
        s.delete(row)
        return info


@dataclass(frozen=True)
class TokenIdentity:
    username: str
    role: str
    token_id: int
    token_name: str


def token_identity(db: Database, token: str) -> TokenIdentity | None:
    """Who a bearer token acts as; None for an unknown, expired or revoked token or a
    disabled user. Notes the last use (at most one write a minute per token)."""
    if not token or len(token) > 200:
        return None
    with db.session() as s:
        row = s.scalars(select(ApiToken).where(ApiToken.token_hash == _token_hash(token))).first()
        now = utcnow()
        if row is None or row.user.disabled_at is not None:
            return None
        if row.expires_at is not None and row.expires_at <= now:
            return None
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now
        return TokenIdentity(row.user.username, row.user.role, row.id, row.name)


def token_user(db: Database, token: str) -> tuple[str, str] | None:
    """(username, role) of a valid bearer token."""
    found = token_identity(db, token)
    return (found.username, found.role) if found else None


# -- browser sessions ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionIdentity:
    username: str
    role: str
    csrf: str
    session_id: int


def create_session(
    db: Database, username: str, max_age_s: float, client_address: str | None
) -> tuple[str, str]:
    """A new session after a successful login: (cookie value, CSRF token). The cookie
    value is random and returned once; the database keeps its SHA-256. Ended sessions
    of everybody are cleared out here."""
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    now = utcnow()
    with db.session() as s:
        user = _user(s, username)
        s.execute(delete(WebSession).where(WebSession.expires_at <= now))
        s.add(
            WebSession(
                token_hash=_token_hash(cookie),
                user_id=user.id,
                csrf=csrf,
                created_at=now,
                last_seen_at=now,
                expires_at=now + timedelta(seconds=max_age_s),
                client_address=(client_address or "")[:64] or None,
            )
        )
    return cookie, csrf


def session_identity(
    db: Database, cookie: str | None, idle_s: float, activity: bool = True
) -> SessionIdentity | None:
    """The user of a session cookie; None when it is unknown, ended, past its lifetime,
    idle longer than ``idle_s`` (then it is deleted) or its user disabled.
    ``activity``: this request counts as the user's (a page refreshing itself does not);
    the last activity is written at most every ``min(30, idle_s / 10)`` seconds."""
    if not cookie or len(cookie) > 200:
        return None
    now = utcnow()
    with db.session() as s:
        row = s.scalars(
            select(WebSession).where(WebSession.token_hash == _token_hash(cookie))
        ).first()
        if row is None:
            return None
        if row.expires_at <= now or (now - row.last_seen_at).total_seconds() > idle_s:
            s.delete(row)
            return None
        user = s.get(User, row.user_id)
        if user is None or user.disabled_at is not None:
            return None
        if activity and (now - row.last_seen_at).total_seconds() > min(30.0, idle_s / 10):
            row.last_seen_at = now
        return SessionIdentity(user.username, user.role, row.csrf, row.id)


def end_session(db: Database, cookie: str | None) -> bool:
    """Log out: delete the session, so its cookie is worthless from now on."""
    if not cookie:
        return False
    with db.session() as s:
        gone = s.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(cookie)))
        return bool(gone.rowcount)
