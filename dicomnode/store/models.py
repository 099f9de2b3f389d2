"""SQLAlchemy 2 table definitions (the ORM side; the schema itself is created by the Alembic migrations).

Keep this file and ``migrations/versions`` in step: ``tests/unit/test_store.py`` compares the two
(0001: the pipeline's tables; 0002: ``users`` of the admin UI; 0003: ``scheduler_lease``;
0004: ``results.outputs``, the typed outputs).
Times are stored as naive UTC and returned as aware UTC (:class:`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Constraint names are fixed so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python, naive UTC in the database (same on SQLite and PostgreSQL)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class StudyRow(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    #: Study-level header values (StudyDescription, StudyDate, AccessionNumber, PatientID, ...).
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    #: When routing last ran for this study (None = never).
    routed_at: Mapped[datetime | None]


class SeriesRow(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    modality: Mapped[str | None] = mapped_column(String(16))
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    #: Content version: bumped when instances arrive after a job for the series was created.
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: True when the series was re-opened after a job started; cleared when a job of the new version exists.
    needs_new_version: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_series_completed_at", "completed_at"),)


class InstanceRow(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]
    #: Position along the slice normal (mm) when known: gives the series z-extent.
    slice_position: Mapped[float | None] = mapped_column(Float)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)


class DecisionRow(Base):
    __tablename__ = "routing_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    decided_at: Mapped[datetime]
    selected: Mapped[bool] = mapped_column(Boolean)
    rule: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))
    pipeline: Mapped[str | None] = mapped_column(String(64))
    destinations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    rank: Mapped[int | None] = mapped_column(Integer)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), index=True)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("series_id", "pipeline", "version", name="uq_jobs_series_pipeline_version"),
    )


class JobEventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(128))


class ResultRow(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[datetime]
    result_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: ``ResultFiles.to_json()`` (migration 0004; None on rows written before).
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)


class DeliveryRow(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("job_id", "destination", "version", name="uq_deliveries_job_destination_version"),
    )


class DeliveryAttemptRow(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    outcome: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)


class AuditRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    before: Mapped[Any | None] = mapped_column(JSON)
    after: Mapped[Any | None] = mapped_column(JSON)


class RuleVersionRow(Base):
    __tablename__ = "rule_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime]
    author: Mapped[str] = mapped_column(String(128))
    yaml_text: Mapped[str] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)


class UserRow(Base):
    """Accounts of the admin UI / REST API (used by ``dicomnode.web.users``; created by migration 0002)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    #: ``admin``, ``viewer`` or ``sender`` (STOW-RS only); checked by the web module.
    role: Mapped[str] = mapped_column(String(16))
    #: argon2 hash of the password.
    password_hash: Mapped[str] = mapped_column(String(256))
    #: SHA-256 (hex) of the API bearer token; None = no token issued.
    token_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    #: 1 = the account may not log in (kept for the audit trail).
    disabled: Mapped[int] = mapped_column(Integer, default=0)


class SchedulerLeaseRow(Base):
    """Who runs the sweeps: one row per lease name, held by one process until ``expires_at``.

    A ``work`` process renews its lease while it lives; another one takes over once the lease expired
    (see :meth:`dicomnode.store.Store.acquire_lease`).
    """

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]
