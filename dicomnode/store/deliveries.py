"""Deliveries: one per job, destination and version; their attempts, retries and resends."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.domain import DeliveryOutcome, JobState
from dicomnode.store.base import (
    InvalidTransitionError,
    NotFoundError,
    StoreBase,
    _count,
    _now,
    _seconds,
)
from dicomnode.store.models import (
    AuditRow,
    DeliveryAttemptRow,
    DeliveryRow,
    JobRow,
)
from dicomnode.store.records import (
    Delivery,
    DeliveryAttempt,
    Page,
)

log = logging.getLogger(__name__)


class DeliveryStore(StoreBase):
    """Deliveries: one per job, destination and version; their attempts, retries and resends."""

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

    def delivery_counts(self) -> dict[DeliveryOutcome, int]:
        with self._read() as s:
            got = {
                DeliveryOutcome(o): n
                for o, n in s.execute(select(DeliveryRow.outcome, func.count()).group_by(DeliveryRow.outcome))
            }
            return {o: got.get(o, 0) for o in DeliveryOutcome}
