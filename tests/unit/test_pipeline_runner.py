"""The job runner's steps on a real SQLite store, with an injected analysis and sender (no network).

The clock is the only thing mocked: every step takes ``now``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import Settings
from dicomnode.delivery import DeliveryResult
from dicomnode.domain import AnalysisStatus, DeliveryOutcome, JobState, PreviousReport, ResultFiles
from dicomnode.pipeline.runner import AnalysisOutcome, AnalysisRequest, Runner
from dicomnode.store import Store, make_engine, upgrade

CT = "1.2.840.10008.5.1.4.1.1.2"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"
AXIAL = "1.2.826.0.1.3680043.8.498.1.1"
SCOUT = "1.2.826.0.1.3680043.8.498.1.2"


def _settings(tmp: Path, **over: Any) -> Settings:
    data: dict[str, Any] = {
        "data_dir": tmp / "data",
        "completion": {"series_quiet_seconds": 5, "study_quiet_seconds": 5, "max_wait_seconds": 600},
        "destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}
        ],
        "delivery": {"max_attempts": 3, "backoff_base_seconds": 10, "backoff_max_seconds": 60},
    }
    data.update(over)
    return Settings(**data)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    upgrade(engine)
    return Store(engine)


def _receive(
    store: Store, tmp: Path, series: str, n: int, *, image_type: tuple[str, ...], at: datetime
) -> None:
    folder = tmp / "spool" / STUDY / series
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sop = f"{series}.{i + 1}"
        path = folder / f"{sop}.dcm"
        path.write_bytes(b"DICM")
        store.record_instance(
            study_uid=STUDY,
            series_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=CT,
            transfer_syntax="1.2.840.10008.1.2.1",
            path=path,
            size_bytes=4,
            study_attrs={"StudyDescription": "CT ABDOMEN"},
            series_attrs={
                "Modality": "CT",
                "SOPClassUID": CT,
                "ImageType": image_type,
                "SliceThickness": 3.0,
                "ConvolutionKernel": "STANDARD",
                "BodyPartExamined": "ABDOMEN",
            },
            calling_aet="ORTHANC",
            source="dimse",
            slice_position=float(i * 3),
            now=at,
        )


class FakeAnalysis:
    """Writes an 'SR' and an 'SC' file; records the requests it got."""

    def __init__(self, status: AnalysisStatus = AnalysisStatus.OK) -> None:
        self.status = status
        self.requests: list[AnalysisRequest] = []

    def __call__(self, req: AnalysisRequest) -> AnalysisOutcome:
        self.requests.append(req)
        inputs = sorted(req.input_dir.iterdir())
        sr, sc = req.out_dir / "sr.dcm", req.out_dir / "sc_1.dcm"
        sr.write_bytes(b"sr")
        sc.write_bytes(b"sc")
        return AnalysisOutcome(
            self.status,
            None if self.status is AnalysisStatus.OK else "not a lumbar CT",
            {"status": self.status.value, "n_inputs": len(inputs)},
            outputs=ResultFiles(sr=str(sr), sc=(str(sc),)),
        )


class FakeSender:
    """Answers each call with the next outcome of ``script`` (the last one repeats)."""

    def __init__(self, *script: DeliveryOutcome) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, tuple[Path, ...], str]] = []

    def __call__(self, destination: Any, files: Sequence[Path], *, calling_ae_title: str) -> DeliveryResult:
        self.calls.append((destination.name, tuple(files), calling_ae_title))
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return DeliveryResult(destination.name, outcome, outcome.value)


def _runner(tmp: Path, store: Store, analysis: Any, sender: Any, **over: Any) -> Runner:
    return Runner(_settings(tmp, **over), store, analyze=analysis, deliver=sender)


def _study(store: Store, tmp: Path) -> None:
    _receive(store, tmp, AXIAL, 40, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), at=T0)
    _receive(store, tmp, SCOUT, 2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), at=T0)


def test_nothing_completes_before_the_quiet_period(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    runner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    assert runner.sweep_completion(now=T0 + timedelta(seconds=2)) == []
    assert store.get_series(AXIAL).completed_at is None


def test_complete_route_analyze_deliver(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    analysis, sender = FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, analysis, sender)
    jobs = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    assert len(jobs) == 1
    # The localizer is not analysed, and the decision says why.
    decisions = {d.decision.series_instance_uid: d.decision for d in store.decisions(STUDY)}
    assert decisions[AXIAL].selected and not decisions[SCOUT].selected
    assert decisions[SCOUT].reasons
    # A second sweep creates nothing new (idempotent).
    assert runner.sweep_completion(now=T0 + timedelta(seconds=7)) == []
    assert runner.run_next_job("test:1:w") == jobs[0]
    assert len(list(analysis.requests[0].input_dir.iterdir())) == 40
    job = store.get_job(jobs[0])
    assert job.state is JobState.DONE
    assert [c[0] for c in sender.calls] == ["pacs"]
    assert sender.calls[0][2] == "DICOMNODE"
    assert {p.name for p in sender.calls[0][1]} == {"sr.dcm", "sc_1.dcm"}
    result = store.get_result(jobs[0])
    assert result is not None and result.result_json["n_inputs"] == 40
    assert runner.run_next_job("test:1:w") is None


def test_transient_failure_retries_with_backoff_then_succeeds(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.RETRYING, DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, FakeAnalysis(), sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    (d,) = store.list_deliveries(job_id=job_id).items
    assert d.outcome is DeliveryOutcome.RETRYING and d.next_attempt_at is not None
    assert store.get_job(job_id).state is JobState.DELIVERING
    # Not due before the backoff ran out.
    assert runner.deliver_due(now=datetime.now(UTC)) == 0
    assert runner.deliver_due(now=d.next_attempt_at + timedelta(seconds=1)) == 1
    assert store.get_delivery(d.id).outcome is DeliveryOutcome.SUCCESS
    assert store.get_job(job_id).state is JobState.DONE
    assert len(sender.calls) == 2


def test_permanent_failure_stops_at_once(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.PERMANENT_FAILURE)
    runner = _runner(tmp_path, store, FakeAnalysis(), sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    with caplog.at_level("ERROR"):
        runner.run_next_job("test:1:w")
        for k in range(5):
            runner.deliver_due(now=datetime.now(UTC) + timedelta(hours=k + 1))
    (d,) = store.list_deliveries(job_id=job_id).items
    assert d.outcome is DeliveryOutcome.PERMANENT_FAILURE and d.attempts == 1
    assert store.get_job(job_id).state is JobState.FAILED
    assert len(sender.calls) == 1
    assert sum("failed permanently" in r.getMessage() for r in caplog.records) == 1


def test_retries_stop_after_max_attempts(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.RETRYING)
    runner = _runner(tmp_path, store, FakeAnalysis(), sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    for k in range(10):
        runner.deliver_due(now=datetime.now(UTC) + timedelta(hours=k + 1))
    (d,) = store.list_deliveries(job_id=job_id).items
    assert d.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert d.attempts == 3 and len(sender.calls) == 3
    assert "gave up after 3 attempts" in (d.message or "")


def test_not_qualifying_is_final_without_delivery(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, FakeAnalysis(AnalysisStatus.NOT_QUALIFYING), sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    job = store.get_job(job_id)
    assert job.state is JobState.NOT_QUALIFYING and job.message == "not a lumbar CT"
    assert sender.calls == []


def _late_instance(store: Store, tmp: Path, at: datetime, n: int = 999) -> None:
    """One more instance of the axial series, received at ``at`` (after its analysis started)."""
    folder = tmp / "spool" / STUDY / AXIAL
    store.record_instance(
        study_uid=STUDY,
        series_uid=AXIAL,
        sop_instance_uid=f"{AXIAL}.{n}",
        sop_class_uid=CT,
        transfer_syntax="1.2.840.10008.1.2.1",
        path=folder / f"late{n}.dcm",
        size_bytes=4,
        study_attrs={},
        series_attrs={"Modality": "CT"},
        calling_aet="ORTHANC",
        source="dimse",
        now=at,
    )
    (folder / f"late{n}.dcm").write_bytes(b"DICM")


def _sr_file(store: Store, job_id: int) -> str:
    result = store.get_result(job_id)
    assert result is not None
    (sr,) = [str(f) for f in result.files if f.name == "sr.dcm"]
    return sr


def test_late_instance_creates_a_new_version_that_supersedes(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    analysis = FakeAnalysis()
    runner = _runner(tmp_path, store, analysis, FakeSender(DeliveryOutcome.SUCCESS))
    (job1,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    late = T0 + timedelta(seconds=60)
    _late_instance(store, tmp_path, late)
    (job2,) = runner.sweep_completion(now=late + timedelta(seconds=6))
    assert job2 != job1
    assert store.get_job(job2).version == 2
    assert store.get_job(job1).state is JobState.SUPERSEDED
    runner.run_next_job("test:1:w")
    assert store.get_job(job2).state is JobState.DONE
    # Same series, new version: the UID seed is the same, the version differs.
    assert analysis.requests[0].job_key == analysis.requests[1].job_key
    assert (analysis.requests[0].version, analysis.requests[1].version) == (1, 2)
    assert len(list(analysis.requests[1].input_dir.iterdir())) == 41
    # Version 2's SR names the delivered version-1 SR as its predecessor; version 1 replaces nothing.
    assert analysis.requests[0].previous_reports == ()
    assert analysis.requests[1].previous_reports == (PreviousReport(1, _sr_file(store, job1)),)
    # A third version names both earlier SRs, newest first.
    later = late + timedelta(seconds=60)
    _late_instance(store, tmp_path, later, n=1000)
    (job3,) = runner.sweep_completion(now=later + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    assert store.get_job(job3).version == 3
    assert analysis.requests[2].previous_reports == (
        PreviousReport(2, _sr_file(store, job2)),
        PreviousReport(1, _sr_file(store, job1)),
    )


def test_a_version_superseded_before_it_was_sent_is_no_predecessor(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    analysis = FakeAnalysis()
    runner = _runner(tmp_path, store, analysis, FakeSender(DeliveryOutcome.RETRYING))
    (job1,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")  # its delivery waits for a retry
    late = T0 + timedelta(seconds=60)
    _late_instance(store, tmp_path, late)
    (job2,) = runner.sweep_completion(now=late + timedelta(seconds=6))
    # While the version-1 delivery may still be on its way, its SR counts as sent.
    assert runner.previous_reports(store.get_job(job2)) == (PreviousReport(1, _sr_file(store, job1)),)
    runner.deliver_due(now=datetime.now(UTC) + timedelta(hours=1))  # "not sent: the job was superseded"
    (d1,) = store.list_deliveries(job_id=job1).items
    assert d1.outcome is DeliveryOutcome.PERMANENT_FAILURE and "superseded" in (d1.message or "")
    runner.run_next_job("test:1:w")
    assert analysis.requests[-1].version == 2 and analysis.requests[-1].previous_reports == ()


def test_recovery_gives_back_the_job_of_a_dead_worker(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    runner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    # A process that existed and is gone: its pid is free now.
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(proc.stdout)
    claimed = store.claim_next_job(f"{socket.gethostname()}:{dead}:t0")
    assert claimed is not None and claimed.state is JobState.ANALYSING
    # A live worker (this process) is left alone.
    assert runner.recover() == [job_id]
    assert store.get_job(job_id).state is JobState.PENDING
    assert runner.run_next_job("test:1:w") == job_id
    assert store.get_job(job_id).state is JobState.DONE


def test_recovery_leaves_a_live_workers_job(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    runner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    runner.sweep_completion(now=T0 + timedelta(seconds=6))
    from dicomnode.pipeline.runner import make_worker_id

    store.claim_next_job(make_worker_id("t0"))
    assert runner.recover() == []


def test_a_superseded_job_result_is_dropped(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.SUCCESS)

    def analysis(req: AnalysisRequest) -> AnalysisOutcome:
        # Meanwhile the series was re-opened and a new version replaced this job.
        store.supersede(req.series_instance_uid, below_version=req.version + 1)
        return FakeAnalysis()(req)

    runner = _runner(tmp_path, store, analysis, sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    assert store.get_job(job_id).state is JobState.SUPERSEDED
    assert sender.calls == []


def test_unknown_destination_fails_permanently(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, FakeAnalysis(), sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.settings = _settings(tmp_path, destinations=[])
    runner.run_next_job("test:1:w")
    (d,) = store.list_deliveries(job_id=job_id).items
    assert d.outcome is DeliveryOutcome.PERMANENT_FAILURE and "not configured" in (d.message or "")
    assert sender.calls == []


def test_retention_removes_old_spooled_studies_whose_jobs_are_final(tmp_path: Path, store: Store) -> None:
    settings = _settings(tmp_path, retention={"spool_days": 30})
    spool = settings.spool_dir
    _study(store, tmp_path)
    runner = Runner(settings, store, analyze=FakeAnalysis(), deliver=FakeSender(DeliveryOutcome.SUCCESS))
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    old, other = spool / STUDY, spool / "1.2.826.0.1.3680043.8.498.2"
    for folder in (old / AXIAL, other / "1.2.826.0.1.3680043.8.498.2.1"):
        folder.mkdir(parents=True)
        (folder / "a.dcm").write_bytes(b"DICM")
    ancient = (datetime.now(UTC) - timedelta(days=31)).timestamp()
    for f in [*old.rglob("*"), *other.rglob("*")]:
        os.utime(f, (ancient, ancient))
    # The study with an unfinished (PENDING) job stays; the other one, with no job at all, goes.
    assert runner.clean_spool() == 1
    assert old.is_dir() and not other.exists()
    runner.run_next_job("test:1:w")
    assert store.get_job(job_id).state is JobState.DONE
    assert runner.clean_spool() == 1
    assert not old.exists()
    # Nothing recent is touched, and 0 days means "keep forever".
    fresh = spool / "1.2.826.0.1.3680043.8.498.3" / "x"
    fresh.mkdir(parents=True)
    (fresh / "a.dcm").write_bytes(b"DICM")
    assert runner.clean_spool() == 0
    runner.settings = _settings(tmp_path, retention={"spool_days": 0})
    assert runner.clean_spool(now=datetime.now(UTC) + timedelta(days=999)) == 0


def test_a_crash_between_routing_and_completion_loses_no_job(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _study(store, tmp_path)
    runner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(store, "mark_series_complete", crash)
    with pytest.raises(RuntimeError):
        runner.sweep_completion(now=T0 + timedelta(seconds=6))
    monkeypatch.undo()
    (job_id,) = [j.id for j in store.list_jobs().items]
    # The series is still "ready": the next sweep finds it again, the job is not duplicated.
    assert runner.sweep_completion(now=T0 + timedelta(seconds=7)) == [job_id]
    assert store.get_series(AXIAL).completed_at is not None
    assert runner.sweep_completion(now=T0 + timedelta(seconds=8)) == []


def test_results_retention_removes_old_final_results_and_keeps_the_rows(tmp_path: Path, store: Store) -> None:
    settings = _settings(tmp_path, retention={"spool_days": 0, "results_days": 30})
    _study(store, tmp_path)
    runner = Runner(settings, store, analyze=FakeAnalysis(), deliver=FakeSender(DeliveryOutcome.SUCCESS))
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    assert store.get_job(job_id).state is JobState.DONE
    job_dir = runner.results_dir / f"job-{job_id}"
    inputs = list(job_dir.rglob("input/*"))
    assert len(inputs) == 40 and all(p.is_symlink() for p in inputs)
    # Folders the database does not know as a job are never touched.
    strangers = [runner.results_dir / "job-4242", runner.results_dir / "notes"]
    for folder in strangers:
        folder.mkdir()
        (folder / "a.txt").write_text("x")
    ancient = (datetime.now(UTC) - timedelta(days=400)).timestamp()
    for f in [p for folder in strangers for p in (folder, *folder.rglob("*"))]:
        os.utime(f, (ancient, ancient))
    now = datetime.now(UTC)
    # Recent: kept (the clock says 29 days later).
    assert runner.clean_results(now=now + timedelta(days=29)) == 0
    assert job_dir.is_dir()
    # Old: the folder goes, the spooled files its input links pointed to stay, the database rows stay.
    assert runner.sweep_retention(now=now + timedelta(days=31)) == (0, 1)
    assert not job_dir.exists()
    assert all(p.is_dir() for p in strangers)
    assert len(list((tmp_path / "spool" / STUDY / AXIAL).iterdir())) == 40
    assert store.get_job(job_id).state is JobState.DONE
    result = store.get_result(job_id)
    assert result is not None and result.result_json["n_inputs"] == 40
    (d,) = store.list_deliveries(job_id=job_id).items
    assert d.outcome is DeliveryOutcome.SUCCESS
    assert runner.clean_results(now=now + timedelta(days=31)) == 0  # nothing left to do
    # 0 days means "keep for ever".
    (runner.results_dir / f"job-{job_id}").mkdir()
    runner.settings = _settings(tmp_path, retention={"results_days": 0})
    assert runner.clean_results(now=now + timedelta(days=9999)) == 0


def test_results_retention_keeps_unfinished_jobs_and_pending_deliveries(tmp_path: Path, store: Store) -> None:
    settings = _settings(tmp_path, retention={"results_days": 30})
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.RETRYING)
    runner = Runner(settings, store, analyze=FakeAnalysis(), deliver=sender)
    (job1,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    much_later = datetime.now(UTC) + timedelta(days=60)
    # Still being delivered (a retry is due): kept.
    assert store.get_job(job1).state is JobState.DELIVERING
    assert runner.clean_results(now=much_later) == 0
    # Superseded (a final state) while its delivery still waits for a retry: kept, it may still be sent.
    late = T0 + timedelta(seconds=60)
    _late_instance(store, tmp_path, late)
    (job2,) = runner.sweep_completion(now=late + timedelta(seconds=6))
    assert store.get_job(job1).state is JobState.SUPERSEDED
    assert runner.clean_results(now=much_later) == 0
    # Its delivery is given up ("superseded"); the new version is analysed and its delivery retries.
    runner.run_next_job("test:1:w")
    runner.deliver_due(now=datetime.now(UTC) + timedelta(hours=1))
    assert all(d.outcome.is_final for d in store.list_deliveries(job_id=job1).items)
    assert store.get_job(job2).state is JobState.DELIVERING
    assert runner.clean_results(now=much_later) == 1
    assert not (runner.results_dir / f"job-{job1}").exists()
    assert (runner.results_dir / f"job-{job2}").is_dir()
    # A permanently failed delivery an admin resends is pending again: its files stay.
    for _ in range(5):
        runner.deliver_due(now=datetime.now(UTC) + timedelta(days=1))
    (d2,) = store.list_deliveries(job_id=job2).items
    assert d2.outcome is DeliveryOutcome.PERMANENT_FAILURE and store.get_job(job2).state is JobState.FAILED
    store.resend_delivery(d2.id, actor="admin")
    assert runner.clean_results(now=much_later) == 0
    assert (runner.results_dir / f"job-{job2}").is_dir()


# -- re-run, rules in force, one owner of the sweeps -------------------------------------------------------


def test_rerun_of_a_done_job_is_analysed_and_delivered_again(tmp_path: Path, store: Store) -> None:
    from dicomnode.report.uids import UidPolicy

    _study(store, tmp_path)
    analysis, sender = FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, analysis, sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    assert runner.run_next_job("test:1:w") == job_id
    assert store.get_job(job_id).state is JobState.DONE and len(sender.calls) == 1

    store.rerun_job(job_id, actor="admin")
    assert runner.deliver_due() == 0  # nothing goes out before the new analysis is reported
    assert runner.run_next_job("test:1:w") == job_id
    job = store.get_job(job_id)
    # Used to stay DELIVERING for ever (the old final deliveries blocked new ones).
    assert job.state is JobState.DONE and job.attempts == 2
    assert len(sender.calls) == 2
    # The new result's files were sent, not the first run's.
    first_files, second_files = sender.calls[0][1], sender.calls[1][1]
    assert all("attempt2" in str(f) for f in second_files) and first_files != second_files
    (delivery,) = store.list_deliveries(job_id=job_id).items
    assert delivery.outcome is DeliveryOutcome.SUCCESS and delivery.attempts == 1
    # Same job key and version -> the same SR/SC UIDs: the PACS replaces the earlier result.
    a, b = analysis.requests
    assert (a.job_key, a.version) == (b.job_key, b.version)
    assert UidPolicy(a.job_key, a.version).uid("sr-instance") == UidPolicy(b.job_key, b.version).uid(
        "sr-instance"
    )
    assert UidPolicy(a.job_key, a.version).uid("sr-instance") != UidPolicy(a.job_key, a.version + 1).uid(
        "sr-instance"
    )


def test_rerun_of_a_failed_delivery_ends_done(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    sender = FakeSender(DeliveryOutcome.PERMANENT_FAILURE, DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, FakeAnalysis(), sender)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    assert store.get_job(job_id).state is JobState.FAILED
    store.rerun_job(job_id, actor="admin")
    runner.run_next_job("test:1:w")
    assert store.get_job(job_id).state is JobState.DONE
    states = [e.to_state for e in store.job_detail(job_id).events]
    assert states.count(JobState.REPORTED) == 2 and states[-1] is JobState.DONE


def test_default_routing_uses_the_newest_saved_rule_version(tmp_path: Path, store: Store) -> None:
    _study(store, tmp_path)
    runner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    # No version saved: the shipped rules select the axial series.
    ready = frozenset({AXIAL, SCOUT})
    assert runner.route_study(STUDY, now=T0, ready=ready) != []
    # A version saved by any process (here: straight into the database) applies to the next decision.
    store.add_rule_version("admin", "mode: first_match\nrules: []\nfallback: {action: ignore}\n")
    assert runner.route_study(STUDY, now=T0 + timedelta(seconds=1), ready=ready) == []
    latest = [d.decision for d in store.decisions(STUDY) if d.decided_at == T0 + timedelta(seconds=1)]
    assert latest and not any(d.selected for d in latest)
    from dicomnode.routing import default_rules_text

    store.add_rule_version("admin", default_rules_text())
    assert runner.route_study(STUDY, now=T0 + timedelta(seconds=2), ready=ready) != []
    # An invalid saved version (written around the UI's validation) is refused at routing time and the
    # previous rules stay in force.
    store.add_rule_version("admin", "rules: [{name: x, when: nonsense}]\n")
    assert runner.route_study(STUDY, now=T0 + timedelta(seconds=3), ready=ready) != []


def test_two_runners_on_one_database_one_owns_the_sweeps(tmp_path: Path, store: Store) -> None:
    a = _runner(
        tmp_path,
        store,
        FakeAnalysis(),
        FakeSender(DeliveryOutcome.SUCCESS),
    )
    b = Runner(
        _settings(tmp_path),
        Store(store.engine),
        analyze=FakeAnalysis(),
        deliver=FakeSender(DeliveryOutcome.SUCCESS),
    )
    a.sweep_lease_s = b.sweep_lease_s = 30.0
    assert a.sweep_owner != b.sweep_owner
    assert a.owns_sweeps(now=T0) is True
    assert b.owns_sweeps(now=T0) is False
    # a keeps renewing while alive; b keeps asking and keeps being refused.
    for k in range(1, 8):
        t = T0 + timedelta(seconds=10 * k + 1)
        assert a.owns_sweeps(now=t) is True
        assert b.owns_sweeps(now=t) is False
    # a dies (stops renewing): b takes over once a's lease expired, and a, if it came back, would not.
    t = T0 + timedelta(seconds=71 + 31)
    assert b.owns_sweeps(now=t) is True
    assert a.owns_sweeps(now=t + timedelta(seconds=11)) is False
    # A graceful stop hands over at once.
    b.release_sweeps()
    assert a.owns_sweeps(now=t + timedelta(seconds=22)) is True


def test_the_scheduler_runs_no_sweep_without_the_lease(tmp_path: Path, store: Store) -> None:
    import time

    from dicomnode.pipeline.scheduler import SweepIntervals, build_scheduler

    owner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    assert owner.owns_sweeps() is True
    other = _runner(tmp_path, Store(store.engine), FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    calls: list[str] = []

    def sweep(now: datetime | None = None) -> list[int]:
        calls.append("completion")
        return []

    other.sweep_completion = sweep  # type: ignore[method-assign]
    sched = build_scheduler(other, SweepIntervals(completion_s=0.05))
    sched.start()
    try:
        time.sleep(0.5)
        assert calls == []  # the first process holds the lease
        owner.release_sweeps()
        other._lease_checked = None  # next tick asks the database again (instead of after 10 s)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.shutdown(wait=True)
    assert calls, "the second process took the sweeps over once the first released them"


def test_a_restarted_node_takes_the_sweeps_from_its_dead_predecessor_at_once(
    tmp_path: Path, store: Store
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_owner = f"{socket.gethostname()}:{int(proc.stdout)}:sweeps:0123abcd"
    assert store.acquire_lease("sweeps", dead_owner, 30, now=T0) is True
    runner = _runner(tmp_path, store, FakeAnalysis(), FakeSender(DeliveryOutcome.SUCCESS))
    # Long before the dead process's lease would expire.
    assert runner.owns_sweeps(now=T0 + timedelta(seconds=1)) is True
    assert store.lease_holder("sweeps", now=T0 + timedelta(seconds=1)) == runner.sweep_owner
    # A live holder of this host (this very process) is never pre-empted.
    live_owner = f"{socket.gethostname()}:{os.getpid()}:sweeps:live"
    runner.release_sweeps()
    assert store.acquire_lease("sweeps", live_owner, 30, now=T0 + timedelta(seconds=2)) is True
    assert runner.owns_sweeps(now=T0 + timedelta(seconds=3)) is False


def test_deliver_job_sends_that_jobs_deliveries_only(tmp_path: Path, store: Store) -> None:
    """A function named after one job acts on that job: another job's due delivery waits for the sweep."""
    _study(store, tmp_path)
    other = AXIAL + ".9"
    _receive(store, tmp_path, other, 40, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), at=T0)
    sender = FakeSender(DeliveryOutcome.SUCCESS)
    runner = _runner(tmp_path, store, FakeAnalysis(), sender)
    runner.sweep_completion(now=T0 + timedelta(seconds=6))
    first = store.create_job(AXIAL, "bmd", ["pacs"], 1)
    second = store.create_job(other, "bmd", ["pacs"], 1)
    for job_id in (first, second):
        store.set_job_state(job_id, JobState.ANALYSING, actor="t")
        store.record_result(job_id, {"status": "ok"}, [])
        store.set_job_state(job_id, JobState.REPORTED, actor="t")
        store.create_deliveries(job_id, ["pacs"])
    assert runner.deliver_job(second) == 1
    assert [d.outcome for d in store.list_deliveries(job_id=second).items] == [
        DeliveryOutcome.PERMANENT_FAILURE
    ]
    assert [d.outcome for d in store.list_deliveries(job_id=first).items] == [DeliveryOutcome.PENDING]
    assert sender.calls == []  # no result files: refused before sending, and only for that job
