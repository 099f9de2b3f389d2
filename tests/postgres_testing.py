"""Helpers for tests that need a real PostgreSQL (used by dicomnode's own tests; no effect at import).

``postgres_test_url()`` is the server to use: ``DICOMNODE_TEST_POSTGRES_URL`` or the local default
(``postgresql+psycopg://postgres@127.0.0.1:5432/test``). :func:`temporary_database` creates a fresh,
uniquely named database on that server, yields its URL, and drops it afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_test_url() -> str:
    """The PostgreSQL server URL for tests (read when called, never at import)."""
    return os.environ.get("DICOMNODE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def postgres_unavailable_reason(url: str | None = None) -> str | None:
    """None when PostgreSQL answers at ``url``, else a one-line reason."""
    url = url or postgres_test_url()
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # any failure to connect is a reason to skip (or fail under CI)
        first = " ".join(str(getattr(exc, "orig", exc)).split())[:200]
        return f"PostgreSQL not reachable at {engine.url.render_as_string(hide_password=True)}: {first}"
    finally:
        engine.dispose()


@contextmanager
def temporary_database(server_url: str | None = None, prefix: str = "dicomnode_test") -> Iterator[str]:
    """Create a fresh database next to ``server_url``'s, yield its URL, drop it at the end."""
    base = create_engine(server_url or postgres_test_url(), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with base.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield base.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with base.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        base.dispose()
