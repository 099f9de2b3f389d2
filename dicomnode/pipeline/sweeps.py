"""Retention and recovery: spooled studies and result folders of finished work are removed after their
retention period (with the rows of the removed instances; study, series, job and delivery rows stay); the
jobs of dead workers go back to PENDING and interrupted steps are finished; one process holds the lease that
lets it run these sweeps."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from dicomnode.domain import JobState
from dicomnode.pipeline.jobs import (
    SWEEP_LEASE,
    TEMPORARY_FAILURE,
    RunnerParts,
    now_utc,
    worker_dead_here,
)
from dicomnode.store import InvalidTransitionError, Job, NotFoundError

log = logging.getLogger(__name__)

#: Seconds after a temporary failure before the job is tried again, and the attempts it may take in all.
TEMPORARY_RETRY_S = 60.0
TEMPORARY_MAX_ATTEMPTS = 10


class SweepStep(RunnerParts):
    """The sweep lease (:meth:`owns_sweeps`), :meth:`recover` and the retention sweep of the runner."""

    def owns_sweeps(self, now: datetime | None = None) -> bool:
        """True when this runner may run the sweeps now (takes, renews or waits for the lease).

        The database is asked at most every third of ``sweep_lease_s`` (the sweeps tick every second or
        two); in between the last answer stands, which is safe because a held lease lasts ``sweep_lease_s``.
        """
        now = now or now_utc()
        with self._lease_lock:
            fresh = self._lease_checked is not None and (now - self._lease_checked) < timedelta(
                seconds=self.sweep_lease_s / 3
            )
            if fresh:
                return self._lease_held
            try:
                held = self.store.acquire_lease(SWEEP_LEASE, self.sweep_owner, self.sweep_lease_s, now=now)
                if not held:
                    # The holder may be a process of this host that is gone (a crashed 'serve' restarted):
                    # no need to wait for its lease to run out.
                    holder = self.store.lease_holder(SWEEP_LEASE, now=now)
                    if holder is not None and worker_dead_here(holder):
                        held = self.store.acquire_lease(
                            SWEEP_LEASE, self.sweep_owner, self.sweep_lease_s, take_from=holder, now=now
                        )
            except Exception:  # database busy or down: do not sweep on a lease we could not renew
                log.warning("sweep lease: could not reach the database", exc_info=True)
                held = False
            if held != self._lease_held:
                log.info("sweeps: %s %s", self.sweep_owner, "owns the sweeps" if held else "lost the sweeps")
            self._lease_held, self._lease_checked = held, now
            return held

    def release_sweeps(self) -> None:
        """Give the sweeps up (graceful stop): another process takes them over at its next tick."""
        with self._lease_lock:
            if self._lease_held:
                try:
                    self.store.release_lease(SWEEP_LEASE, self.sweep_owner)
                except Exception:  # stopping anyway; the lease then simply expires
                    log.warning("sweep lease: release failed", exc_info=True)
            self._lease_held, self._lease_checked = False, None

    def recover(self, now: datetime | None = None) -> list[int]:
        """Give the jobs of dead workers back and finish interrupted steps; returns the ids of jobs touched.

        * ANALYSING jobs of a worker process of this host that no longer exists go back to PENDING at once;
          those not updated (heartbeat) for ``stale_job_s`` go back too (a worker on another host died).
        * REPORTED jobs (stopped between recording the result and creating deliveries) get their deliveries.
        * FAILED jobs whose failure was temporary (:data:`~dicomnode.pipeline.jobs.TEMPORARY_FAILURE`: the
          disk was full...) go back to PENDING ``TEMPORARY_RETRY_S`` after failing, up to
          ``TEMPORARY_MAX_ATTEMPTS`` attempts: analysed again once the cause is gone.
        """
        now = now or now_utc()
        touched: list[int] = []
        for job in self.store.unfinished_jobs():
            if job.state is JobState.ANALYSING and worker_dead_here(job.worker_id):
                try:
                    self.store.set_job_state(
                        job.id, JobState.PENDING, f"reset: worker {job.worker_id} stopped", actor="recovery"
                    )
                    touched.append(job.id)
                except InvalidTransitionError:
                    pass
            elif job.state is JobState.REPORTED:
                self.store.create_deliveries(job.id, job.destinations)
                touched.append(job.id)
        stale = self.store.reset_stale_jobs(now - timedelta(seconds=self.stale_job_s), now=now)
        touched.extend(stale)
        touched.extend(
            self.store.retry_temporary_failures(
                TEMPORARY_FAILURE,
                now - timedelta(seconds=TEMPORARY_RETRY_S),
                max_attempts=TEMPORARY_MAX_ATTEMPTS,
                now=now,
            )
        )
        if touched:
            self.stats.add("jobs_recovered", len(touched))
            log.warning("recovery: resumed job(s) %s", ", ".join(map(str, touched)))
        if self.on_jobs_created is not None and (
            touched or self.store.list_jobs(state=JobState.PENDING, limit=1).total
        ):
            # Also for jobs left PENDING by a wake that did not reach a worker (a broker that was down).
            self.on_jobs_created()
        return touched

    def sweep_retention(self, now: datetime | None = None) -> tuple[int, int]:
        """The retention sweep: :meth:`clean_spool`, then :meth:`clean_results`.

        Returns
        -------
        tuple of int
            Spooled study folders removed, job result folders removed.
        """
        now = now or now_utc()
        return self.clean_spool(now=now), self.clean_results(now=now)

    def clean_spool(self, now: datetime | None = None) -> int:
        """Remove spooled study folders older than ``retention.spool_days`` whose jobs are all final.

        The received files go, and the rows of those instances with them (a row never points at a file that
        is gone); the study, series, job and delivery rows stay (the history remains visible). Returns the
        number of study folders removed.
        """
        days = self.settings.retention.spool_days
        if days <= 0:
            return 0
        now = now or now_utc()
        cutoff = (now - timedelta(days=days)).timestamp()
        spool = self.settings.spool_dir
        removed = 0
        for base in (spool, spool / "ignored"):
            if not base.is_dir():
                continue
            for study_dir in base.iterdir():
                if not study_dir.is_dir() or study_dir.name.startswith(".") or study_dir.name == "ignored":
                    continue
                newest = max((p.stat().st_mtime for p in study_dir.rglob("*") if p.is_file()), default=0.0)
                if newest > cutoff:
                    continue
                jobs = self.store.list_jobs(study_uid=study_dir.name, limit=1000).items
                if any(not j.state.is_final for j in jobs):
                    continue
                shutil.rmtree(study_dir, ignore_errors=True)
                removed += 1
                # The rows of those instances go with their files (a row must not point at nothing); the
                # study, series and job rows stay as history.
                try:
                    forgotten = self.store.forget_instances(study_dir.name, study_dir)
                except Exception:  # the folder is gone either way: say so, keep sweeping
                    log.exception("retention: could not delete the instance rows of study %s", study_dir.name)
                    forgotten = 0
                log.info("retention: removed spooled study %s (%d instance rows)", study_dir.name, forgotten)
        return removed

    def clean_results(self, now: datetime | None = None) -> int:
        """Remove the result folders (``<data_dir>/results/job-<id>/``) of finished jobs older than
        ``retention.results_days``.

        A folder goes only when its job is final (done, failed, not qualifying, superseded), every delivery
        of the job is final (sent, or failed permanently and not resent since), and neither the job, nor its
        deliveries, nor any file in the folder changed within the retention period. The database rows stay:
        the job, its result (``result.json`` content) and its delivery history remain visible; the admin UI
        says the overlay images were removed, and a resend is refused with the reason (re-run the job).
        Folders the database does not know as a job are never touched.

        Returns
        -------
        int
            The number of job result folders removed.
        """
        days = self.settings.retention.results_days
        if days <= 0 or not self.results_dir.is_dir():
            return 0
        now = now or now_utc()
        cutoff = now - timedelta(days=days)
        removed = 0
        for job_dir in sorted(self.results_dir.iterdir()):
            m = re.fullmatch(r"job-(\d+)", job_dir.name)
            if m is None or job_dir.is_symlink() or not job_dir.is_dir():
                continue
            try:
                job = self.store.get_job(int(m.group(1)))
            except NotFoundError:
                continue
            if not self._results_expired(job, cutoff):
                continue
            # Only what is there now goes: an admin re-run starting meanwhile writes a new attempt folder.
            entries = list(job_dir.iterdir())
            newest = max((_newest_mtime(p) for p in entries), default=0.0)
            if newest > cutoff.timestamp():
                continue
            try:
                if not self._results_expired(self.store.get_job(job.id), cutoff):
                    continue  # the job moved on while we looked
            except NotFoundError:
                continue
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)  # input links go, never what they point to
                else:
                    entry.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a new attempt folder appeared meanwhile: it stays
                job_dir.rmdir()
            removed += 1
            log.info(
                "retention: removed the result files of job %d (v%d, %s)", job.id, job.version, job.state
            )
        return removed

    def _results_expired(self, job: Job, cutoff: datetime) -> bool:
        """True when ``job`` and its deliveries are final and unchanged since ``cutoff``."""
        if not job.state.is_final or job.updated_at > cutoff:
            return False
        deliveries = self.store.list_deliveries(job_id=job.id, limit=1000).items
        return all(d.outcome.is_final and d.updated_at <= cutoff for d in deliveries)


def _newest_mtime(path: Path) -> float:
    """The newest modification time under ``path`` (links themselves, never their targets)."""
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            try:
                newest = max(newest, p.lstat().st_mtime)
            except OSError:
                continue
    return newest
