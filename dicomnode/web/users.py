"""Users of the admin UI / REST API: names, roles, argon2 password hashes, API tokens.

The ``users`` table belongs to the store (:mod:`dicomnode.store.users`, created by the store's migration
``0002_users``, i.e. ``dicomnode db upgrade`` or any node start); this module checks names, passwords and
tokens and reads and writes the rows through the store's :class:`~dicomnode.store.users.UserRows`.

Roles: ``admin`` (change rules, resend, re-run, manage users), ``viewer`` (read only) and ``sender``
(may only store instances with STOW-RS: ``POST /dicomweb/studies``; for a PACS that authenticates).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dicomnode.errors import InputError
from dicomnode.store.users import UserRows, ensure_users_table, users_table

if TYPE_CHECKING:  # typing only: the web layer calls the store, never SQL
    from sqlalchemy import Engine

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
    """User accounts: names, roles and password/token checks over the store's ``users`` rows.

    Parameters
    ----------
    engine
        The store's engine (``store.engine``), migrated (the ``users`` table exists).
    hasher
        argon2 parameters (tests pass cheaper ones; the default is argon2-cffi's recommended profile).
    """

    def __init__(self, engine: Engine, hasher: PasswordHasher | None = None) -> None:
        self.engine = engine
        self.rows = UserRows(engine)
        self.hasher = hasher or PasswordHasher()

    def count(self) -> int:
        return self.rows.count()

    def list_users(self) -> list[tuple[User, datetime, bool]]:
        """Every user with its creation time and whether it has an API token."""
        return [
            (User(r["username"], r["role"]), r["created_at"], r["token_sha256"] is not None)
            for r in self.rows.all()
        ]

    def accounts(self) -> list[Account]:
        """Every account, disabled ones included, with its last log-in (newest ``login`` audit event)."""
        last = self.rows.last_logins()
        return [
            Account(
                username=r["username"],
                role=r["role"],
                enabled=not r["disabled"],
                created_at=r["created_at"],
                has_token=r["token_sha256"] is not None,
                last_login=last.get(r["username"]),
            )
            for r in self.rows.all()
        ]

    def exists(self, username: str) -> bool:
        """Whether an account called ``username`` exists (enabled or not)."""
        return self.rows.get(username) is not None

    def lookup(self, username: str) -> tuple[User, str] | None:
        """The enabled user called ``username`` and its stored password hash (None: unknown or disabled)."""
        r = self.rows.get(username)
        if r is None or r["disabled"]:
            return None
        return User(r["username"], r["role"]), str(r["password_hash"])

    def get(self, username: str) -> User | None:
        r = self.rows.get(username)
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
        self.rows.insert(name, role, self.hasher.hash(password))
        log.info("user %s created (role %s)", name, role)
        return User(name, role)

    def set_password(self, username: str, password: str) -> None:
        """Replace the password of ``username``; ``InputError`` for a weak password or an unknown user."""
        _check_password(password)
        if not self._write_hash(username, password):
            raise InputError(f"no user {username!r}")

    def _write_hash(self, username: str, password: str) -> bool:
        return self.rows.update(username, password_hash=self.hasher.hash(password))

    def set_role(self, username: str, role: Role) -> bool:
        """Give ``username`` another role; its sessions end at once (see ``dicomnode.web.auth.SessionCodec``).

        Returns
        -------
        bool
            Whether the role changed (False: it had that role already).

        Raises
        ------
        InputError
            There is no such user, or the role is unknown.
        """
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}")
        r = self.rows.get(username)
        if r is None:
            raise InputError(f"no user {username!r}")
        if r["role"] == role:
            return False
        self.rows.update(username, role=role)
        log.info("user %s now has the role %s", username, role)
        return True

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
        r = self.rows.get(username)
        if r is None:
            raise InputError(f"no user {username!r}")
        if r["disabled"] == (not enabled):
            return False
        self.rows.update(username, disabled=0 if enabled else 1)
        log.info("user %s %s", username, "enabled" if enabled else "disabled")
        return True

    def new_token(self, username: str) -> str:
        """Issue a new API (bearer) token for ``username`` (returned once; only its SHA-256 is kept)."""
        token = "dn_" + secrets.token_urlsafe(32)
        self.rows.update(username, token_sha256=hashlib.sha256(token.encode()).hexdigest())
        return token

    def verify_password(self, username: str, password: str) -> User | None:
        """The user when ``password`` is right, else None (same cost whether the user exists or not)."""
        r = self.rows.get(username)
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
        r = self.rows.by_token(hashlib.sha256(token.encode()).hexdigest())
        if r is None or r["disabled"]:
            return None
        return User(r["username"], r["role"])


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
    except InputError:
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
