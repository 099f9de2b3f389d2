"""Apply the Alembic migrations shipped in the package (``dicomnode db upgrade``; ``serve`` runs it too)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from dicomnode.store.engine import IMMEDIATE

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: PostgreSQL advisory lock id held while migrating (any constant unique to dicomnode).
_MIGRATION_LOCK_KEY = 0x0D1C0_0DE


def alembic_config() -> Config:
    """An Alembic config pointing at the shipped migrations (no ``alembic.ini`` needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision`` (default: the newest); idempotent.

    Returns
    -------
    str or None
        The revision the database is at afterwards.
    """
    cfg = alembic_config()
    with engine.connect() as conn:
        # Several processes (receive, work) may start at once: one migrates, the others wait for it.
        conn.execution_options(**{IMMEDIATE: True})  # SQLite: take the write lock at BEGIN
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None = empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def is_up_to_date(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
