"""Jobs and results: the life of one analysis job, from PENDING to a final state, and what it produced."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, select, update

from dicomnode.domain import JobState
from dicomnode.store.base import (
    RERUNNABLE_STATES,
    InvalidTransitionError,
    NotFoundError,
    StoreBase,
    _count,
    _decision,
    _now,
    _result,
)
from dicomnode.store.models import (
    AuditRow,
    DecisionRow,
    DeliveryRow,
    JobEventRow,
    JobRow,
    ResultRow,
    SeriesRow,
    StudyRow,
)
from dicomnode.store.records import (
    Job,
    JobDetail,
    JobEvent,
    Page,
)

log = logging.getLogger(__name__)


class JobStore(StoreBase):
    """Jobs and results: the life of one analysis job, from PENDING to a final state, and what it produced."""

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

    def retry_temporary_failures(
        self, prefix: str, older_than: datetime, *, max_attempts: int, now: datetime | None = None
    ) -> list[int]:
        """FAILED jobs whose message starts with ``prefix`` (a temporary cause), failed before ``older_than``
        and tried fewer than ``max_attempts`` times, go back to PENDING; returns their ids."""
        at = now or _now()
        with self._write() as s:
            rows = list(
                s.scalars(
                    select(JobRow).where(
                        JobRow.state == JobState.FAILED.value,
                        JobRow.message.startswith(prefix, autoescape=True),
                        JobRow.updated_at < older_than,
                        JobRow.attempts < max_attempts,
                    )
                )
            )
            for row in rows:
                msg = f"retry after a {(row.message or '')[:200]}"
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

    def analysis_durations(self, limit: int = 20000) -> list[float]:
        """Seconds each finished analysis took (ANALYSING -> REPORTED / NOT_QUALIFYING / FAILED), newest
        first, from the last ``limit`` job events (the analysis-duration histogram of the metrics)."""
        e = JobEventRow
        q = (
            select(e.job_id, e.at, e.from_state, e.to_state)
            .where(or_(e.to_state == "analysing", e.from_state == "analysing"))
            .order_by(e.id.desc())
            .limit(limit)
        )
        with self._read() as s:
            rows = s.execute(q).all()
        done = ("reported", "not_qualifying", "failed")
        ends: dict[int, datetime] = {}
        out: list[float] = []
        for job_id, at, from_state, to_state in rows:  # newest first: an end, then its start
            if from_state == "analysing" and to_state in done:
                ends[job_id] = at
            elif to_state == "analysing" and job_id in ends:
                out.append(max(0.0, (ends.pop(job_id) - at).total_seconds()))
        return out
