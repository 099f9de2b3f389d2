"""The scheduler lease: one ``work`` process owns the sweeps, another takes over when its lease expires.

Also renames the instance source ``stowrs`` to ingest's ``stow`` (one vocabulary for ingest and store).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "scheduler_lease",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_scheduler_lease")),
    )
    op.execute("UPDATE instances SET source = 'stow' WHERE source = 'stowrs'")


def downgrade() -> None:
    op.drop_table("scheduler_lease")
