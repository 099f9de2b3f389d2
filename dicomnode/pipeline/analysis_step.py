"""The analysis step of one job: a worker claims it, the chosen series' spooled files are linked into a
private folder, the analysis runs on them (the series as routing chose it), the outcome is recorded and the
job's deliveries are sent."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from dicomnode.domain import AnalysisStatus, DeliveryOutcome, JobState, PreviousReport
from dicomnode.pipeline.delivery_step import DeliveryStep
from dicomnode.pipeline.fusion import patient_labs
from dicomnode.pipeline.jobs import AnalysisOutcome, AnalysisRequest, temporary_failure
from dicomnode.pipeline.knee import KNEE_PIPELINE as KNEE
from dicomnode.store import InvalidTransitionError, Job, NotFoundError
from dicomnode.vocab import ANALYZE

log = logging.getLogger(__name__)


class AnalysisStep(DeliveryStep):
    """:meth:`run_next_job` and what it does for one job (the delivery of its results included)."""

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
            outcome = self._analyze(job)
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

    def _analyze(self, job: Job) -> AnalysisOutcome:
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
                pipeline=job.pipeline,
                # every pipeline's fusion (knee: its probability; CT: its vBMD) reads the patient's labs
                lab_values=patient_labs(self.store, [i.path for i in instances])
                if job.pipeline == KNEE or getattr(self.settings.analysis, "fusion_bundle", None)
                else (),
            )
            return self.analyze(request)
        except Exception as exc:  # a bug in a step must fail the job, not the worker
            temporary = temporary_failure(exc)
            if temporary is not None:  # disk full...: one line, and the recovery sweep retries the job
                log.warning("job %d: %s", job.id, temporary)
                return AnalysisOutcome(AnalysisStatus.FAILED, temporary, {"status": "failed"})
            log.exception("job %d: analysis step crashed", job.id)
            return AnalysisOutcome(
                AnalysisStatus.FAILED, f"internal error ({type(exc).__name__}: {exc})", {"status": "failed"}
            )

    def selection(self, job: Job) -> tuple[str, ...]:
        """The reasons of the newest recorded routing decision that selected ``job``'s series."""
        for stored in self.store.decisions(job.study_instance_uid):  # newest first
            d = stored.decision
            if d.series_instance_uid == job.series_instance_uid and d.selected and d.action == ANALYZE:
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
            sr = result.outputs.sr if result is not None else None
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
        self.store.record_result(job.id, outcome.result_json, outcome.outputs)
        if outcome.status is AnalysisStatus.OK and outcome.outputs.dicom:
            self.store.set_job_state(job.id, JobState.REPORTED, actor=worker_id)
            self.store.create_deliveries(job.id, job.destinations)
            log.info("job %d: reported (%d DICOM file(s))", job.id, len(outcome.outputs.dicom))
        elif outcome.status is AnalysisStatus.NOT_QUALIFYING:
            self.store.set_job_state(job.id, JobState.NOT_QUALIFYING, outcome.reason, actor=worker_id)
            log.info("job %d: not qualifying: %s", job.id, outcome.reason)
        else:
            reason = outcome.reason or "analysis produced no DICOM output"
            self.store.set_job_state(job.id, JobState.FAILED, reason, actor=worker_id)
            log.warning("job %d: analysis failed: %s", job.id, reason)


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
