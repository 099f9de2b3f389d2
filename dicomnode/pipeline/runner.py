"""The job runner: completion, routing, analysis, delivery and restart recovery, one idempotent step each.

The database is the truth; these steps only move work forward from what it says, so any of them may run
again after a crash without doing anything twice:

* :meth:`Runner.sweep_completion` - series quiet for long enough become complete; their study is routed
  (``dicomnode.routing.select``, decisions stored with reasons) and a job is created per selected series and
  version (``create_job`` is idempotent on series + pipeline + version).
* :meth:`Runner.run_next_job` - a worker claims a PENDING job (atomic), analyses the series' spooled files
  into ``<data_dir>/results/job-<id>/``, records the result, creates one delivery per destination (unique per
  job + destination + version) and sends them.
* :meth:`Runner.deliver_due` - deliveries whose time has come (first try, or retry after backoff) are sent;
  the outcome is recorded; transient failures are rescheduled with exponential backoff up to the maximum
  number of attempts, permanent ones stop at once (logged once, visible in the database).
* :meth:`Runner.recover` - jobs left ANALYSING by a worker that died go back to PENDING; REPORTED jobs get
  their deliveries.
* :meth:`Runner.sweep_retention` - spooled studies (``retention.spool_days``) and result folders
  (``retention.results_days``) of finished work are removed; the database rows stay.

A new version of a series (instances arrived after its analysis started) replaces the old results: its SR
gets new UIDs and names the SRs of the earlier versions that may have reached a destination in its
Predecessor Documents Sequence (:meth:`Runner.previous_reports`), so a PACS can tell which report is current.

Routing reads the rules in force at every routing decision: by default the newest rule version saved in the
database (the admin UI's Rules page or ``PUT /api/rules``, from any process: a split ``work`` process sees a
version saved through ``receive``'s UI), else the configured rules file, else the shipped defaults
(:class:`~dicomnode.pipeline.rules_in_force.RulesInForce`, shared with the admin UI).

One process owns the sweeps: :meth:`Runner.owns_sweeps` holds a lease row in the database
(``Store.acquire_lease``), renewed while the process lives; a second ``work`` process on the same database
skips the sweeps until the first one's lease expires (it died) or is released (graceful stop).

Nothing here creates threads, schedulers or network listeners (see :mod:`dicomnode.pipeline.scheduler` and
:mod:`dicomnode.pipeline.executors`); the analysis and the sending are injected callables so tests can run
the runner with trivial ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from dicomnode.config import Settings
from dicomnode.delivery import DeliveryResult, RetryPolicy
from dicomnode.delivery import deliver as default_deliver
from dicomnode.domain import (
    AnalysisStatus,
    DeliveryOutcome,
    JobState,
    PreviousReport,
)
from dicomnode.pipeline.rules_in_force import RulesInForce, SelectFn
from dicomnode.store import Delivery, InvalidTransitionError, Job, NotFoundError, Store

log = logging.getLogger(__name__)

__all__ = [
    "AnalysisOutcome",
    "AnalysisRequest",
    "AnalyzeFn",
    "DeliverFn",
    "Runner",
    "SelectFn",
    "make_worker_id",
]

#: Name of the lease row that says which process runs the sweeps.
SWEEP_LEASE = "sweeps"


@dataclass(frozen=True)
class AnalysisRequest:
    """What the analysis step of one job gets."""

    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    version: int
    #: A folder holding exactly the series' instances known to the database (symbolic links to the spool).
    input_dir: Path
    #: Where the outputs go (empty folder, private to this attempt).
    out_dir: Path
    #: Seeds the output UIDs: the same job and version always produce the same SR/SC UIDs.
    job_key: str
    disclaimer: str | None = None
    #: SRs of earlier versions of this series' analysis that this one replaces (empty for version 1).
    previous_reports: tuple[PreviousReport, ...] = ()
    #: Why routing selected this series (the recorded decision's reasons): the analysis step takes the
    #: series as chosen and evaluates no rule again.
    selection: tuple[str, ...] = ()


@dataclass(frozen=True)
class AnalysisOutcome:
    """What the analysis step produced."""

    status: AnalysisStatus
    reason: str | None
    result_json: dict[str, Any]
    #: DICOM files to deliver (SR first, then SC).
    dicom_files: tuple[Path, ...] = ()
    #: Every file written (result.json, DICOM, PNG), kept in the result record.
    files: tuple[Path, ...] = ()


#: The analysis of one series; must not raise for bad input (it returns a FAILED/NOT_QUALIFYING outcome).
AnalyzeFn = Callable[[AnalysisRequest], AnalysisOutcome]


class DeliverFn(Protocol):
    """Sends files to one destination once (``dicomnode.delivery.deliver``); never raises for peer errors."""

    def __call__(
        self, destination: Any, files: Sequence[Path], *, calling_ae_title: str
    ) -> DeliveryResult: ...


def make_worker_id(tag: str = "w") -> str:
    """``host:pid:tag``; recovery uses host and pid to tell a dead worker's jobs from a live one's."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _worker_dead_here(worker_id: str | None) -> bool:
    """True when ``worker_id`` names a process on this host that no longer exists."""
    if not worker_id:
        return False
    parts = worker_id.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    return pid != os.getpid() and not _pid_alive(pid)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunnerStats:
    """Counters of what this runner did (for logs, metrics and tests)."""

    routed_studies: int = 0
    jobs_created: int = 0
    jobs_analysed: int = 0
    deliveries_sent: int = 0
    deliveries_failed: int = 0
    jobs_recovered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Runner:
    """The steps of the node's pipeline over one :class:`~dicomnode.store.Store`.

    Parameters
    ----------
    settings
        Completion periods, destinations, retry policy and the data directory come from here.
    store
        The database (the only place job state changes).
    analyze
        The analysis step (see :func:`dicomnode.pipeline.executors.analyze_job` for the real one).
    select
        Routing for one study: the ``select`` of the node's
        :class:`~dicomnode.pipeline.rules_in_force.RulesInForce` (the newest rule version saved in the
        database, else the configured rules file, else the shipped rules; read at every routing call).
        Default: a provider of its own over ``store``.
    deliver
        Sends files to one destination (default: ``dicomnode.delivery.deliver``).
    delivery_lease_s
        While a delivery is being sent its next attempt is pushed this far ahead, so that no other sweep sends
        it at the same time; after a crash it is picked up again once the lease has run out
        (None: ``settings.workers.delivery_lease_seconds``).
    stale_job_s
        An ANALYSING job without heartbeat for this long is given back to PENDING (a worker on another host
        died); a worker of this host that no longer exists is detected at once
        (None: ``settings.workers.stale_job_seconds``).
    on_jobs_created
        Called after a sweep created jobs (wakes the local workers up).
    sweep_lease_s
        How long this runner's hold on the sweeps lasts without renewal; a second process takes the sweeps
        over that long after this one died (renewed every third of it while sweeping).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        analyze: AnalyzeFn,
        select: SelectFn | None = None,
        deliver: DeliverFn = default_deliver,
        delivery_lease_s: float | None = None,
        stale_job_s: float | None = None,
        heartbeat_s: float = 5.0,
        on_jobs_created: Callable[[], None] | None = None,
        sweep_lease_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.analyze = analyze
        self.select = select if select is not None else RulesInForce(store, settings).select
        self.deliver = deliver
        self.policy = RetryPolicy.from_settings(settings.delivery)
        w = settings.workers
        self.delivery_lease_s = delivery_lease_s if delivery_lease_s is not None else w.delivery_lease_seconds
        self.stale_job_s = stale_job_s if stale_job_s is not None else w.stale_job_seconds
        self.heartbeat_s = heartbeat_s
        self.on_jobs_created = on_jobs_created
        self.results_dir = settings.data_dir / "results"
        self.stats = RunnerStats()
        # Deliveries being sent by this process: the sweep never sends one twice at the same time here,
        # whatever the lease says.
        self._sending: set[int] = set()
        self._sending_lock = threading.Lock()
        # Sweep ownership: unique per runner (two runners of one process are two candidates).
        self.sweep_owner = f"{make_worker_id('sweeps')}:{uuid.uuid4().hex[:8]}"
        self.sweep_lease_s = sweep_lease_s
        self._lease_lock = threading.Lock()
        self._lease_held = False
        self._lease_checked: datetime | None = None

    # -- sweep ownership --------------------------------------------------------------------------------

    def owns_sweeps(self, now: datetime | None = None) -> bool:
        """True when this runner may run the sweeps now (takes, renews or waits for the lease).

        The database is asked at most every third of ``sweep_lease_s`` (the sweeps tick every second or
        two); in between the last answer stands, which is safe because a held lease lasts ``sweep_lease_s``.
        """
        now = now or _now()
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
                    if holder is not None and _worker_dead_here(holder):
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

    # -- completion and routing ------------------------------------------------------------------------

    def sweep_completion(self, now: datetime | None = None) -> list[int]:
        """Complete the series that have been quiet long enough, route their studies, create the jobs.

        Returns
        -------
        list of int
            Ids of the jobs this sweep created (or found already created: the step is idempotent).
        """
        now = now or _now()
        c = self.settings.completion
        ready = self.store.series_ready_for_completion(
            now, c.series_quiet_seconds, c.study_quiet_seconds, c.max_wait_seconds
        )
        studies: dict[str, list[str]] = {}
        for series in ready:
            studies.setdefault(series.study_instance_uid, []).append(series.series_instance_uid)
        jobs: list[int] = []
        for study_uid, series_uids in studies.items():
            # Jobs first, "complete" second: a crash in between only means routing runs again (idempotent),
            # never a complete series without its job.
            jobs.extend(self.route_study(study_uid, now=now, ready=frozenset(series_uids)))
            for uid in series_uids:
                done = self.store.mark_series_complete(uid, now=now)
                log.info("series %s complete (%d instances, version %d)", uid, done.n_instances, done.version)
        if jobs and self.on_jobs_created is not None:
            self.on_jobs_created()
        return jobs

    def route_study(
        self, study_uid: str, now: datetime | None = None, ready: frozenset[str] = frozenset()
    ) -> list[int]:
        """Route one study: decisions (with reasons) recorded, one job per selected complete series.

        ``ready`` names series that count as complete although not marked so yet (the sweep marks them once
        their jobs exist).
        """
        now = now or _now()
        summaries = self.store.series_summaries(study_uid)
        decisions = list(self.select(summaries))
        self.store.record_decisions(study_uid, decisions, now=now)
        self.stats.add("routed_studies")
        jobs: list[int] = []
        for d in decisions:
            if not d.selected or d.action != "analyse":
                log.debug("series %s not analysed: %s", d.series_instance_uid, "; ".join(d.reasons[-2:]))
                continue
            series = self.store.get_series(d.series_instance_uid)
            if series.completed_at is None and series.series_instance_uid not in ready:
                continue  # its own completion routes the study again
            destinations = d.destinations or self.settings.destination_names
            job_id = self.store.create_job(
                series.series_instance_uid, d.pipeline or "bmd", list(destinations), series.version, now=now
            )
            if series.version > 1:
                # Instances arrived after analysis started: the new version replaces the old results.
                self.store.supersede(
                    series.series_instance_uid,
                    below_version=series.version,
                    message=f"series re-opened: replaced by version {series.version} (job {job_id})",
                    now=now,
                )
            jobs.append(job_id)
            self.stats.add("jobs_created")
            log.info(
                "study %s: series %s selected by rule %s -> job %d (v%d)",
                study_uid,
                series.series_instance_uid,
                d.rule,
                job_id,
                series.version,
            )
        return jobs

    # -- analysis ---------------------------------------------------------------------------------------

    def run_next_job(self, worker_id: str) -> int | None:
        """Claim the oldest PENDING job and carry it through analysis and delivery.

        Returns
        -------
        int or None
            The id of the job handled, None when there was nothing to do.
        """
        job = self.store.claim_next_job(worker_id)
        if job is None:
            return None
        self.run_claimed_job(job, worker_id)
        return job.id

    def run_claimed_job(self, job: Job, worker_id: str) -> None:
        """Analyse a job this worker holds (ANALYSING), record the outcome, deliver (raises on DB errors)."""
        log.info(
            "job %d: analysing series %s v%d (%s)", job.id, job.series_instance_uid, job.version, worker_id
        )
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, stop), name=f"heartbeat-{job.id}")
        beat.daemon = True
        beat.start()
        try:
            outcome = self._analyse(job)
        finally:
            stop.set()
            beat.join(timeout=5)
        self.stats.add("jobs_analysed")
        try:
            self._record_outcome(job, outcome, worker_id)
        except InvalidTransitionError as exc:
            # Superseded (or reset by an admin) while we were busy: our result is no longer wanted.
            log.info("job %d: result dropped, the job moved on meanwhile (%s)", job.id, exc)
            return
        except NotFoundError as exc:
            log.warning("job %d: gone while analysing (%s)", job.id, exc)
            return
        self.deliver_job(job.id)

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.store.heartbeat(job_id)
            except Exception as exc:  # a missed beat only risks a needless reset; keep analysing
                log.warning("job %d: heartbeat failed: %s", job_id, exc)

    def _analyse(self, job: Job) -> AnalysisOutcome:
        attempt_dir = self.results_dir / f"job-{job.id}" / f"v{job.version}-attempt{job.attempts}"
        try:
            input_dir = attempt_dir / "input"
            out_dir = attempt_dir / "out"
            if attempt_dir.exists():  # same attempt number again: only after a crash mid-claim
                shutil.rmtree(attempt_dir)
            input_dir.mkdir(parents=True)
            out_dir.mkdir(parents=True)
            instances = self.store.instances(job.series_instance_uid)
            missing = link_inputs([i.path for i in instances], input_dir)
            if missing:
                log.warning("job %d: %d spooled file(s) missing", job.id, missing)
            request = AnalysisRequest(
                job_id=job.id,
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
                version=job.version,
                input_dir=input_dir,
                out_dir=out_dir,
                job_key=f"{job.series_instance_uid}/{job.pipeline}",
                disclaimer=self.settings.analysis.disclaimer,
                previous_reports=self.previous_reports(job),
                selection=self.selection(job),
            )
            return self.analyze(request)
        except Exception as exc:  # a bug in a step must fail the job, not the worker
            log.exception("job %d: analysis step crashed", job.id)
            return AnalysisOutcome(
                AnalysisStatus.FAILED, f"internal error ({type(exc).__name__}: {exc})", {"status": "failed"}
            )

    def selection(self, job: Job) -> tuple[str, ...]:
        """The reasons of the newest recorded routing decision that selected ``job``'s series."""
        for stored in self.store.decisions(job.study_instance_uid):  # newest first
            d = stored.decision
            if d.series_instance_uid == job.series_instance_uid and d.selected and d.action == "analyse":
                rule = f"rule {d.rule}" if d.rule else "rule"
                return (f"{rule}, rank {d.rank or 1} (routing of the rules in force)", *d.reasons)
        return ()

    def previous_reports(self, job: Job) -> tuple[PreviousReport, ...]:
        """The SRs of earlier versions of ``job``'s series and pipeline that its new SR replaces.

        An earlier version counts when its analysis wrote an SR and one of its deliveries succeeded or
        may still be under way (a PACS may hold that SR). A version superseded before its SR went anywhere
        is left out: no destination holds it, so nothing there needs to be marked as replaced.

        Returns
        -------
        tuple of PreviousReport
            Newest version first; empty for version 1.
        """
        if job.version <= 1:
            return ()
        out: list[PreviousReport] = []
        earlier = self.store.list_jobs(series_uid=job.series_instance_uid, limit=1000).items
        for old in earlier:  # newest first
            if old.pipeline != job.pipeline or old.version >= job.version:
                continue
            result = self.store.get_result(old.id)
            sr = next((str(f) for f in (result.files if result else ()) if Path(f).name == "sr.dcm"), None)
            if sr is None:
                continue
            deliveries = self.store.list_deliveries(job_id=old.id, limit=1000).items
            if any(
                d.version == old.version and (d.outcome is DeliveryOutcome.SUCCESS or not d.outcome.is_final)
                for d in deliveries
            ):
                out.append(PreviousReport(version=old.version, sr_path=sr))
        if out:
            log.info(
                "job %d (v%d): replaces the SR of version(s) %s",
                job.id,
                job.version,
                ", ".join(str(p.version) for p in out),
            )
        return tuple(out)

    def _record_outcome(self, job: Job, outcome: AnalysisOutcome, worker_id: str) -> None:
        self.store.record_result(job.id, outcome.result_json, list(outcome.files))
        if outcome.status is AnalysisStatus.OK and outcome.dicom_files:
            self.store.set_job_state(job.id, JobState.REPORTED, actor=worker_id)
            self.store.create_deliveries(job.id, job.destinations)
            log.info("job %d: reported (%d DICOM file(s))", job.id, len(outcome.dicom_files))
        elif outcome.status is AnalysisStatus.NOT_QUALIFYING:
            self.store.set_job_state(job.id, JobState.NOT_QUALIFYING, outcome.reason, actor=worker_id)
            log.info("job %d: not qualifying: %s", job.id, outcome.reason)
        else:
            reason = outcome.reason or "analysis produced no DICOM output"
            self.store.set_job_state(job.id, JobState.FAILED, reason, actor=worker_id)
            log.warning("job %d: analysis failed: %s", job.id, reason)

    # -- delivery ---------------------------------------------------------------------------------------

    def deliver_job(self, job_id: int) -> None:
        """Send the deliveries due now, right after a job was reported (retries are left to the sweep).

        Goes through :meth:`deliver_due` so the deliveries are leased like any other: no other process's
        sweep sends them at the same time.
        """
        n = self.deliver_due()
        log.debug("job %d: %d delivery attempt(s) made", job_id, n)

    def deliver_due(self, now: datetime | None = None, limit: int = 50) -> int:
        """Send the deliveries that are due (first attempts and retries); returns how many were attempted."""
        now = now or _now()
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
        files = [Path(f) for f in (result_row.files if result_row else ()) if str(f).endswith(".dcm")]
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
        next_at = _now() + timedelta(seconds=delay) if delay is not None else None
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

    # -- recovery ---------------------------------------------------------------------------------------

    def recover(self, now: datetime | None = None) -> list[int]:
        """Give the jobs of dead workers back and finish interrupted steps; returns the ids of jobs touched.

        * ANALYSING jobs of a worker process of this host that no longer exists go back to PENDING at once;
          those not updated (heartbeat) for ``stale_job_s`` go back too (a worker on another host died).
        * REPORTED jobs (stopped between recording the result and creating deliveries) get their deliveries.
        """
        now = now or _now()
        touched: list[int] = []
        for job in self.store.unfinished_jobs():
            if job.state is JobState.ANALYSING and _worker_dead_here(job.worker_id):
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
        if touched:
            self.stats.add("jobs_recovered", len(touched))
            log.warning("recovery: resumed job(s) %s", ", ".join(map(str, touched)))
        if self.on_jobs_created is not None and (
            touched or self.store.list_jobs(state=JobState.PENDING, limit=1).total
        ):
            # Also for jobs left PENDING by a wake that did not reach a worker (a broker that was down).
            self.on_jobs_created()
        return touched

    # -- retention --------------------------------------------------------------------------------------

    def sweep_retention(self, now: datetime | None = None) -> tuple[int, int]:
        """The retention sweep: :meth:`clean_spool`, then :meth:`clean_results`.

        Returns
        -------
        tuple of int
            Spooled study folders removed, job result folders removed.
        """
        now = now or _now()
        return self.clean_spool(now=now), self.clean_results(now=now)

    def clean_spool(self, now: datetime | None = None) -> int:
        """Remove spooled study folders older than ``retention.spool_days`` whose jobs are all final.

        The database rows stay (the history remains visible); only the received files go. Returns the number
        of study folders removed.
        """
        days = self.settings.retention.spool_days
        if days <= 0:
            return 0
        now = now or _now()
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
                log.info("retention: removed spooled study %s", study_dir.name)
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
        now = now or _now()
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


def link_inputs(paths: Sequence[Path], folder: Path) -> int:
    """Link ``paths`` into ``folder`` (copy where links are impossible); returns how many are missing."""
    missing = 0
    for i, src in enumerate(paths):
        if not src.is_file():
            missing += 1
            continue
        dst = folder / f"{i:06d}_{src.name}"
        try:
            dst.symlink_to(src.resolve())
        except OSError:
            shutil.copy2(src, dst)
    return missing
