"""Delivery: the deliveries of a reported job, and those due again after a backoff, are sent and their outcome
recorded (transient failures rescheduled with exponential backoff, permanent ones stop at once)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

from dicomnode.delivery import DeliveryResult
from dicomnode.domain import DeliveryOutcome, JobState
from dicomnode.pipeline.jobs import RunnerParts, now_utc
from dicomnode.store import Delivery

log = logging.getLogger(__name__)


class DeliveryStep(RunnerParts):
    """:meth:`deliver_job`, :meth:`deliver_due` and :meth:`deliver_one` of the runner."""

    def deliver_job(self, job_id: int, now: datetime | None = None) -> int:
        """Send the due deliveries of job ``job_id`` (only that job's), right after it was reported.

        The deliveries are leased like any other (no other process's sweep sends them at the same time);
        retries are left to :meth:`deliver_due`. Returns how many were attempted.
        """
        now = now or now_utc()
        due = self.store.due_deliveries(now, limit=100, lease=self.delivery_lease_s, job_id=job_id)
        n = sum(1 for d in due if self.deliver_one(d))
        log.debug("job %d: %d delivery attempt(s) made", job_id, n)
        return n

    def deliver_due(self, now: datetime | None = None, limit: int = 50) -> int:
        """Send the deliveries that are due (first attempts and retries); returns how many were attempted."""
        now = now or now_utc()
        due = self.store.due_deliveries(now, limit=limit, lease=self.delivery_lease_s)
        n = 0
        for d in due:
            if self.deliver_one(d):
                n += 1
        return n

    def deliver_one(self, delivery: Delivery) -> bool:
        """One attempt of one delivery, outcome recorded; False when it was already being sent here."""
        with self._sending_lock:
            if delivery.id in self._sending:
                return False
            self._sending.add(delivery.id)
        try:
            self._deliver_one(delivery)
        finally:
            with self._sending_lock:
                self._sending.discard(delivery.id)
        return True

    def _deliver_one(self, delivery: Delivery) -> None:
        # Re-read: another process may have finished it since the sweep listed it.
        current = self.store.get_delivery(delivery.id)
        if current.outcome.is_final:
            return
        job = self.store.get_job(current.job_id)
        if job.state is JobState.SUPERSEDED or job.version != current.version:
            self.store.record_delivery_attempt(
                current.id, DeliveryOutcome.PERMANENT_FAILURE, "not sent: the job was superseded"
            )
            return
        try:
            destination = self.settings.destination(current.destination)
        except KeyError:
            msg = f"destination {current.destination!r} is not configured"
            log.error("delivery %d (job %d): %s", current.id, job.id, msg)
            self.store.record_delivery_attempt(current.id, DeliveryOutcome.PERMANENT_FAILURE, msg)
            return
        result_row = self.store.get_result(job.id)
        files = [Path(f) for f in (result_row.outputs.dicom if result_row else ())]
        missing = [f for f in files if not f.is_file()]
        if not files or missing:
            msg = f"result files missing ({len(missing)} of {len(files)}); re-run the job"
            log.error("delivery %d (job %d): %s", current.id, job.id, msg)
            self.store.record_delivery_attempt(current.id, DeliveryOutcome.PERMANENT_FAILURE, msg)
            return
        t0 = time.perf_counter()
        try:
            result = self.deliver(destination, files, calling_ae_title=self.settings.dicom.ae_title)
        except Exception as exc:  # deliver() should not raise; if it does, treat it as transient
            log.exception("delivery %d: sender crashed", current.id)
            result = DeliveryResult(
                current.destination, DeliveryOutcome.RETRYING, f"{type(exc).__name__}: {exc}"
            )
        attempt = current.attempts + 1
        outcome, delay = self.policy.decide(result, attempt)
        next_at = now_utc() + timedelta(seconds=delay) if delay is not None else None
        message = result.message
        if outcome is DeliveryOutcome.PERMANENT_FAILURE and result.outcome is DeliveryOutcome.RETRYING:
            message = f"gave up after {attempt} attempts: {result.message}"
        self.store.record_delivery_attempt(current.id, outcome, message, next_attempt_at=next_at)
        dt = time.perf_counter() - t0
        if outcome is DeliveryOutcome.SUCCESS:
            self.stats.add("deliveries_sent")
            log.info(
                "delivery %d: job %d v%d sent to %s in %.2f s",
                current.id,
                job.id,
                job.version,
                current.destination,
                dt,
            )
        elif outcome is DeliveryOutcome.RETRYING:
            log.warning(
                "delivery %d to %s failed (attempt %d, retry in %.0f s): %s",
                current.id,
                current.destination,
                attempt,
                delay or 0.0,
                result.message,
            )
        else:
            # Logged once: a permanent failure is never retried automatically.
            self.stats.add("deliveries_failed")
            log.error(
                "delivery %d to %s failed permanently (job %d): %s",
                current.id,
                current.destination,
                job.id,
                message,
            )
