"""Users and API tokens: argon2 password hashes, SHA-256 token hashes, lockout.

Used by the CLI (``dicom-node user add``) and by the web login. There is no default
user: the first admin is created on the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select

from db.models import ApiToken, User, utcnow
from db.session import Database

# Roles from least to most trusted; each may do what the ones before it may:
# viewer: sees everything but patient IDs, acts on nothing;
# reviewer: also approves or rejects results held for review (``review: required``);
# admin: also acts on jobs, sends and destinations, and sees patient IDs.
ROLES = ("viewer", "reviewer", "admin")
ROLE_LEVELS = {role: level for level, role in enumerate(ROLES)}
MAX_FAILED_LOGINS = 5
LOCK_S = 300.0
_hasher = PasswordHasher()
# Verified against when the user does not exist, so timing does not reveal usernames.
_DUMMY_HASH = _hasher.hash("not a password")


class UserError(ValueError):
    """A user or token request that cannot be carried out (message is for the operator)."""


def add_user(db: Database, username: str, password: str, role: str) -> None:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise UserError("password must have at least 8 characters")
    with db.session() as s:
        if s.scalars(select(User).where(User.username == username)).first():
            raise UserError(f"user {username!r} already exists")
        s.add(User(username=username, password_hash=_hasher.hash(password), role=role))


def list_users(db: Database) -> list[tuple[str, str, str]]:
    """(username, role, last login) rows for ``dicom-node user list``."""
    with db.session() as s:
        return [
            (u.username, u.role, u.last_login_at.isoformat() if u.last_login_at else "never")
            for u in s.scalars(select(User).order_by(User.username))
        ]


def authenticate(db: Database, username: str, password: str) -> tuple[str, str] | None:
    """(username, role) when the password is right and the account not locked."""
    now = utcnow()
    with db.session() as s:
        user = s.scalars(select(User).where(User.username == username)).first()
        if user is None:
            with contextlib.suppress(VerificationError):
                _hasher.verify(_DUMMY_HASH, password)
            return None
        if user.locked_until is not None and user.locked_until > now:
            return None
        try:
            _hasher.verify(user.password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            user.failed_logins += 1
            if user.failed_logins >= MAX_FAILED_LOGINS:
                user.locked_until = now + timedelta(seconds=LOCK_S)
                user.failed_logins = 0
            return None
        user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        return user.username, user.role


def role_of(db: Database, username: str) -> str | None:
    """The current role (a session outlives role changes and deletions otherwise)."""
    with db.session() as s:
        return s.scalars(select(User.role).where(User.username == username)).first()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Database, username: str, name: str) -> str:
    """A new API token for the user; returned once, only its hash is kept."""
    token = "dn_" + secrets.token_urlsafe(32)
    with db.session() as s:
        user = s.scalars(select(User).where(User.username == username)).first()
        if user is None:
            raise UserError(f"user {username!r} does not exist; create it with `user add`")
        s.add(ApiToken(token_hash=_token_hash(token), user_id=user.id, name=name))
    return token


def token_user(db: Database, token: str) -> tuple[str, str] | None:
    """(username, role) of a valid bearer token."""
    with db.session() as s:
        row = s.scalars(select(ApiToken).where(ApiToken.token_hash == _token_hash(token))).first()
        if row is None:
            return None
        now = utcnow()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now  # at most one write a minute per token
        return row.user.username, row.user.role
