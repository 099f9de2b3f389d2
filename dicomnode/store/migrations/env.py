"""Alembic environment (run through :func:`dicomnode.store.upgrade`, which passes a connection)."""

from __future__ import annotations

from alembic import context

from dicomnode.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when someone runs the alembic command by hand
    raise RuntimeError("run migrations with 'dicomnode db upgrade' (dicomnode.store.upgrade)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables so future migrations work there too.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
