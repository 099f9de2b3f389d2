"""The store's plumbing: errors, the job life cycle table, sessions, and row -> record helpers."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import CursorResult, Engine, Select, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.domain import DeliveryOutcome, JobState, ResultFiles, RuleDecision
from dicomnode.errors import DicomnodeError
from dicomnode.store.engine import IMMEDIATE, make_engine
from dicomnode.store.models import (
    DecisionRow,
    DeliveryRow,
    InstanceRow,
    JobEventRow,
    JobRow,
    ResultRow,
    RuleVersionRow,
    SeriesRow,
    StudyRow,
)
from dicomnode.store.records import (
    Delivery,
    Job,
    Result,
    RuleVersion,
    Series,
    StoredDecision,
    Study,
)
from dicomnode.vocab import rule_action

log = logging.getLogger(__name__)

T = TypeVar("T")


# The statements record_instance runs for every received image, built once (building a statement costs
# more CPU than SQLite takes to run it).
_SELECT_STUDY = select(StudyRow.id, StudyRow.attributes).where(
    StudyRow.study_instance_uid == bindparam("uid")
)
_SELECT_SERIES = select(
    SeriesRow.id, SeriesRow.last_received_at, SeriesRow.completed_at, SeriesRow.version
).where(SeriesRow.series_instance_uid == bindparam("uid"))
_SELECT_INSTANCE = select(InstanceRow.id).where(InstanceRow.sop_instance_uid == bindparam("uid"))
_SELECT_INSTANCES = select(InstanceRow.sop_instance_uid).where(
    InstanceRow.sop_instance_uid.in_(bindparam("uids", expanding=True))
)
_INSERT_STUDY = insert(StudyRow)
_INSERT_SERIES = insert(SeriesRow)
_INSERT_INSTANCE = insert(InstanceRow)
_TOUCH_STUDY = (
    update(StudyRow)
    .where(StudyRow.id == bindparam("sid"), StudyRow.last_received_at < bindparam("at"))
    .values(last_received_at=bindparam("at"))
)


def _new_id(result: CursorResult[Any]) -> int:
    """The primary key of the row an INSERT just made."""
    key = result.inserted_primary_key
    if key is None or key[0] is None:
        raise DicomnodeError("the database did not return the new row's id")
    return int(key[0])


class StoreError(DicomnodeError):
    """A store operation was refused (base of the store's own errors)."""


class NotFoundError(StoreError, LookupError):
    """No study / series / job / delivery with that identifier."""


class InvalidTransitionError(StoreError):
    """A job state change that the life cycle does not allow (e.g. DONE -> ANALYSING)."""


#: Allowed job state changes (from -> to). SUPERSEDED is reachable from every state but itself.
ALLOWED_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.ANALYSING, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.ANALYSING: frozenset(
        {JobState.REPORTED, JobState.NOT_QUALIFYING, JobState.FAILED, JobState.PENDING, JobState.SUPERSEDED}
    ),
    JobState.REPORTED: frozenset({JobState.DELIVERING, JobState.DONE, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.DELIVERING: frozenset({JobState.DONE, JobState.FAILED, JobState.SUPERSEDED}),
    # Re-run (admin) or resend (admin) from the final states.
    JobState.DONE: frozenset({JobState.DELIVERING, JobState.PENDING, JobState.SUPERSEDED}),
    JobState.FAILED: frozenset({JobState.PENDING, JobState.DELIVERING, JobState.SUPERSEDED}),
    JobState.NOT_QUALIFYING: frozenset({JobState.PENDING, JobState.SUPERSEDED}),
    JobState.SUPERSEDED: frozenset(),
}

#: How an instance reached the node - ingest's own vocabulary: C-STORE, STOW-RS, a spool re-index after a
#: crash, a file imported by hand. ``dicomnode.pipeline.sink`` is the one adapter that maps other names.
INSTANCE_SOURCES: tuple[str, ...] = ("dimse", "stow", "reindex", "import")
#: Names earlier versions of the store used, still accepted (normalised to ingest's).
_LEGACY_SOURCES: Mapping[str, str] = {"stowrs": "stow"}

#: States from which an admin may re-run a job (:meth:`Store.rerun_job`).
RERUNNABLE_STATES: frozenset[JobState] = frozenset({JobState.DONE, JobState.FAILED, JobState.NOT_QUALIFYING})


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=float(value))


def jsonable_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Header values -> JSON-storable values (tuples/MultiValue -> lists, numbers kept, the rest ``str``)."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        out[str(key)] = _jsonable_value(value)
    return out


def _jsonable_value(value: Any) -> Any:
    # pydicom hands out str/int/float subclasses (UID, IS, DSfloat, PersonName...): store plain types.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return None  # binary values never belong in the summary columns
    if isinstance(value, Mapping):
        return {str(k): _jsonable_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_jsonable_value(v) for v in value]
    return str(value)


def _attrs_from_db(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    # JSON has no tuples; SeriesSummary promises tuples for multi-valued elements.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (attrs or {}).items()}


class StoreBase:
    """Sessions and row -> record helpers shared by the store's aggregates (see :class:`Store`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._is_postgres = engine.dialect.name == "postgresql"

    @classmethod
    def from_url(cls, url: str) -> Any:
        """A store on a new engine for ``url`` (no migration is run)."""
        return cls(make_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            # Procure the connection now, with the option our SQLite "begin" hook turns into BEGIN IMMEDIATE.
            s.connection(execution_options={IMMEDIATE: True})
            yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def _retry_integrity(
        self,
        fn: Callable[[], T],
        attempts: int = 5,
        errors: tuple[type[Exception], ...] = (IntegrityError,),
    ) -> T:
        # Concurrent first inserts of the same study/series/job: the loser retries and finds the row.
        # ``errors``: what an integrity error is on the path taken (SQLAlchemy's, or the driver's own).
        for i in range(attempts):
            try:
                return fn()
            except errors:
                if i == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _series_row(self, s: Session, series_uid: str) -> SeriesRow:
        row = s.scalar(select(SeriesRow).where(SeriesRow.series_instance_uid == series_uid))
        if row is None:
            raise NotFoundError(f"no series {series_uid}")
        return row

    def _study_uid(self, s: Session, study_id: int) -> str:
        uid = s.scalar(select(StudyRow.study_instance_uid).where(StudyRow.id == study_id))
        assert uid is not None  # foreign key
        return uid

    def _study(self, s: Session, row: StudyRow) -> Study:
        n_series, n_inst = s.execute(
            select(func.count(SeriesRow.id), func.coalesce(func.sum(SeriesRow.n_instances), 0)).where(
                SeriesRow.study_id == row.id
            )
        ).one()
        return Study(
            study_instance_uid=row.study_instance_uid,
            attributes=_attrs_from_db(row.attributes),
            calling_aet=row.calling_aet,
            first_received_at=row.first_received_at,
            last_received_at=row.last_received_at,
            routed_at=row.routed_at,
            n_series=int(n_series),
            n_instances=int(n_inst),
        )

    def _job(self, s: Session, job_id: int) -> Job:
        r = s.execute(
            select(JobRow, SeriesRow.series_instance_uid, StudyRow.study_instance_uid)
            .join(SeriesRow, JobRow.series_id == SeriesRow.id)
            .join(StudyRow, SeriesRow.study_id == StudyRow.id)
            .where(JobRow.id == job_id)
            .execution_options(populate_existing=True)
        ).first()
        if r is None:
            raise NotFoundError(f"no job {job_id}")
        j, series_uid, study_uid = r
        return Job(
            id=j.id,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            pipeline=j.pipeline,
            destinations=tuple(j.destinations or ()),
            version=j.version,
            state=JobState(j.state),
            worker_id=j.worker_id,
            message=j.message,
            attempts=j.attempts,
            created_at=j.created_at,
            updated_at=j.updated_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
        )

    def _delivery(self, s: Session, delivery_id: int) -> Delivery:
        r = s.execute(
            select(DeliveryRow, SeriesRow.series_instance_uid, StudyRow.study_instance_uid)
            .join(JobRow, DeliveryRow.job_id == JobRow.id)
            .join(SeriesRow, JobRow.series_id == SeriesRow.id)
            .join(StudyRow, SeriesRow.study_id == StudyRow.id)
            .where(DeliveryRow.id == delivery_id)
            .execution_options(populate_existing=True)
        ).first()
        if r is None:
            raise NotFoundError(f"no delivery {delivery_id}")
        d, series_uid, study_uid = r
        return Delivery(
            id=d.id,
            job_id=d.job_id,
            destination=d.destination,
            version=d.version,
            outcome=DeliveryOutcome(d.outcome),
            attempts=d.attempts,
            message=d.message,
            next_attempt_at=d.next_attempt_at,
            created_at=d.created_at,
            updated_at=d.updated_at,
            delivered_at=d.delivered_at,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
        )

    def _transition(
        self, s: Session, row: JobRow, state: JobState, message: str | None, actor: str | None, at: datetime
    ) -> bool:
        current = JobState(row.state)
        if current == state:
            return False
        if state not in ALLOWED_TRANSITIONS[current]:
            raise InvalidTransitionError(f"job {row.id}: {current.value} -> {state.value} is not allowed")
        row.state = state.value
        row.updated_at = at
        row.message = message
        if state == JobState.ANALYSING:
            row.started_at = at
        if state.is_final:
            row.finished_at = at
        elif state == JobState.PENDING:
            row.worker_id = None
            row.finished_at = None
        s.add(
            JobEventRow(
                job_id=row.id,
                at=at,
                from_state=current.value,
                to_state=state.value,
                message=message,
                actor=actor,
            )
        )
        log.info("job %d: %s -> %s", row.id, current.value, state.value)
        return True

    def ping(self) -> bool:
        """True when the database answers (health checks)."""
        try:
            with self._read() as s:
                s.execute(select(1))
            return True
        except Exception:  # any driver error means "not healthy"; the caller reports, never raises
            log.warning("database ping failed", exc_info=True)
            return False


def _count(s: Session, q: Select[Any, *tuple[Any, ...]]) -> int:
    return int(s.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0)


def _series(r: SeriesRow, study_uid: str) -> Series:
    return Series(
        series_instance_uid=r.series_instance_uid,
        study_instance_uid=study_uid,
        attributes=_attrs_from_db(r.attributes),
        modality=r.modality,
        n_instances=r.n_instances,
        first_received_at=r.first_received_at,
        last_received_at=r.last_received_at,
        completed_at=r.completed_at,
        version=r.version,
        needs_new_version=r.needs_new_version,
    )


def _decision(r: DecisionRow, study_uid: str) -> StoredDecision:
    return StoredDecision(
        study_instance_uid=study_uid,
        decided_at=r.decided_at,
        decision=RuleDecision(
            series_instance_uid=r.series_instance_uid,
            selected=r.selected,
            rule=r.rule,
            action=rule_action(r.action),  # rows of older versions say "analyse"
            pipeline=r.pipeline,
            destinations=tuple(r.destinations or ()),
            reasons=tuple(r.reasons or ()),
            rank=r.rank,
        ),
    )


def _result(r: ResultRow) -> Result:
    return Result(
        job_id=r.job_id,
        created_at=r.created_at,
        result_json=r.result_json,
        files=tuple(Path(f) for f in r.files),
        outputs=ResultFiles.from_json(r.outputs) if r.outputs else _legacy_outputs(r.files),
    )


def _legacy_outputs(files: Sequence[str]) -> ResultFiles:
    """Typed outputs of a row written before migration 0004, from the names the analysis always gave them
    (``result.json``, ``sr.dcm``, ``sc_*.dcm``, ``*.png``); the only place names are read."""
    names = [str(f) for f in files]
    return ResultFiles(
        result_json=next((f for f in names if Path(f).name == "result.json"), None),
        sr=next((f for f in names if Path(f).name == "sr.dcm"), None),
        sc=tuple(f for f in names if Path(f).suffix == ".dcm" and Path(f).name != "sr.dcm"),
        png=tuple(f for f in names if Path(f).suffix == ".png"),
    )


def _rule_version(r: RuleVersionRow) -> RuleVersion:
    return RuleVersion(
        id=r.id, created_at=r.created_at, author=r.author, yaml_text=r.yaml_text, comment=r.comment
    )
