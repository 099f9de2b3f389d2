"""What the pipeline's steps share: the analysis request and outcome, the injected callables, worker ids,
the runner's counters and state (:class:`RunnerParts`)."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicomnode.domain import AnalysisStatus, PreviousReport, ResultFiles
from dicomnode.pipeline.rules_in_force import SelectFn

if TYPE_CHECKING:  # annotations only: `dicomnode analyze` imports this module and needs no database
    # (SQLAlchemy + Alembic take ~0.5 s to import) nor delivery code
    from dicomnode.config import Settings
    from dicomnode.delivery import DeliveryResult, RetryPolicy
    from dicomnode.store import Store

__all__ = [
    "TEMPORARY_FAILURE",
    "AnalysisOutcome",
    "AnalysisRequest",
    "AnalyzeFn",
    "DeliverFn",
    "RunnerParts",
    "RunnerStats",
    "make_worker_id",
    "now_utc",
    "temporary_failure",
    "worker_dead_here",
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
    #: The job's pipeline (the routing rule's ``pipeline``): "bmd", or "knee-xray" for knee radiographs.
    pipeline: str = "bmd"
    #: The patient's lab values (``dicomnode.store.labs.LabRecord``) for a knee job, and for every job when a
    #: fusion bundle is configured (``dicomnode.pipeline.fusion``); empty otherwise.
    lab_values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class AnalysisOutcome:
    """What the analysis step produced."""

    status: AnalysisStatus
    reason: str | None
    result_json: dict[str, Any]
    #: The files written, typed (SR, secondary captures, result.json, PNG): kept in the result record as
    #: they are; delivery sends ``outputs.dicom``.
    outputs: ResultFiles = field(default_factory=ResultFiles)


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


def worker_dead_here(worker_id: str | None) -> bool:
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


def now_utc() -> datetime:
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


class RunnerParts:
    """The state the steps of :class:`~dicomnode.pipeline.runner.Runner` share (set by its ``__init__``)."""

    settings: Settings
    store: Store
    analyze: AnalyzeFn
    select: SelectFn
    deliver: DeliverFn
    policy: RetryPolicy
    delivery_lease_s: float
    stale_job_s: float
    heartbeat_s: float
    on_jobs_created: Callable[[], None] | None
    results_dir: Path
    stats: RunnerStats
    _sending: set[int]
    _sending_lock: threading.Lock
    sweep_owner: str
    sweep_lease_s: float
    _lease_lock: threading.Lock
    _lease_held: bool
    _lease_checked: datetime | None


#: How a job message starts when its failure has a cause expected to pass (the disk was full, the process ran
#: out of file handles): the recovery sweep puts such a job back in the queue a while later
#: (:meth:`dicomnode.pipeline.sweeps.Sweeps.recover`), so it is analysed again once the cause is gone.
TEMPORARY_FAILURE = "temporary failure: "
_TEMPORARY_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files",
}


def temporary_failure(exc: BaseException) -> str | None:
    """The one-line job message for an error whose cause is expected to pass (disk full...), else None.

    The error itself or one it was raised from counts; the message names the cause only (no path, no
    traceback).
    """
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _TEMPORARY_ERRNOS:
            name = errno.errorcode.get(seen.errno, str(seen.errno))
            return f"{TEMPORARY_FAILURE}{_TEMPORARY_ERRNOS[seen.errno]} ({name}); retried automatically"
        seen = seen.__cause__ or seen.__context__
    return None
