"""The :class:`Store`: all database reads and writes go through here (only here changes job state)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import CursorResult, Engine, Select, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.domain import DeliveryOutcome, JobState, ResultFiles, RuleDecision, SeriesSummary
from dicomnode.errors import DicomnodeError
from dicomnode.store.engine import IMMEDIATE, make_engine
from dicomnode.store.models import (
    AuditRow,
    DecisionRow,
    DeliveryAttemptRow,
    DeliveryRow,
    InstanceRow,
    JobEventRow,
    JobRow,
    ResultRow,
    RuleVersionRow,
    SchedulerLeaseRow,
    SeriesRow,
    StudyRow,
)
from dicomnode.store.records import (
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    Instance,
    Job,
    JobDetail,
    JobEvent,
    Page,
    Result,
    RuleVersion,
    Series,
    StoredDecision,
    Study,
)

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


class Store:
    """Database access for dicomnode (SQLite or PostgreSQL).

    Create it with an engine made in ``cli`` (:func:`dicomnode.store.make_engine`) or :meth:`from_url`;
    apply migrations first with :func:`dicomnode.store.upgrade`. All methods are thread safe; each runs in its
    own short transaction. Times are timezone-aware UTC; ``now`` parameters exist so tests can mock the clock.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._is_postgres = engine.dialect.name == "postgresql"

    @classmethod
    def from_url(cls, url: str) -> Store:
        """A store on a new engine for ``url`` (no migration is run)."""
        return cls(make_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    # -- plumbing --------------------------------------------------------------------------------------

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

    def _retry_integrity(self, fn: Callable[[], T], attempts: int = 5) -> T:
        # Concurrent first inserts of the same study/series/job: the loser retries and finds the row.
        for i in range(attempts):
            try:
                return fn()
            except IntegrityError:
                if i == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    # -- ingest ----------------------------------------------------------------------------------------

    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        path: Path | str,
        size_bytes: int,
        study_attrs: Mapping[str, Any],
        series_attrs: Mapping[str, Any],
        calling_aet: str | None,
        source: str,
        slice_position: float | None = None,
        number_of_frames: int | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record one received instance (after its file is safely on disk); idempotent on SOP Instance UID.

        Updates the series' last-received time and instance count. An instance arriving in a series that was
        already complete re-opens it; if a job already exists for the series, the series version is bumped
        (``needs_new_version``) so the next completion creates a job for the new version.

        Parameters
        ----------
        study_attrs, series_attrs
            Study- and series-level header values by DICOM keyword (plain values; tuples for multi-valued).
        source
            One of :data:`INSTANCE_SOURCES` (``"dimse"``, ``"stow"``, ``"reindex"``, ``"import"``); the
            older ``"stowrs"`` is accepted and stored as ``"stow"``.
        slice_position
            Position along the slice normal in mm (gives the series z-extent for routing), if known.
        number_of_frames
            NumberOfFrames of a multi-frame instance.

        Returns
        -------
        bool
            True when the instance is new, False when it was already recorded.
        """
        source = _LEGACY_SOURCES.get(source, source)
        if source not in INSTANCE_SOURCES:
            raise ValueError(f"source must be one of {INSTANCE_SOURCES}, not {source!r}")
        at = now or _now()
        s_attrs = jsonable_attrs(study_attrs)
        se_attrs = jsonable_attrs(series_attrs)

        def run() -> bool:
            # Core statements on the session's connection, not ORM objects: this runs for every received
            # image while the sender waits, and the ORM's unit of work cost several times the SQL itself.
            with self._write() as s:
                conn = s.connection()
                study = conn.execute(_SELECT_STUDY, {"uid": study_uid}).first()
                if study is None:
                    study_id = _new_id(
                        conn.execute(
                            _INSERT_STUDY,
                            {
                                "study_instance_uid": study_uid,
                                "attributes": s_attrs,
                                "calling_aet": calling_aet,
                                "first_received_at": at,
                                "last_received_at": at,
                                "routed_at": None,
                            },
                        )
                    )
                    study_attributes: dict[str, Any] = dict(s_attrs)
                else:
                    study_id, study_attributes = study.id, dict(study.attributes or {})
                series = conn.execute(_SELECT_SERIES, {"uid": series_uid}).first()
                if series is None:
                    series_id = _new_id(
                        conn.execute(
                            _INSERT_SERIES,
                            {
                                "series_instance_uid": series_uid,
                                "study_id": study_id,
                                "attributes": se_attrs,
                                "modality": (
                                    str(se_attrs.get("Modality")) if se_attrs.get("Modality") else None
                                ),
                                "n_instances": 0,
                                "first_received_at": at,
                                "last_received_at": at,
                                "completed_at": None,
                                "version": 1,
                                "needs_new_version": False,
                            },
                        )
                    )
                    last_received_at, completed_at, version = at, None, 1
                else:
                    series_id = series.id
                    last_received_at, completed_at, version = (
                        series.last_received_at,
                        series.completed_at,
                        series.version,
                    )
                exists = conn.execute(_SELECT_INSTANCE, {"uid": sop_instance_uid}).first()
                if exists is not None:
                    return False
                conn.execute(
                    _INSERT_INSTANCE,
                    {
                        "sop_instance_uid": sop_instance_uid,
                        "series_id": series_id,
                        "sop_class_uid": sop_class_uid,
                        "transfer_syntax": transfer_syntax,
                        "path": str(path),
                        "size_bytes": int(size_bytes),
                        "calling_aet": calling_aet,
                        "source": source,
                        "received_at": at,
                        "slice_position": slice_position,
                        "number_of_frames": number_of_frames,
                    },
                )
                # SQL-side increments: two associations writing the same series must not lose counts.
                conn.execute(_TOUCH_STUDY, {"sid": study_id, "at": at})
                merged = {**study_attributes, **s_attrs}
                if study_attributes != merged:
                    conn.execute(update(StudyRow).where(StudyRow.id == study_id).values(attributes=merged))
                values: dict[str, Any] = {"n_instances": SeriesRow.n_instances + 1}
                if at > last_received_at:
                    values["last_received_at"] = at
                if completed_at is not None:
                    values["completed_at"] = None
                    has_job = conn.execute(
                        select(func.count(JobRow.id)).where(
                            JobRow.series_id == series_id, JobRow.version == version
                        )
                    ).scalar()
                    if has_job:
                        values["version"] = SeriesRow.version + 1
                        values["needs_new_version"] = True
                    log.info(
                        "series %s re-opened by a late instance (new version: %s)", series_uid, bool(has_job)
                    )
                conn.execute(update(SeriesRow).where(SeriesRow.id == series_id).values(**values))
                return True

        return self._retry_integrity(run)

    def instances(self, series_uid: str) -> list[Instance]:
        """The instances of a series (for the analysis step: their files), in arrival order."""
        with self._read() as s:
            rows = s.execute(
                select(InstanceRow, SeriesRow.series_instance_uid)
                .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.series_instance_uid == series_uid)
                .order_by(InstanceRow.id)
            ).all()
            return [
                Instance(
                    sop_instance_uid=r.sop_instance_uid,
                    series_instance_uid=uid,
                    sop_class_uid=r.sop_class_uid,
                    transfer_syntax=r.transfer_syntax,
                    path=Path(r.path),
                    size_bytes=r.size_bytes,
                    received_at=r.received_at,
                    source=r.source,
                    calling_aet=r.calling_aet,
                )
                for r, uid in rows
            ]

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Files of a series' instances, in arrival order."""
        return [i.path for i in self.instances(series_uid)]

    # -- completion ------------------------------------------------------------------------------------

    def series_ready_for_completion(
        self,
        now: datetime,
        series_quiet: timedelta | float,
        study_quiet: timedelta | float,
        max_wait: timedelta | float,
    ) -> list[Series]:
        """Open series that are complete by the quiet-period rule (seconds may be given as floats).

        Ready means: no instance for the series for ``series_quiet`` and none for its study for
        ``study_quiet``, or the series' first instance arrived ``max_wait`` ago or more.
        """
        sq, stq, mw = _seconds(series_quiet), _seconds(study_quiet), _seconds(max_wait)
        with self._read() as s:
            rows = s.execute(
                select(SeriesRow, StudyRow.study_instance_uid)
                .join(StudyRow, SeriesRow.study_id == StudyRow.id)
                .where(
                    SeriesRow.completed_at.is_(None),
                    or_(
                        and_(SeriesRow.last_received_at <= now - sq, StudyRow.last_received_at <= now - stq),
                        SeriesRow.first_received_at <= now - mw,
                    ),
                )
                .order_by(SeriesRow.first_received_at, SeriesRow.id)
            ).all()
            return [_series(r, uid) for r, uid in rows]

    def mark_series_complete(self, series_uid: str, now: datetime | None = None) -> Series:
        """Mark a series complete (idempotent); returns it with its current ``version``."""
        at = now or _now()
        with self._write() as s:
            row = self._series_row(s, series_uid)
            if row.completed_at is None:
                row.completed_at = at
            s.flush()
            return _series(row, self._study_uid(s, row.study_id))

    def series_summaries(self, study_uid: str, *, complete_only: bool = False) -> list[SeriesSummary]:
        """What routing needs for every series of a study.

        ``attributes`` merge study- and series-level values (series wins); ``SOPClassUID`` and
        ``NumberOfFrames`` come from the recorded instances when the headers lacked them; ``z_extent_mm``
        is the span of the recorded slice positions (None when none were recorded).
        """
        with self._read() as s:
            study = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_uid))
            if study is None:
                raise NotFoundError(f"no study {study_uid}")
            q = select(SeriesRow).where(SeriesRow.study_id == study.id).order_by(SeriesRow.id)
            if complete_only:
                q = q.where(SeriesRow.completed_at.is_not(None))
            series_rows = list(s.scalars(q))
            agg = {
                r.series_id: r
                for r in s.execute(
                    select(
                        InstanceRow.series_id,
                        func.min(InstanceRow.slice_position).label("zmin"),
                        func.max(InstanceRow.slice_position).label("zmax"),
                        func.count(InstanceRow.slice_position).label("npos"),
                        func.max(InstanceRow.number_of_frames).label("frames"),
                        func.max(InstanceRow.sop_class_uid).label("sop_class"),
                    )
                    .where(InstanceRow.series_id.in_([r.id for r in series_rows]))
                    .group_by(InstanceRow.series_id)
                )
            }
            out = []
            for r in series_rows:
                attrs = {**_attrs_from_db(study.attributes), **_attrs_from_db(r.attributes)}
                a = agg.get(r.id)
                z: float | None = None
                if a is not None:
                    if not attrs.get("SOPClassUID") and a.sop_class:
                        attrs["SOPClassUID"] = a.sop_class
                    if a.frames and not attrs.get("NumberOfFrames"):
                        attrs["NumberOfFrames"] = int(a.frames)
                    if a.npos:
                        z = float(a.zmax - a.zmin)
                out.append(
                    SeriesSummary(
                        study_instance_uid=study_uid,
                        series_instance_uid=r.series_instance_uid,
                        attributes=attrs,
                        n_instances=r.n_instances,
                        z_extent_mm=z,
                    )
                )
            return out

    # -- routing ---------------------------------------------------------------------------------------

    def record_decisions(
        self, study_uid: str, decisions: Sequence[RuleDecision], now: datetime | None = None
    ) -> None:
        """Keep routing decisions (with their reasons) and mark the study routed."""
        at = now or _now()
        with self._write() as s:
            study = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_uid))
            if study is None:
                raise NotFoundError(f"no study {study_uid}")
            for d in decisions:
                s.add(
                    DecisionRow(
                        study_id=study.id,
                        series_instance_uid=d.series_instance_uid,
                        decided_at=at,
                        selected=d.selected,
                        rule=d.rule,
                        action=d.action,
                        pipeline=d.pipeline,
                        destinations=list(d.destinations),
                        reasons=list(d.reasons),
                        rank=d.rank,
                    )
                )
            study.routed_at = at

    def decisions(self, study_uid: str) -> list[StoredDecision]:
        """Every recorded decision for a study, newest first."""
        with self._read() as s:
            rows = s.execute(
                select(DecisionRow, StudyRow.study_instance_uid)
                .join(StudyRow, DecisionRow.study_id == StudyRow.id)
                .where(StudyRow.study_instance_uid == study_uid)
                .order_by(DecisionRow.decided_at.desc(), DecisionRow.id)
            ).all()
            return [_decision(r, uid) for r, uid in rows]

    # -- jobs ------------------------------------------------------------------------------------------

    def create_job(
        self,
        series_uid: str,
        pipeline: str,
        destinations: Sequence[str],
        version: int,
        *,
        now: datetime | None = None,
    ) -> int:
        """Create a PENDING job (idempotent on (series, pipeline, version): returns the existing id)."""
        at = now or _now()

        def run() -> int:
            with self._write() as s:
                series = self._series_row(s, series_uid)
                existing = s.scalar(
                    select(JobRow.id).where(
                        JobRow.series_id == series.id, JobRow.pipeline == pipeline, JobRow.version == version
                    )
                )
                if existing is not None:
                    return existing
                job = JobRow(
                    series_id=series.id,
                    pipeline=pipeline,
                    destinations=list(destinations),
                    version=version,
                    state=JobState.PENDING.value,
                    attempts=0,
                    created_at=at,
                    updated_at=at,
                )
                s.add(job)
                s.flush()
                s.add(JobEventRow(job_id=job.id, at=at, from_state=None, to_state=JobState.PENDING.value))
                if series.needs_new_version and version >= series.version:
                    series.needs_new_version = False
                log.info("job %d created for series %s v%d (%s)", job.id, series_uid, version, pipeline)
                return job.id

        return self._retry_integrity(run)

    def claim_next_job(
        self, worker_id: str, *, pipelines: Sequence[str] | None = None, now: datetime | None = None
    ) -> Job | None:
        """Atomically take the oldest PENDING job and move it to ANALYSING for ``worker_id``.

        Two workers never get the same job: PostgreSQL uses ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite
        serialises writers (``BEGIN IMMEDIATE``) and the UPDATE is guarded on the state anyway.
        """
        at = now or _now()
        for _ in range(10):
            with self._write() as s:
                q = select(JobRow.id).where(JobRow.state == JobState.PENDING.value)
                if pipelines is not None:
                    q = q.where(JobRow.pipeline.in_(list(pipelines)))
                q = q.order_by(JobRow.id).limit(1)
                if self._is_postgres:
                    q = q.with_for_update(skip_locked=True)
                job_id = s.scalar(q)
                if job_id is None:
                    return None
                res = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state == JobState.PENDING.value)
                    .values(
                        state=JobState.ANALYSING.value,
                        worker_id=worker_id,
                        attempts=JobRow.attempts + 1,
                        updated_at=at,
                        started_at=at,
                        message=None,
                    )
                    .execution_options(synchronize_session=False)
                )
                if getattr(res, "rowcount", 0) != 1:
                    continue  # someone else took it between our SELECT and UPDATE; try the next one
                s.add(
                    JobEventRow(
                        job_id=job_id,
                        at=at,
                        from_state=JobState.PENDING.value,
                        to_state=JobState.ANALYSING.value,
                        actor=worker_id,
                        message=f"claimed by {worker_id}",
                    )
                )
                s.flush()
                return self._job(s, job_id)
        return None

    def set_job_state(
        self,
        job_id: int,
        state: JobState,
        message: str | None = None,
        *,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> Job:
        """Move a job to ``state`` (checked against :data:`ALLOWED_TRANSITIONS`) and add it to the timeline.

        Setting the state a job is already in is a no-op (steps are idempotent).

        Raises
        ------
        NotFoundError
            No such job.
        InvalidTransitionError
            The life cycle does not allow the change.
        """
        at = now or _now()
        state = JobState(state)
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            self._transition(s, row, state, message, actor, at)
            s.flush()
            return self._job(s, job_id)

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

    def rerun_job(
        self, job_id: int, *, actor: str, message: str | None = None, now: datetime | None = None
    ) -> Job:
        """Admin re-run: a finished job (DONE, FAILED, NOT_QUALIFYING) goes back to PENDING; audited.

        What a re-run means at the destination (the behaviour a PACS administrator expects: the re-run
        *replaces* the earlier result, it does not add a second one beside it):

        * the job keeps its id and its version, so the analysis derives the same SR/SC UIDs from
          (job key, version, artefact) (``dicomnode.report.uids``) and the new objects replace the old ones
          at a PACS that accepts a re-sent instance (Orthanc: ``OverwriteInstances``; a PACS that keeps the
          first copy must have the old SR deleted before a re-run);
        * the job's deliveries of that version stay as they are (their history stays visible) until the new
          analysis is REPORTED; :meth:`create_deliveries` then re-opens them (PENDING, attempts counted
          afresh, a "re-opened" entry in their attempt history), so the new result is sent to every
          destination again, and the job ends DONE or FAILED as after a first run.

        New content for the series (instances arriving late) is a different matter: it makes a new series
        *version*, hence a new job with new UIDs, and supersedes the old job.

        Raises
        ------
        NotFoundError
            No such job.
        InvalidTransitionError
            The job is not finished (pending, analysing, reported, delivering) or was superseded.
        """
        at = now or _now()
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            before = JobState(row.state)
            if before not in RERUNNABLE_STATES:
                raise InvalidTransitionError(
                    f"job {job_id} is {before.value}; only done, failed or not-qualifying jobs can be re-run"
                )
            before_info = {"state": before.value, "attempts": row.attempts, "message": row.message}
            self._transition(s, row, JobState.PENDING, message or f"re-run requested by {actor}", actor, at)
            s.add(
                AuditRow(
                    at=at,
                    actor=actor,
                    action="job.rerun",
                    target=f"job:{job_id}",
                    before=before_info,
                    after={"state": JobState.PENDING.value, "version": row.version},
                )
            )
            s.flush()
            return self._job(s, job_id)

    def heartbeat(self, job_id: int, now: datetime | None = None) -> None:
        """A worker still busy with an ANALYSING job says so (keeps :meth:`reset_stale_jobs` off it)."""
        with self._write() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == JobState.ANALYSING.value)
                .values(updated_at=now or _now())
            )

    def get_job(self, job_id: int) -> Job:
        with self._read() as s:
            return self._job(s, job_id)

    def unfinished_jobs(self) -> list[Job]:
        """Jobs not in a final state, oldest first (what ``work`` resumes after a restart)."""
        finals = [st.value for st in JobState if st.is_final]
        with self._read() as s:
            ids = list(s.scalars(select(JobRow.id).where(JobRow.state.not_in(finals)).order_by(JobRow.id)))
            return [self._job(s, i) for i in ids]

    def reset_stale_jobs(self, older_than: datetime, *, now: datetime | None = None) -> list[int]:
        """Restart recovery: ANALYSING jobs not updated since ``older_than`` go back to PENDING.

        Returns the ids of the jobs reset.
        """
        at = now or _now()
        with self._write() as s:
            rows = list(
                s.scalars(
                    select(JobRow).where(
                        JobRow.state == JobState.ANALYSING.value, JobRow.updated_at < older_than
                    )
                )
            )
            for row in rows:
                msg = f"reset: worker {row.worker_id} stopped before finishing"
                self._transition(s, row, JobState.PENDING, msg, "recovery", at)
            return [r.id for r in rows]

    def supersede(
        self, series_uid: str, *, below_version: int, message: str | None = None, now: datetime | None = None
    ) -> list[int]:
        """Mark the series' jobs with a version below ``below_version`` SUPERSEDED; returns their ids."""
        at = now or _now()
        with self._write() as s:
            series = self._series_row(s, series_uid)
            rows = list(
                s.scalars(
                    select(JobRow).where(
                        JobRow.series_id == series.id,
                        JobRow.version < below_version,
                        JobRow.state != JobState.SUPERSEDED.value,
                    )
                )
            )
            for row in rows:
                self._transition(
                    s, row, JobState.SUPERSEDED, message or f"superseded by version {below_version}", None, at
                )
            return [r.id for r in rows]

    def record_result(
        self,
        job_id: int,
        result_json: Mapping[str, Any],
        files: Sequence[Path | str] | ResultFiles,
        now: datetime | None = None,
    ) -> None:
        """Keep the analysis result (``result.json`` content) and the produced files; a re-run replaces it.

        ``files`` is the typed :class:`~dicomnode.domain.ResultFiles` of the analysis (kept as they are),
        or a plain list of files (kept as a list, with no typed outputs).
        """
        at = now or _now()
        if isinstance(files, ResultFiles):
            names, outputs = list(files.all), files.to_json()
        else:
            names, outputs = [str(f) for f in files], None
        with self._write() as s:
            if s.get(JobRow, job_id) is None:
                raise NotFoundError(f"no job {job_id}")
            row = s.scalar(select(ResultRow).where(ResultRow.job_id == job_id))
            if row is None:
                row = ResultRow(job_id=job_id, created_at=at, result_json=dict(result_json), files=names)
                row.outputs = outputs
                s.add(row)
            else:
                row.created_at = at
                row.result_json = dict(result_json)
                row.files = names
                row.outputs = outputs

    def get_result(self, job_id: int) -> Result | None:
        with self._read() as s:
            row = s.scalar(select(ResultRow).where(ResultRow.job_id == job_id))
            return None if row is None else _result(row)

    # -- deliveries ------------------------------------------------------------------------------------

    def create_deliveries(
        self, job_id: int, destinations: Sequence[str], now: datetime | None = None
    ) -> list[Delivery]:
        """Create one PENDING delivery per destination for the job's version (idempotent).

        A REPORTED job moves to DELIVERING, or straight to DONE when ``destinations`` is empty. REPORTED means
        a new analysis result not sent yet: deliveries of the same version left final by an earlier run
        (an admin re-run, see :meth:`rerun_job`) are re-opened so the new result goes out again.
        """
        at = now or _now()

        def run() -> list[Delivery]:
            with self._write() as s:
                job = s.get(JobRow, job_id)
                if job is None:
                    raise NotFoundError(f"no job {job_id}")
                fresh_result = job.state == JobState.REPORTED.value
                for dest in dict.fromkeys(destinations):
                    existing = s.scalar(
                        select(DeliveryRow).where(
                            DeliveryRow.job_id == job_id,
                            DeliveryRow.destination == dest,
                            DeliveryRow.version == job.version,
                        )
                    )
                    if existing is not None and fresh_result and DeliveryOutcome(existing.outcome).is_final:
                        self._reopen_delivery(s, existing, "re-opened: the job was analysed again", at)
                    if existing is None:
                        s.add(
                            DeliveryRow(
                                job_id=job_id,
                                destination=dest,
                                version=job.version,
                                outcome=DeliveryOutcome.PENDING.value,
                                attempts=0,
                                created_at=at,
                                updated_at=at,
                            )
                        )
                s.flush()
                if job.state == JobState.REPORTED.value:
                    if destinations:
                        self._transition(s, job, JobState.DELIVERING, None, None, at)
                    else:
                        self._transition(s, job, JobState.DONE, "no destination configured", None, at)
                ids = list(
                    s.scalars(
                        select(DeliveryRow.id).where(
                            DeliveryRow.job_id == job_id,
                            DeliveryRow.version == job.version,
                            DeliveryRow.destination.in_(list(destinations)),
                        )
                    )
                )
                return [self._delivery(s, i) for i in ids]

        return self._retry_integrity(run)

    def _reopen_delivery(self, s: Session, row: DeliveryRow, message: str, at: datetime) -> None:
        # The attempt rows keep the earlier run's history; the delivery itself starts afresh.
        s.add(
            DeliveryAttemptRow(
                delivery_id=row.id, at=at, outcome=DeliveryOutcome.PENDING.value, message=message
            )
        )
        row.outcome = DeliveryOutcome.PENDING.value
        row.attempts = 0
        row.message = message
        row.next_attempt_at = None
        row.delivered_at = None
        row.updated_at = at

    def due_deliveries(
        self,
        now: datetime,
        *,
        limit: int = 100,
        lease: timedelta | float | None = None,
        job_id: int | None = None,
    ) -> list[Delivery]:
        """Deliveries to attempt now: PENDING or RETRYING with no future ``next_attempt_at``.

        With ``lease``, each returned delivery's ``next_attempt_at`` is pushed to ``now + lease`` in the same
        transaction, so a second sweeper does not pick it up while the first one is sending. With
        ``job_id``, only that job's deliveries.
        """
        with self._write() as s:
            q = (
                select(DeliveryRow.id)
                .where(
                    DeliveryRow.outcome.in_([DeliveryOutcome.PENDING.value, DeliveryOutcome.RETRYING.value]),
                    or_(DeliveryRow.next_attempt_at.is_(None), DeliveryRow.next_attempt_at <= now),
                )
                .order_by(DeliveryRow.next_attempt_at, DeliveryRow.id)
                .limit(limit)
            )
            if job_id is not None:
                q = q.where(DeliveryRow.job_id == job_id)
            if self._is_postgres and lease is not None:
                q = q.with_for_update(skip_locked=True)
            ids = list(s.scalars(q))
            if lease is not None and ids:
                s.execute(
                    update(DeliveryRow)
                    .where(DeliveryRow.id.in_(ids))
                    .values(next_attempt_at=now + _seconds(lease))
                    .execution_options(synchronize_session=False)
                )
            return [self._delivery(s, i) for i in ids]

    def record_delivery_attempt(
        self,
        delivery_id: int,
        outcome: DeliveryOutcome,
        message: str | None = None,
        next_attempt_at: datetime | None = None,
        *,
        now: datetime | None = None,
    ) -> Delivery:
        """Record the result of one attempt; the job follows.

        When every delivery of the job's version is final, a DELIVERING (or REPORTED) job becomes DONE (all
        succeeded) or FAILED (some failed permanently, the message names them).
        """
        at = now or _now()
        outcome = DeliveryOutcome(outcome)
        if outcome == DeliveryOutcome.RETRYING and next_attempt_at is None:
            raise ValueError("a RETRYING outcome needs next_attempt_at")
        with self._write() as s:
            row = s.get(DeliveryRow, delivery_id)
            if row is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            row.attempts += 1
            row.outcome = outcome.value
            row.message = message
            row.updated_at = at
            row.next_attempt_at = next_attempt_at if outcome == DeliveryOutcome.RETRYING else None
            if outcome == DeliveryOutcome.SUCCESS:
                row.delivered_at = at
            s.add(DeliveryAttemptRow(delivery_id=row.id, at=at, outcome=outcome.value, message=message))
            s.flush()
            self._roll_up_job(s, row.job_id, at)
            s.flush()
            return self._delivery(s, delivery_id)

    def _roll_up_job(self, s: Session, job_id: int, at: datetime) -> None:
        job = s.get(JobRow, job_id)
        if job is None or job.state not in (JobState.DELIVERING.value, JobState.REPORTED.value):
            return
        rows = list(
            s.scalars(
                select(DeliveryRow).where(DeliveryRow.job_id == job_id, DeliveryRow.version == job.version)
            )
        )
        if not rows or not all(DeliveryOutcome(r.outcome).is_final for r in rows):
            if job.state == JobState.REPORTED.value:
                self._transition(s, job, JobState.DELIVERING, None, None, at)
            return
        failed = [r for r in rows if r.outcome == DeliveryOutcome.PERMANENT_FAILURE.value]
        if failed:
            msg = "; ".join(
                f"delivery to {r.destination} failed: {r.message or 'permanent failure'}" for r in failed
            )
            self._transition(s, job, JobState.FAILED, msg, None, at)
        else:
            self._transition(s, job, JobState.DONE, f"delivered to {len(rows)} destination(s)", None, at)

    def resend_delivery(self, delivery_id: int, *, actor: str, now: datetime | None = None) -> Delivery:
        """Admin action: schedule a delivery again (whatever its outcome); the job goes back to DELIVERING.

        Raises
        ------
        NotFoundError
            No such delivery.
        InvalidTransitionError
            The job is being analysed again (re-run): its new result is sent once it is reported.
        """
        at = now or _now()
        with self._write() as s:
            row = s.get(DeliveryRow, delivery_id)
            if row is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            owner = s.get(JobRow, row.job_id)
            if owner is not None and owner.state in (JobState.PENDING.value, JobState.ANALYSING.value):
                raise InvalidTransitionError(
                    f"job {owner.id} is {owner.state}: its new result is delivered once it is reported"
                )
            before = {"outcome": row.outcome, "attempts": row.attempts}
            row.outcome = DeliveryOutcome.PENDING.value
            row.next_attempt_at = None
            row.updated_at = at
            job = s.get(JobRow, row.job_id)
            assert job is not None  # foreign key
            if job.state in (JobState.DONE.value, JobState.FAILED.value):
                self._transition(s, job, JobState.DELIVERING, f"resend to {row.destination}", actor, at)
            s.add(
                AuditRow(
                    at=at,
                    actor=actor,
                    action="delivery.resend",
                    target=f"delivery:{delivery_id}",
                    before=before,
                    after={"outcome": row.outcome},
                )
            )
            s.flush()
            return self._delivery(s, delivery_id)

    def delivery_attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        with self._read() as s:
            rows = s.scalars(
                select(DeliveryAttemptRow)
                .where(DeliveryAttemptRow.delivery_id == delivery_id)
                .order_by(DeliveryAttemptRow.id)
            )
            return [
                DeliveryAttempt(at=r.at, outcome=DeliveryOutcome(r.outcome), message=r.message) for r in rows
            ]

    def get_delivery(self, delivery_id: int) -> Delivery:
        with self._read() as s:
            return self._delivery(s, delivery_id)

    # -- scheduler lease ------------------------------------------------------------------------------

    def acquire_lease(
        self,
        name: str,
        owner: str,
        ttl: timedelta | float,
        *,
        take_from: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``now + ttl``; False while another holds it.

        One row per lease in ``scheduler_lease``. The lease goes to ``owner`` when nobody holds it, when
        ``owner`` holds it already (renewal), when the holder's lease expired (it died or hangs), or when
        the holder is ``take_from`` (the caller knows that process is dead, e.g. a pid of its own host that
        no longer exists). Atomic on both backends: PostgreSQL locks the row (``FOR UPDATE``), SQLite
        serialises writers.
        """
        at = now or _now()
        until = at + _seconds(ttl)

        def run() -> bool:
            with self._write() as s:
                q = select(SchedulerLeaseRow).where(SchedulerLeaseRow.name == name)
                if self._is_postgres:
                    q = q.with_for_update()
                row = s.scalar(q)
                if row is None:
                    s.add(SchedulerLeaseRow(name=name, owner=owner, acquired_at=at, expires_at=until))
                    s.flush()
                    log.info("lease %s taken by %s", name, owner)
                    return True
                if row.owner == owner:
                    row.expires_at = until
                    return True
                if row.expires_at <= at or (take_from is not None and row.owner == take_from):
                    log.warning("lease %s: taken over from %s by %s", name, row.owner, owner)
                    row.owner, row.acquired_at, row.expires_at = owner, at, until
                    return True
                return False

        return self._retry_integrity(run)

    def release_lease(self, name: str, owner: str) -> bool:
        """Give the lease up (graceful stop) so another process takes over at once; False if not held."""
        with self._write() as s:
            row = s.scalar(
                select(SchedulerLeaseRow).where(
                    SchedulerLeaseRow.name == name, SchedulerLeaseRow.owner == owner
                )
            )
            if row is None:
                return False
            s.delete(row)
            return True

    def lease_holder(self, name: str, *, now: datetime | None = None) -> str | None:
        """The owner of an unexpired lease ``name`` (for the health page), else None."""
        at = now or _now()
        with self._read() as s:
            row = s.get(SchedulerLeaseRow, name)
            return row.owner if row is not None and row.expires_at > at else None

    # -- audit and rule versions -----------------------------------------------------------------------

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
        *,
        now: datetime | None = None,
    ) -> int:
        """Append an audit event (who did what to which object, with before/after JSON); returns its id."""
        with self._write() as s:
            row = AuditRow(
                at=now or _now(),
                actor=actor,
                action=action,
                target=target,
                before=_jsonable_value(before),
                after=_jsonable_value(after),
            )
            s.add(row)
            s.flush()
            return row.id

    def list_audit(self, *, target: str | None = None, limit: int = 50, offset: int = 0) -> Page[AuditEvent]:
        with self._read() as s:
            q = select(AuditRow)
            if target is not None:
                q = q.where(AuditRow.target == target)
            total = _count(s, q)
            rows = s.scalars(q.order_by(AuditRow.id.desc()).limit(limit).offset(offset))
            items = tuple(
                AuditEvent(
                    id=r.id,
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    before=r.before,
                    after=r.after,
                )
                for r in rows
            )
            return Page(items, total, limit, offset)

    def add_rule_version(
        self, author: str, yaml_text: str, comment: str | None = None, *, now: datetime | None = None
    ) -> int:
        """Keep a version of the routing rules (the admin UI's history); returns its id."""
        with self._write() as s:
            row = RuleVersionRow(
                created_at=now or _now(), author=author, yaml_text=yaml_text, comment=comment
            )
            s.add(row)
            s.flush()
            return row.id

    def list_rule_versions(self, *, limit: int = 50, offset: int = 0) -> Page[RuleVersion]:
        with self._read() as s:
            q = select(RuleVersionRow)
            total = _count(s, q)
            rows = s.scalars(q.order_by(RuleVersionRow.id.desc()).limit(limit).offset(offset))
            return Page(tuple(_rule_version(r) for r in rows), total, limit, offset)

    def get_rule_version(self, version_id: int) -> RuleVersion:
        with self._read() as s:
            row = s.get(RuleVersionRow, version_id)
            if row is None:
                raise NotFoundError(f"no rule version {version_id}")
            return _rule_version(row)

    def latest_rule_version(self) -> RuleVersion | None:
        with self._read() as s:
            row = s.scalar(select(RuleVersionRow).order_by(RuleVersionRow.id.desc()).limit(1))
            return None if row is None else _rule_version(row)

    # -- queries for the UI / API ----------------------------------------------------------------------

    def list_studies(self, *, limit: int = 50, offset: int = 0) -> Page[Study]:
        """Studies, most recently received first."""
        with self._read() as s:
            q = select(StudyRow)
            total = _count(s, q)
            rows = list(
                s.scalars(
                    q.order_by(StudyRow.last_received_at.desc(), StudyRow.id.desc())
                    .limit(limit)
                    .offset(offset)
                )
            )
            return Page(tuple(self._study(s, r) for r in rows), total, limit, offset)

    def get_study(self, study_uid: str) -> Study:
        with self._read() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.study_instance_uid == study_uid))
            if row is None:
                raise NotFoundError(f"no study {study_uid}")
            return self._study(s, row)

    def list_series(self, *, study_uid: str | None = None, limit: int = 50, offset: int = 0) -> Page[Series]:
        """Series (of one study, or all), most recently received first."""
        with self._read() as s:
            q = select(SeriesRow, StudyRow.study_instance_uid).join(
                StudyRow, SeriesRow.study_id == StudyRow.id
            )
            if study_uid is not None:
                q = q.where(StudyRow.study_instance_uid == study_uid)
            total = _count(s, q)
            rows = s.execute(
                q.order_by(SeriesRow.last_received_at.desc(), SeriesRow.id.desc()).limit(limit).offset(offset)
            )
            return Page(tuple(_series(r, uid) for r, uid in rows.all()), total, limit, offset)

    def get_series(self, series_uid: str) -> Series:
        with self._read() as s:
            row = self._series_row(s, series_uid)
            return _series(row, self._study_uid(s, row.study_id))

    def list_jobs(
        self,
        *,
        state: JobState | Sequence[JobState] | None = None,
        study_uid: str | None = None,
        series_uid: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[Job]:
        """Jobs, newest first, optionally filtered."""
        with self._read() as s:
            q = (
                select(JobRow.id)
                .join(SeriesRow, JobRow.series_id == SeriesRow.id)
                .join(StudyRow, SeriesRow.study_id == StudyRow.id)
            )
            if state is not None:
                states = [state] if isinstance(state, JobState | str) else list(state)
                q = q.where(JobRow.state.in_([JobState(x).value for x in states]))
            if study_uid is not None:
                q = q.where(StudyRow.study_instance_uid == study_uid)
            if series_uid is not None:
                q = q.where(SeriesRow.series_instance_uid == series_uid)
            total = _count(s, q)
            ids = list(s.scalars(q.order_by(JobRow.id.desc()).limit(limit).offset(offset)))
            return Page(tuple(self._job(s, i) for i in ids), total, limit, offset)

    def job_detail(self, job_id: int) -> JobDetail:
        """A job with its timeline, result, deliveries and the routing decisions of its study."""
        with self._read() as s:
            job = self._job(s, job_id)
            events = tuple(
                JobEvent(
                    at=e.at,
                    from_state=JobState(e.from_state) if e.from_state else None,
                    to_state=JobState(e.to_state),
                    message=e.message,
                    actor=e.actor,
                )
                for e in s.scalars(
                    select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
                )
            )
            res = s.scalar(select(ResultRow).where(ResultRow.job_id == job_id))
            dids = list(
                s.scalars(select(DeliveryRow.id).where(DeliveryRow.job_id == job_id).order_by(DeliveryRow.id))
            )
            decisions = s.execute(
                select(DecisionRow, StudyRow.study_instance_uid)
                .join(StudyRow, DecisionRow.study_id == StudyRow.id)
                .where(StudyRow.study_instance_uid == job.study_instance_uid)
                .order_by(DecisionRow.decided_at.desc(), DecisionRow.id)
            ).all()
            return JobDetail(
                job=job,
                events=events,
                result=None if res is None else _result(res),
                deliveries=tuple(self._delivery(s, i) for i in dids),
                decisions=tuple(_decision(r, uid) for r, uid in decisions),
            )

    def list_deliveries(
        self,
        *,
        job_id: int | None = None,
        outcome: DeliveryOutcome | Sequence[DeliveryOutcome] | None = None,
        destination: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[Delivery]:
        """Deliveries, newest first, optionally filtered."""
        with self._read() as s:
            q = select(DeliveryRow.id)
            if job_id is not None:
                q = q.where(DeliveryRow.job_id == job_id)
            if outcome is not None:
                outs = [outcome] if isinstance(outcome, DeliveryOutcome | str) else list(outcome)
                q = q.where(DeliveryRow.outcome.in_([DeliveryOutcome(o).value for o in outs]))
            if destination is not None:
                q = q.where(DeliveryRow.destination == destination)
            total = _count(s, q)
            ids = list(s.scalars(q.order_by(DeliveryRow.id.desc()).limit(limit).offset(offset)))
            return Page(tuple(self._delivery(s, i) for i in ids), total, limit, offset)

    def job_counts(self) -> dict[JobState, int]:
        """Number of jobs per state (every state present, zeros included) - for metrics and the dashboard."""
        with self._read() as s:
            got = Counter(
                {
                    JobState(st): n
                    for st, n in s.execute(select(JobRow.state, func.count()).group_by(JobRow.state))
                }
            )
            return {st: got.get(st, 0) for st in JobState}

    def delivery_counts(self) -> dict[DeliveryOutcome, int]:
        with self._read() as s:
            got = {
                DeliveryOutcome(o): n
                for o, n in s.execute(select(DeliveryRow.outcome, func.count()).group_by(DeliveryRow.outcome))
            }
            return {o: got.get(o, 0) for o in DeliveryOutcome}

    def ping(self) -> bool:
        """True when the database answers (health checks)."""
        try:
            with self._read() as s:
                s.execute(select(1))
            return True
        except Exception:  # any driver error means "not healthy"; the caller reports, never raises
            log.warning("database ping failed", exc_info=True)
            return False

    # -- row -> record helpers -------------------------------------------------------------------------

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
            action=r.action,
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
