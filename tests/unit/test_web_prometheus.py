"""Database-derived Prometheus metrics: job states, deliveries, the analysis-duration histogram, spool."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry
from web_testing import make_settings, make_store

from dicomnode.domain import JobState
from dicomnode.web.prometheus import StoreCollector, analysis_durations, metrics_text


def _record(store: object, series: str, study: str, sop: str, t: datetime) -> None:
    store.record_instance(  # type: ignore[attr-defined]
        study_uid=study, series_uid=series, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", path=Path("/nonexistent") / sop, size_bytes=1000,
        study_attrs={}, series_attrs={"Modality": "CT"}, calling_aet="X", source="dimse", now=t,
    )  # fmt: skip


def test_metrics_from_the_database(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store = make_store(settings)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(3):
        _record(store, "1.2.3.1", "1.2.3", f"1.2.3.1.{i}", t0)
    store.mark_series_complete("1.2.3.1", now=t0)
    job = store.create_job("1.2.3.1", "bmd", [], 1, now=t0)
    store.claim_next_job("w", now=t0 + timedelta(seconds=1))
    store.set_job_state(job, JobState.FAILED, "boom", now=t0 + timedelta(seconds=8))
    # A re-run: analysed again, this time 25 s.
    store.set_job_state(job, JobState.PENDING, "re-run", now=t0 + timedelta(seconds=60))
    store.claim_next_job("w", now=t0 + timedelta(seconds=61))
    store.set_job_state(job, JobState.NOT_QUALIFYING, "no", now=t0 + timedelta(seconds=86))
    assert sorted(analysis_durations(store)) == [7.0, 25.0]

    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store, settings.spool_dir))
    text = metrics_text(reg).decode()
    assert "dicomnode_instances_received_total 3.0" in text
    assert "dicomnode_series_completed_total 1.0" in text
    assert 'dicomnode_jobs{state="not_qualifying"} 1.0' in text
    assert 'dicomnode_jobs{state="failed"} 0.0' in text
    assert 'dicomnode_deliveries{outcome="permanent_failure"} 0.0' in text
    assert 'dicomnode_analysis_seconds_bucket{le="10.0"} 1.0' in text
    assert 'dicomnode_analysis_seconds_bucket{le="+Inf"} 2.0' in text
    assert "dicomnode_analysis_seconds_sum 32.0" in text
    assert "dicomnode_spool_bytes 3000.0" in text
    assert "dicomnode_database_up 1.0" in text


def test_a_database_failure_is_a_metric_not_an_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store = make_store(settings)
    store.engine.dispose()
    (tmp_path / "data" / "dicomnode.sqlite3").unlink()
    (tmp_path / "data" / "dicomnode.sqlite3").mkdir()  # the database file is gone and cannot be recreated
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store, settings.spool_dir))
    assert "dicomnode_database_up 0.0" in metrics_text(reg).decode()
