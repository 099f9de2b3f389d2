"""Completion and routing: series quiet for long enough become complete, their study is routed by the rules
in force (decisions stored with reasons) and one job is created per selected series and version."""

from __future__ import annotations

import logging
from datetime import datetime

from dicomnode.pipeline.jobs import RunnerParts, now_utc
from dicomnode.vocab import ANALYZE

log = logging.getLogger(__name__)


class CompletionStep(RunnerParts):
    """:meth:`sweep_completion` and :meth:`route_study` of the runner."""

    def sweep_completion(self, now: datetime | None = None) -> list[int]:
        """Complete the series that have been quiet long enough, route their studies, create the jobs.

        Returns
        -------
        list of int
            Ids of the jobs this sweep created (or found already created: the step is idempotent).
        """
        now = now or now_utc()
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
        now = now or now_utc()
        summaries = self.store.series_summaries(study_uid)
        decisions = list(self.select(summaries))
        self.store.record_decisions(study_uid, decisions, now=now)
        self.stats.add("routed_studies")
        jobs: list[int] = []
        for d in decisions:
            if not d.selected or d.action != ANALYZE:
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
