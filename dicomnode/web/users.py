"""Users of the admin UI / REST API: names, roles, argon2 password hashes, API tokens.

The ``users`` table belongs to the store (:class:`dicomnode.store.models.UserRow`, created by the store's
migration ``0002_users``, i.e. ``dicomnode db upgrade`` or any node start); this module only reads and
writes its rows.

Roles: ``admin`` (change rules, resend, re-run, manage users), ``viewer`` (read only) and ``sender``
(may only store instances with STOW-RS: ``POST /dicomweb/studies``; for a PACS that authenticates).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, Table, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.errors import ConfigError, InputError
from dicomnode.store.models import AuditRow, UserRow

log = logging.getLogger(__name__)

__all__ = [
    "ROLES",
    "Account",
    "Role",
    "User",
    "UserStore",
    "bootstrap_admin",
    "ensure_users_table",
    "users_table",
]

Role = Literal["admin", "viewer", "sender"]
ROLES: tuple[Role, ...] = ("admin", "viewer", "sender")

#: name, role, argon2 hash of the password, sha256 of the API token (None = no token): the store's table.
users_table: Table = UserRow.__table__  # type: ignore[assignment]

_USERNAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


@dataclass(frozen=True)
class User:
    """An authenticated user (what request handlers see)."""

    username: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_sender(self) -> bool:
        """Only allowed to store instances (STOW-RS); every other path answers 403."""
        return self.role == "sender"


@dataclass(frozen=True)
class Account:
    """A user account as an administrator sees it (``dicomnode user list``)."""

    username: str
    role: str
    enabled: bool
    created_at: datetime
    has_token: bool
    #: Last log-in through the login form (from the audit log); None = never.
    last_login: datetime | None


def ensure_users_table(engine: Engine) -> None:
    """Check that the store's migrations created ``users`` (they do: ``0002_users``); creates nothing.

    Raises
    ------
    ConfigError
        The database was not migrated (run ``dicomnode db upgrade``).
    """
    if not inspect(engine).has_table("users"):
        raise ConfigError("database: no users table; run 'dicomnode db upgrade' first")


def _check_password(password: str) -> None:
    if not password.strip():
        raise InputError("password must not be empty")
    if len(password) < 8:
        raise InputError("password must have at least 8 characters")


def _check_username(username: str) -> str:
    name = username.strip()
    if not (1 <= len(name) <= 64) or not set(name) <= _USERNAME_CHARS:
        raise InputError("user name must be 1-64 characters of letters, digits, '.', '_', '-', '@'")
    return name


class UserStore:
    """User accounts on the node's database engine.

    Parameters
    ----------
    engine
        The store's engine (``store.engine``), migrated (the ``users`` table exists).
    hasher
        argon2 parameters (tests pass cheaper ones; the default is argon2-cffi's recommended profile).
    """

    def __init__(self, engine: Engine, hasher: PasswordHasher | None = None) -> None:
        self.engine = engine
        self.hasher = hasher or PasswordHasher()

    def count(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(users_table.c.id)).all())

    def list_users(self) -> list[tuple[User, datetime, bool]]:
        """Every user with its creation time and whether it has an API token."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(users_table).order_by(users_table.c.username)).mappings().all()
        return [
            (
                User(r["username"], r["role"]),
                _aware(r["created_at"]),
                r["token_sha256"] is not None,
            )
            for r in rows
        ]

    def accounts(self) -> list[Account]:
        """Every account, disabled ones included, with its last log-in (newest ``login`` audit event)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(users_table).order_by(users_table.c.username)).mappings().all()
            # The login form audits each session log-in as action "login" by the user: no extra column.
            last = dict(
                conn.execute(
                    select(AuditRow.actor, func.max(AuditRow.at))
                    .where(AuditRow.action == "login")
                    .group_by(AuditRow.actor)
                ).all()
            )
        return [
            Account(
                username=r["username"],
                role=r["role"],
                enabled=not r["disabled"],
                created_at=_aware(r["created_at"]),
                has_token=r["token_sha256"] is not None,
                last_login=_aware(last[r["username"]]) if last.get(r["username"]) else None,
            )
            for r in rows
        ]

    def exists(self, username: str) -> bool:
        """Whether an account called ``username`` exists (enabled or not)."""
        with self.engine.connect() as conn:
            found = conn.execute(select(users_table.c.id).where(users_table.c.username == username)).first()
        return found is not None

    def lookup(self, username: str) -> tuple[User, str] | None:
        """The enabled user called ``username`` and its stored password hash (None: unknown or disabled)."""
        with self.engine.connect() as conn:
            r = conn.execute(select(users_table).where(users_table.c.username == username)).mappings().first()
        if r is None or r["disabled"]:
            return None
        return User(r["username"], r["role"]), str(r["password_hash"])

    def get(self, username: str) -> User | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(users_table).where(users_table.c.username == username)).mappings().first()
        if r is None or r["disabled"]:
            return None
        return User(r["username"], r["role"])

    def create(self, username: str, password: str, role: Role) -> User:
        """Add a user; ``InputError`` for a bad name, a short password, an unknown role or a duplicate."""
        name = _check_username(username)
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}")
        _check_password(password)
        if self.exists(name):  # disabled accounts too: their name stays taken (audit trail)
            raise InputError(f"user {name!r} exists already")
        with self.engine.begin() as conn:
            conn.execute(
                insert(users_table).values(
                    username=name,
                    role=role,
                    password_hash=self.hasher.hash(password),
                    created_at=datetime.now(UTC),
                    disabled=0,
                )
            )
        log.info("user %s created (role %s)", name, role)
        return User(name, role)

    def set_password(self, username: str, password: str) -> None:
        """Replace the password of ``username``; ``InputError`` for a weak password or an unknown user."""
        _check_password(password)
        if not self._write_hash(username, password):
            raise InputError(f"no user {username!r}")

    def _write_hash(self, username: str, password: str) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(users_table)
                .where(users_table.c.username == username)
                .values(password_hash=self.hasher.hash(password))
            )
        return bool(result.rowcount)

    def set_enabled(self, username: str, enabled: bool) -> bool:
        """Enable or disable ``username`` (a disabled account cannot log in; its sessions end at once).

        Returns
        -------
        bool
            Whether the state changed (False: it was already so).

        Raises
        ------
        InputError
            There is no such user.
        """
        with self.engine.begin() as conn:
            r = conn.execute(select(users_table.c.disabled).where(users_table.c.username == username)).first()
            if r is None:
                raise InputError(f"no user {username!r}")
            if bool(r[0]) == (not enabled):
                return False
            conn.execute(
                update(users_table)
                .where(users_table.c.username == username)
                .values(disabled=0 if enabled else 1)
            )
        log.info("user %s %s", username, "enabled" if enabled else "disabled")
        return True

    def new_token(self, username: str) -> str:
        """Issue a new API (bearer) token for ``username`` (returned once; only its SHA-256 is kept)."""
        token = "dn_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                update(users_table)
                .where(users_table.c.username == username)
                .values(token_sha256=hashlib.sha256(token.encode()).hexdigest())
            )
        return token

    def verify_password(self, username: str, password: str) -> User | None:
        """The user when ``password`` is right, else None (same cost whether the user exists or not)."""
        with self.engine.connect() as conn:
            r = conn.execute(select(users_table).where(users_table.c.username == username)).mappings().first()
        stored = r["password_hash"] if r is not None else _DUMMY_HASH.get(self.hasher)
        try:
            self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if r is None or r["disabled"]:
            return None
        if self.hasher.check_needs_rehash(stored):
            self._write_hash(username, password)  # the same password, new parameters: no policy check
        return User(r["username"], r["role"])

    def verify_token(self, token: str) -> User | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.engine.connect() as conn:
            r = (
                conn.execute(select(users_table).where(users_table.c.token_sha256 == digest))
                .mappings()
                .first()
            )
        if r is None or r["disabled"]:
            return None
        return User(r["username"], r["role"])


def _aware(value: datetime) -> datetime:
    # The store's column type returns aware UTC; a naive value can only be UTC too.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class _DummyHash:
    """A hash to verify against for unknown users, so timing does not reveal which names exist."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def get(self, hasher: PasswordHasher) -> str:
        key = id(hasher)
        if key not in self._cache:
            self._cache[key] = hasher.hash(secrets.token_hex(16))
        return self._cache[key]


_DUMMY_HASH = _DummyHash()


def bootstrap_admin(users: UserStore, environ: Mapping[str, str], *, print_fn: object = None) -> str | None:
    """Make sure an admin exists: the first start creates ``admin``.

    Its password is ``DICOMNODE_ADMIN_PASSWORD`` from ``environ`` (read now, at app start), or a generated
    one that is printed once (to stderr via ``print_fn``, never logged).

    Returns
    -------
    str or None
        The generated password when one was generated, else None.
    """
    if users.count() > 0:
        return None
    given = environ.get("DICOMNODE_ADMIN_PASSWORD", "")
    password = given or secrets.token_urlsafe(12)
    try:
        users.create("admin", password, "admin")
    except (IntegrityError, InputError):
        return None  # another process of the node created it at the same moment
    if given:
        log.info("admin user created with the password from DICOMNODE_ADMIN_PASSWORD")
        return None
    import sys

    out = print_fn if callable(print_fn) else (lambda text: print(text, file=sys.stderr, flush=True))
    out(
        "dicomnode: created user 'admin' with the generated password "
        f"{password}  (shown once; change it on the Users page or set DICOMNODE_ADMIN_PASSWORD)"
    )
    return password
