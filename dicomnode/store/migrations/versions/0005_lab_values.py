"""Laboratory values kept with the patient (founding study a; ``dicomnode.store.labs``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "lab_values",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("analyte", sa.String(32), nullable=False),
        sa.Column("loinc", sa.String(16), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("effective", sa.Date(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_id", sa.String(128), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_values")),
        sa.UniqueConstraint(
            "patient_id",
            "loinc",
            "effective",
            "source",
            "source_id",
            name=op.f("uq_lab_values_patient_id"),
        ),
    )
    op.create_index(op.f("ix_lab_values_patient_id"), "lab_values", ["patient_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_lab_values_patient_id"), table_name="lab_values")
    op.drop_table("lab_values")
