"""Admin actions behind the buttons: re-run a job, resend deliveries, test a destination.

Thin adapters over the store and the delivery module, each audited (who, what, before, after). The
pipeline picks the effects up on its own: a re-run job is PENDING again (a worker claims it), a resent
delivery is PENDING again (the delivery sweep sends it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.config import Settings
from dicomnode.domain import DeliveryOutcome, JobState
from dicomnode.store import RERUNNABLE_STATES, Delivery, InvalidTransitionError, Job, Store

log = logging.getLogger(__name__)

__all__ = ["RERUNNABLE", "Actions", "ProbeResult", "ResultFilesRemovedError"]

#: States from which an admin may re-run a job (the store decides: :data:`dicomnode.store.RERUNNABLE_STATES`).
RERUNNABLE: frozenset[JobState] = RERUNNABLE_STATES


class ResultFilesRemovedError(InvalidTransitionError):
    """A resend was asked for a delivery whose result files are gone (``retention.results_days``)."""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a destination test (C-ECHO or DICOMweb probe)."""

    destination: str
    ok: bool
    message: str
    elapsed_s: float


#: ``(destination entry, calling AE title) -> object with ok, message, elapsed_s``.
ProbeFn = Callable[[Any, str], Any]


def _default_probe(destination: Any, calling_ae_title: str) -> Any:
    from dicomnode import delivery  # lazy: pynetdicom / requests only when a test button is pressed

    return delivery.echo(destination, calling_ae_title=calling_ae_title)


class Actions:
    """What admins can make the node do.

    Parameters
    ----------
    store
        The database (job state changes go through it).
    settings
        Destinations and our AE title.
    probe
        Destination test (default: :func:`dicomnode.delivery.echo`); injectable for tests.
    on_jobs_created
        Called after a re-run so local workers wake up at once (optional).
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        probe: ProbeFn | None = None,
        on_jobs_created: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.probe = probe or _default_probe
        self.on_jobs_created = on_jobs_created

    def rerun(self, job_id: int, actor: str) -> Job:
        """Queue a finished job again (:meth:`dicomnode.store.Store.rerun_job`: audited, same UIDs so the
        new result replaces the old one at the destination, deliveries re-opened once it is reported).

        Raises
        ------
        dicomnode.store.NotFoundError
            No such job.
        dicomnode.store.InvalidTransitionError
            The job is not finished (pending, analysing, delivering) or was superseded.
        """
        job = self.store.rerun_job(job_id, actor=actor, message=f"re-run requested by {actor}")
        log.info("job %d: re-run requested by %s", job_id, actor)
        if self.on_jobs_created is not None:
            self.on_jobs_created()
        return job

    def resend(self, delivery_id: int, actor: str) -> Delivery:
        """Schedule one delivery again (the store records the audit event).

        Raises
        ------
        dicomnode.store.NotFoundError
            No such delivery.
        ResultFilesRemovedError
            The job's result files were removed (retention): there is nothing to send; re-run the job.
        dicomnode.store.InvalidTransitionError
            The job is being analysed again: its new result is sent once it is reported.
        """
        self._check_files(delivery_id)
        d = self.store.resend_delivery(delivery_id, actor=actor)
        log.info("delivery %d: resend requested by %s", delivery_id, actor)
        return d

    def resend_failed(self, actor: str, destination: str | None = None) -> list[Delivery]:
        """Resend every permanently failed delivery (of one destination, or all)."""
        out: list[Delivery] = []
        skipped: set[int] = set()
        while True:
            page = self.store.list_deliveries(
                outcome=DeliveryOutcome.PERMANENT_FAILURE, destination=destination, limit=200 + len(skipped)
            )
            todo = [d for d in page.items if d.id not in skipped]
            if not todo:
                break
            for d in todo:
                try:
                    self._check_files(d.id)
                    out.append(self.store.resend_delivery(d.id, actor=actor))
                except ResultFilesRemovedError as exc:
                    log.info("delivery %d: not resent: %s", d.id, exc)
                    skipped.add(d.id)
                except InvalidTransitionError:
                    skipped.add(d.id)  # its job is being analysed again: the new result goes out anyway
        self.store.audit(
            actor,
            "delivery.resend_all",
            f"destination:{destination}" if destination else "deliveries",
            before={"failed": len(out)},
            after={"resent": [d.id for d in out]},
        )
        return out

    def _check_files(self, delivery_id: int) -> None:
        """Refuse a resend that could only fail: the DICOM files of the job's result are gone.

        A job being analysed again (pending, analysing) is left to the store, which refuses for that reason.
        """
        delivery = self.store.get_delivery(delivery_id)
        job = self.store.get_job(delivery.job_id)
        if job.state in (JobState.PENDING, JobState.ANALYSING):
            return
        result = self.store.get_result(job.id)
        files = [Path(f) for f in (result.outputs.dicom if result else ())]
        missing = [f for f in files if not f.is_file()]
        if not files:
            raise ResultFilesRemovedError(
                f"delivery {delivery_id}: job {job.id} has no DICOM result to send; re-run the job"
            )
        if missing:
            raise ResultFilesRemovedError(
                f"delivery {delivery_id}: the result files of job {job.id} were removed "
                f"({len(missing)} of {len(files)} DICOM files missing, retention.results_days); "
                "re-run the job to analyze and send it again"
            )

    def test_destination(self, name: str, actor: str) -> ProbeResult:
        """C-ECHO a DIMSE destination or probe a DICOMweb one; ``KeyError`` for an unknown name."""
        dest = self.settings.destination(name)
        try:
            r = self.probe(dest, self.settings.dicom.ae_title)
            res = ProbeResult(name, bool(r.ok), str(r.message), float(r.elapsed_s))
        except Exception as exc:  # the probe should not raise; a button press must never give a 500
            res = ProbeResult(name, False, f"{type(exc).__name__}: {exc}", 0.0)
        self.store.audit(
            actor, "destination.test", f"destination:{name}", after={"ok": res.ok, "message": res.message}
        )
        return res
