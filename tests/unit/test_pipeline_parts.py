"""The small parts around the runner: the ingest -> store adapter, the sweeps' scheduler, the process pool
for the analysis, the local executor, and the HTTP app's health endpoints."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicomnode.config import Settings
from dicomnode.domain import AnalysisStatus, JobState
from dicomnode.ingest.sink import ReceivedInstance
from dicomnode.pipeline.executors import LocalExecutor, ProcessAnalyzer
from dicomnode.pipeline.runner import AnalysisOutcome, AnalysisRequest, Runner
from dicomnode.pipeline.scheduler import SweepIntervals, build_scheduler
from dicomnode.pipeline.sink import StoreSink, slice_position, split_attributes, store_source
from dicomnode.store import INSTANCE_SOURCES, Store, make_engine, upgrade
from dicomnode.web.app import create_app

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    upgrade(engine)
    return Store(engine)


def test_slice_position_projects_on_the_slice_normal() -> None:
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert slice_position((10.0, 20.0, -30.5), axial) == pytest.approx(-30.5)
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # row x column = (0, 1, 0)
    assert slice_position((0.0, 42.0, 7.0), coronal) == pytest.approx(42.0)
    assert slice_position(None, axial) is None
    assert slice_position((0.0, 0.0, 0.0), None) is None


def test_split_attributes_keeps_patient_and_study_keys_at_study_level() -> None:
    study, series = split_attributes({"StudyDescription": "CT ABD", "PatientSex": "F", "Modality": "CT"})
    assert study == {"StudyDescription": "CT ABD", "PatientSex": "F"}
    assert series == {"Modality": "CT"}


def _received(tmp: Path, k: int, *, path: bool = True, source: str = "stow") -> ReceivedInstance:
    f = tmp / f"{k}.dcm"
    f.write_bytes(b"x")
    return ReceivedInstance(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid=f"1.2.3.4.{k}",
        sop_class_uid=CT,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f if path else None,
        size_bytes=1,
        ignored=False,
        source=source,
        calling_ae_title=None,
        attributes={"Modality": "CT", "StudyDescription": "CT ABD", "SliceThickness": 3.0},
        image_position_patient=(0.0, 0.0, float(3 * k)),
        image_orientation_patient=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    )


def test_store_sink_records_what_ingest_hands_over(tmp_path: Path, store: Store) -> None:
    sink = StoreSink(store)
    assert sink.record_instance(_received(tmp_path, 0)) is True
    assert sink.record_instance(_received(tmp_path, 1, source="dimse")) is True
    assert sink.record_instance(_received(tmp_path, 1, source="dimse")) is False  # duplicate
    # Accepted but not kept (discard policy): nothing to record.
    assert sink.record_instance(_received(tmp_path, 2, path=False)) is True
    (summary,) = store.series_summaries("1.2.3")
    assert summary.n_instances == 2
    assert summary.z_extent_mm == pytest.approx(3.0)
    assert summary.get("StudyDescription") == "CT ABD" and summary.get("Modality") == "CT"
    # One vocabulary: ingest's names are stored as they are.
    assert {i.source for i in store.instances("1.2.3.4")} == {"stow", "dimse"}


@pytest.mark.parametrize(
    ("given", "stored"),
    [("dimse", "dimse"), ("stow", "stow"), ("reindex", "reindex"), ("import", "import"), ("stowrs", "stow")],
)
def test_every_ingest_source_name_is_accepted_by_the_store(
    tmp_path: Path, store: Store, given: str, stored: str
) -> None:
    assert store_source(given) == stored
    assert StoreSink(store).record_instance(_received(tmp_path, 0, source=given)) is True
    assert [i.source for i in store.instances("1.2.3.4")] == [stored]
    # The store itself accepts ingest's names directly and refuses names outside the vocabulary.
    assert set(INSTANCE_SOURCES) == {"dimse", "stow", "reindex", "import"}
    with pytest.raises(ValueError, match="source must be one of"):
        store.record_instance(
            study_uid="9.9",
            series_uid="9.9.1",
            sop_instance_uid="9.9.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax="1.2.840.10008.1.2.1",
            path=tmp_path / "x.dcm",
            size_bytes=1,
            study_attrs={},
            series_attrs={},
            calling_aet=None,
            source="carrier-pigeon",
        )


def test_scheduler_has_the_four_sweeps(tmp_path: Path, store: Store) -> None:
    runner = Runner(Settings(data_dir=tmp_path), store, analyze=lambda r: _ok(r))
    calls: list[datetime] = []

    def sweep(now: datetime | None = None) -> list[int]:
        calls.append(datetime.now(UTC))
        return []

    runner.sweep_completion = sweep  # type: ignore[method-assign]
    sched = build_scheduler(runner, SweepIntervals(completion_s=0.1))
    assert {j.id for j in sched.get_jobs()} == {"completion", "deliveries", "recovery", "retention"}
    sched.start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.shutdown(wait=True)
    assert len(calls) >= 2


def _ok(req: AnalysisRequest) -> AnalysisOutcome:
    return AnalysisOutcome(AnalysisStatus.OK, None, {"pid": os.getpid(), "job": req.job_id})


def _die(req: AnalysisRequest) -> AnalysisOutcome:
    os._exit(3)


def _request(tmp: Path) -> AnalysisRequest:
    return AnalysisRequest(1, "1.2", "1.2.3", 1, tmp, tmp, "1.2.3/bmd")


def test_process_analyzer_runs_in_a_child_and_survives_a_dying_child(tmp_path: Path) -> None:
    pool = ProcessAnalyzer(1, fn=_ok)
    try:
        out = pool(_request(tmp_path))
        assert out.status is AnalysisStatus.OK and out.result_json["pid"] != os.getpid()
        pool.fn = _die
        died = pool(_request(tmp_path))
        assert died.status is AnalysisStatus.FAILED and "died" in (died.reason or "")
        pool.fn = _ok
        assert pool(_request(tmp_path)).status is AnalysisStatus.OK  # a fresh pool took over
    finally:
        pool.stop()


def test_local_executor_runs_pending_jobs(tmp_path: Path, store: Store) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", completion={"series_quiet_seconds": 1, "study_quiet_seconds": 1}
    )
    folder = tmp_path / "spool"
    folder.mkdir()
    sink = StoreSink(store)
    for k in range(40):
        sink.record_instance(_received(folder, k))
    seen: list[int] = []

    def analysis(req: AnalysisRequest) -> AnalysisOutcome:
        seen.append(req.job_id)
        return AnalysisOutcome(AnalysisStatus.NOT_QUALIFYING, "test", {})

    def select(summaries: Any) -> Any:
        from dicomnode.domain import RuleDecision

        return [RuleDecision(s.series_instance_uid, True, "all", "analyze", "bmd") for s in summaries]

    runner = Runner(settings, store, analyze=analysis, select=select)
    executor = LocalExecutor(runner, 2, poll_s=0.1)
    runner.on_jobs_created = executor.wake
    executor.start()
    try:
        (job_id,) = runner.sweep_completion(now=datetime.now(UTC) + timedelta(seconds=5))
        deadline = time.monotonic() + 10
        while store.get_job(job_id).state is not JobState.NOT_QUALIFYING and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        executor.stop()
    assert seen == [job_id]
    assert store.get_job(job_id).state is JobState.NOT_QUALIFYING


def test_app_health_and_readiness(tmp_path: Path) -> None:
    problems: list[str | None] = [None]
    app = create_app(
        Settings(data_dir=tmp_path), None, role="work", readiness=[("database", lambda: problems[0])]
    )
    client = TestClient(app)
    assert client.get("/api/health").json() == {"status": "ok", "version": app.version, "role": "work"}
    assert client.get("/api/ready").status_code == 200
    problems[0] = "database unreachable"
    r = client.get("/api/ready")
    assert r.status_code == 503 and r.json()["problems"] == {"database": "database unreachable"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "dicomnode_ingest_instances" in metrics.text
