"""The sweeps, on an APScheduler 3.x ``BackgroundScheduler``: completion, deliveries, recovery, retention.

The scheduler only wakes steps up; the database says what is to be done, so a missed or doubled tick is
harmless. Each sweep runs at most once at a time (``max_instances=1``, ``coalesce``). One process owns the
sweeps (``serve`` or ``work``; ``receive`` has none): every tick first asks :meth:`Runner.owns_sweeps`, which
holds a lease row in the database, so a second ``work`` process on the same database idles until the first
one's lease runs out (it died) or is released (it stopped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicomnode.pipeline.runner import Runner

log = logging.getLogger(__name__)

__all__ = ["SweepIntervals", "build_scheduler"]


@dataclass(frozen=True)
class SweepIntervals:
    """Seconds between two runs of each sweep."""

    completion_s: float = 1.0
    deliveries_s: float = 2.0
    recovery_s: float = 15.0
    retention_s: float = 6 * 3600.0


def _guarded(name: str, fn: Callable[[], Any], gate: Callable[[], bool] | None = None) -> Callable[[], None]:
    def run() -> None:
        try:
            if gate is not None and not gate():
                return  # another process owns the sweeps
            fn()
        except Exception:  # one failed tick (database busy...) must not stop the sweep
            log.exception("sweep %s failed", name)

    run.__name__ = f"sweep_{name}"
    return run


def build_scheduler(runner: Runner, intervals: SweepIntervals | None = None) -> Any:
    """A ``BackgroundScheduler`` (not started) with the node's sweeps.

    Parameters
    ----------
    runner
        The steps to run.
    intervals
        Sweep periods (defaults: completion 1 s, deliveries 2 s, recovery 15 s, retention 6 h).

    Returns
    -------
    apscheduler.schedulers.background.BackgroundScheduler
        Call ``start()`` then ``shutdown()``; recovery also runs once right at start.
    """
    from apscheduler.schedulers.background import BackgroundScheduler

    iv = intervals or SweepIntervals()
    sched = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    jobs: list[tuple[str, Callable[[], Any], float]] = [
        ("completion", runner.sweep_completion, iv.completion_s),
        ("deliveries", runner.deliver_due, iv.deliveries_s),
        ("recovery", runner.recover, iv.recovery_s),
        ("retention", runner.sweep_retention, iv.retention_s),
    ]
    for name, fn, seconds in jobs:
        sched.add_job(_guarded(name, fn, runner.owns_sweeps), "interval", seconds=seconds, id=name, name=name)
    return sched
