"""The rows of the admin UI's users (``users`` table, migration ``0002_users``): the store's side of accounts.

Passwords, roles and tokens are checked and hashed by :class:`dicomnode.web.users.UserStore`; this module
only reads and writes rows (name, role, argon2 hash, SHA-256 of the API token, disabled flag).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.errors import ConfigError, InputError
from dicomnode.store.models import AuditRow, UserRow

__all__ = ["UserRows", "ensure_users_table", "users_table"]

#: name, role, argon2 hash of the password, sha256 of the API token (None = no token): the store's table.
users_table: Table = UserRow.__table__  # type: ignore[assignment]


def ensure_users_table(engine: Engine) -> None:
    """Check that the store's migrations created ``users`` (they do: ``0002_users``); creates nothing.

    Raises
    ------
    ConfigError
        The database was not migrated (run ``dicomnode db upgrade``).
    """
    if not inspect(engine).has_table("users"):
        raise ConfigError("database: no users table; run 'dicomnode db upgrade' first")


def _aware(value: datetime) -> datetime:
    # The store's column type returns aware UTC; a naive value can only be UTC too.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _plain(row: Mapping[Any, Any]) -> dict[str, Any]:
    out = {str(k): v for k, v in row.items()}
    out["created_at"] = _aware(out["created_at"])
    out["disabled"] = bool(out["disabled"])
    return out


class UserRows:
    """Reads and writes of ``users`` rows on the node's database engine (each call its own transaction)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(users_table)).scalar() or 0)

    def all(self) -> list[dict[str, Any]]:
        """Every row, by user name (``created_at`` aware UTC, ``disabled`` a bool)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(users_table).order_by(users_table.c.username)).mappings().all()
        return [_plain(r) for r in rows]

    def last_logins(self) -> dict[str, datetime]:
        """User name -> time of the newest ``login`` audit event (each session log-in is audited)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(AuditRow.actor, func.max(AuditRow.at))
                .where(AuditRow.action == "login")
                .group_by(AuditRow.actor)
            ).all()
        return {str(actor): _aware(at) for actor, at in rows if at is not None}

    def get(self, username: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(users_table).where(users_table.c.username == username)).mappings().first()
        return _plain(r) if r is not None else None

    def by_token(self, token_sha256: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            q = select(users_table).where(users_table.c.token_sha256 == token_sha256)
            r = conn.execute(q).mappings().first()
        return _plain(r) if r is not None else None

    def insert(self, username: str, role: str, password_hash: str) -> None:
        """Add a row; ``InputError`` when the name is taken (also by another process at the same moment)."""
        try:
            self._insert(username, role, password_hash)
        except IntegrityError:
            raise InputError(f"user {username!r} exists already") from None

    def _insert(self, username: str, role: str, password_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(users_table).values(
                    username=username,
                    role=role,
                    password_hash=password_hash,
                    created_at=datetime.now(UTC),
                    disabled=0,
                )
            )

    def update(self, username: str, **values: Any) -> bool:
        """Set columns of ``username``'s row (``password_hash``, ``disabled``, ``token_sha256``); False when
        there is no such user."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(users_table).where(users_table.c.username == username).values(**values)
            )
        return bool(result.rowcount)
