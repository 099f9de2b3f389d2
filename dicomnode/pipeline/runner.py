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
  (``retention.results_days``) of finished work are removed; the rows of removed instances go, the rest stay.

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

Each step lives in its own module, in the order of a job's life: :mod:`~dicomnode.pipeline.completion`
(completion and routing), :mod:`~dicomnode.pipeline.analysis_step` (claim, analyze, record),
:mod:`~dicomnode.pipeline.delivery_step` (send, retry), :mod:`~dicomnode.pipeline.sweeps` (recovery,
retention, the sweep lease); :class:`Runner` only puts them together over one store.

Nothing here creates threads, schedulers or network listeners (see :mod:`dicomnode.pipeline.scheduler` and
:mod:`dicomnode.pipeline.executors`); the analysis and the sending are injected callables so tests can run
the runner with trivial ones.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime

from dicomnode.config import Settings
from dicomnode.delivery import RetryPolicy
from dicomnode.delivery import deliver as default_deliver
from dicomnode.pipeline.analysis_step import AnalysisStep, link_inputs
from dicomnode.pipeline.completion import CompletionStep
from dicomnode.pipeline.jobs import (
    SWEEP_LEASE,
    AnalysisOutcome,
    AnalysisRequest,
    AnalyzeFn,
    DeliverFn,
    RunnerStats,
    make_worker_id,
)
from dicomnode.pipeline.rules_in_force import RulesInForce, SelectFn
from dicomnode.pipeline.sweeps import SweepStep
from dicomnode.store import Store

__all__ = [
    "SWEEP_LEASE",
    "AnalysisOutcome",
    "AnalysisRequest",
    "AnalyzeFn",
    "DeliverFn",
    "Runner",
    "SelectFn",
    "link_inputs",
    "make_worker_id",
]


class Runner(CompletionStep, AnalysisStep, SweepStep):
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
