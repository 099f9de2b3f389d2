"""Plain, frozen records the :class:`~dicomnode.store.Store` returns (never ORM objects: no lazy loading
surprises, safe to hand to other threads and to templates)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from dicomnode.domain import DeliveryOutcome, JobState, ResultFiles, RuleDecision

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: ``items`` plus the ``total`` number of matching rows."""

    items: tuple[T, ...]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class Study:
    study_instance_uid: str
    attributes: Mapping[str, Any]
    calling_aet: str | None
    first_received_at: datetime
    last_received_at: datetime
    routed_at: datetime | None
    n_series: int
    n_instances: int


@dataclass(frozen=True)
class Series:
    series_instance_uid: str
    study_instance_uid: str
    attributes: Mapping[str, Any]
    modality: str | None
    n_instances: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    #: Content version (1, then +1 each time instances arrive after a job was created for the series).
    version: int
    #: The series was re-opened after a job was created: a job for ``version`` is still to be created.
    needs_new_version: bool


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size_bytes: int
    received_at: datetime
    source: str
    calling_aet: str | None


@dataclass(frozen=True)
class Job:
    id: int
    series_instance_uid: str
    study_instance_uid: str
    pipeline: str
    destinations: tuple[str, ...]
    version: int
    state: JobState
    worker_id: str | None
    message: str | None
    #: How many times a worker claimed it.
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class JobEvent:
    """One step of a job's timeline."""

    at: datetime
    from_state: JobState | None
    to_state: JobState
    message: str | None
    actor: str | None


@dataclass(frozen=True)
class Result:
    job_id: int
    created_at: datetime
    result_json: Mapping[str, Any]
    files: tuple[Path, ...]
    #: The typed outputs (SR, secondary captures, result.json, PNG) as the analysis wrote them.
    outputs: ResultFiles = field(default_factory=ResultFiles)


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    version: int
    outcome: DeliveryOutcome
    attempts: int
    message: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class DeliveryAttempt:
    at: datetime
    outcome: DeliveryOutcome
    message: str | None


@dataclass(frozen=True)
class StoredDecision:
    """A routing decision as recorded, with when and for which study."""

    study_instance_uid: str
    decided_at: datetime
    decision: RuleDecision


@dataclass(frozen=True)
class JobDetail:
    """Everything the UI shows on a job's page."""

    job: Job
    events: tuple[JobEvent, ...]
    result: Result | None
    deliveries: tuple[Delivery, ...]
    decisions: tuple[StoredDecision, ...]


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any
    after: Any


@dataclass(frozen=True)
class RuleVersion:
    id: int
    created_at: datetime
    author: str
    yaml_text: str
    comment: str | None
