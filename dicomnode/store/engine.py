"""Engine creation (called from ``cli``; the engine is then passed to :class:`~dicomnode.store.Store`).

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys on, ``BEGIN IMMEDIATE``
for write transactions (a deferred transaction that reads then writes can fail at once with "database is
locked" in WAL mode, whatever the busy timeout) and ``synchronous=FULL`` (a commit is on the device before it
returns). The connection that records received instances under ``dicom.durability: process`` asks for
``synchronous=NORMAL`` instead (:data:`SYNCHRONOUS_NORMAL`): in WAL mode a commit then survives a crash of the
process but may roll back after a power loss or an operating-system crash, and the database stays consistent
(https://www.sqlite.org/pragma.html#pragma_synchronous). PostgreSQL uses psycopg 3
(``postgresql+psycopg://``); its commits are flushed by the server whatever the option.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from dicomnode.errors import ConfigError

#: Execution option asking for ``BEGIN IMMEDIATE`` on SQLite (ignored elsewhere).
IMMEDIATE = "dicomnode_sqlite_immediate"

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: ``PRAGMA synchronous`` values :func:`make_engine` accepts for SQLite.
SYNCHRONOUS_FULL = "FULL"
SYNCHRONOUS_NORMAL = "NORMAL"


def normalise_url(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg://`` (the driver we ship); other URLs unchanged."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, sqlite_synchronous: str = SYNCHRONOUS_FULL, **kwargs: Any) -> Engine:
    """Create the engine for ``url`` with the settings dicomnode relies on.

    Parameters
    ----------
    url
        ``sqlite:///path/to/file.sqlite3`` or ``postgresql+psycopg://user@host:port/db``.
    sqlite_synchronous
        SQLite's ``PRAGMA synchronous`` for every connection of this engine: ``FULL`` (default: a commit
        survives a power loss) or ``NORMAL`` (in WAL mode, a commit survives a crash of the process only;
        used for recording received instances under ``dicom.durability: process``). Ignored for PostgreSQL.
    **kwargs
        Passed to :func:`sqlalchemy.create_engine`.

    Raises
    ------
    ConfigError
        The URL cannot be parsed or names an unsupported backend.
    """
    url = normalise_url(url)
    parsed = check_url(url)
    backend = parsed.get_backend_name()
    if sqlite_synchronous not in (SYNCHRONOUS_FULL, SYNCHRONOUS_NORMAL):
        raise ValueError(f"sqlite_synchronous must be FULL or NORMAL, not {sqlite_synchronous!r}")
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {})
        kwargs["connect_args"].setdefault("check_same_thread", False)
        kwargs["connect_args"].setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        _sqlite_events(engine, sqlite_synchronous)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    raise AssertionError("unreachable: check_url accepts sqlite and postgresql only")


def check_url(url: str) -> URL:
    """Parse a database URL without touching anything; :class:`ConfigError` when unusable."""
    try:
        parsed = make_url(normalise_url(url))
    except Exception:  # sqlalchemy raises ArgumentError with a long text (and maybe the password)
        raise ConfigError("config: database_url: cannot be parsed as a database URL") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"config: database_url: unsupported database {backend!r} (use sqlite or postgresql)"
        )
    return parsed


def _set_wal(cur: Any) -> None:
    """Switch a connection to WAL, retrying while another connection holds the lock.

    Changing the journal mode needs an exclusive lock, and SQLite may answer "database is locked" at once,
    without the busy handler, while several processes open a fresh database together (receive + work starting,
    concurrent migrations). The mode is persistent, so a short retry is enough.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_events(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN itself (pysqlite's implicit BEGIN is deferred only).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _set_wal(cur)
        cur.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed row survives power loss too (a C-STORE success promises the instance is recorded).
        # NORMAL (the recording connection under dicom.durability: process): in WAL mode it survives a crash
        # of the process, not a power loss; the database stays consistent either way.
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
