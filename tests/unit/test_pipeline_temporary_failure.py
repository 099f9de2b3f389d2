"""Issue 14 finding 6: a job that failed because the disk was full is analysed again once space is back, and
no traceback reaches its message or a log line below ERROR (the probe: the job stayed failed, with a Python
traceback in its message and in a WARNING line)."""

from __future__ import annotations

import errno
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_pipeline_runner import T0, FakeAnalysis, FakeSender, _runner, _study

from dicomnode.domain import AnalysisStatus, DeliveryOutcome, JobState
from dicomnode.pipeline.analyze import _failure
from dicomnode.pipeline.jobs import TEMPORARY_FAILURE, AnalysisOutcome, AnalysisRequest
from dicomnode.pipeline.sweeps import TEMPORARY_RETRY_S
from dicomnode.store import Store, make_engine, upgrade


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    upgrade(engine)
    return Store(engine)


class DiskFullOnce(FakeAnalysis):
    """The first analysis finds the disk full while writing its outputs; later ones succeed."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True

    def __call__(self, req: AnalysisRequest) -> AnalysisOutcome:
        if self.full:
            try:
                raise OSError(errno.ENOSPC, "No space left on device", str(req.out_dir / "sr.dcm"))
            except OSError as exc:
                raise RuntimeError("could not write the SR") from exc
        return super().__call__(req)


def test_a_job_failed_for_a_full_disk_is_retried_once_space_is_back(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    analysis = DiskFullOnce()
    runner = _runner(tmp_path, store, analysis, FakeSender(DeliveryOutcome.SUCCESS))
    _study(store, tmp_path)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    assert runner.run_next_job("test:1:w") == job_id

    failed = store.get_job(job_id)
    assert failed.state is JobState.FAILED
    assert failed.message is not None and failed.message.startswith(TEMPORARY_FAILURE)
    assert "disk full" in failed.message and "\n" not in failed.message and "Traceback" not in failed.message
    below_error = [r for r in caplog.records if r.levelno < logging.ERROR]
    assert not [r for r in below_error if r.exc_info], "no traceback at INFO/WARNING"
    assert "Traceback" not in caplog.text

    # Not at once (the disk is still full a second later), but a while later: the job is queued again.
    now = datetime.now(UTC)
    assert job_id not in runner.recover(now=now)
    assert store.get_job(job_id).state is JobState.FAILED
    analysis.full = False  # space is back
    assert job_id in runner.recover(now=now + timedelta(seconds=TEMPORARY_RETRY_S + 1))
    assert store.get_job(job_id).state is JobState.PENDING
    assert runner.run_next_job("test:1:w") == job_id
    assert store.get_job(job_id).state is JobState.DONE


def test_a_permanent_failure_is_not_retried(tmp_path: Path, store: Store) -> None:
    runner = _runner(
        tmp_path, store, FakeAnalysis(AnalysisStatus.FAILED), FakeSender(DeliveryOutcome.SUCCESS)
    )
    _study(store, tmp_path)
    (job_id,) = runner.sweep_completion(now=T0 + timedelta(seconds=6))
    runner.run_next_job("test:1:w")
    assert store.get_job(job_id).state is JobState.FAILED
    assert job_id not in runner.recover(now=datetime.now(UTC) + timedelta(hours=1))
    assert store.get_job(job_id).state is JobState.FAILED


@pytest.mark.parametrize(
    ("exc", "temporary"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/results/job-1/sr.dcm"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (ValueError("bad geometry"), False),
    ],
)
def test_the_analysis_reports_a_full_disk_as_temporary_in_one_line(exc: Any, temporary: bool) -> None:
    status, reason, kept = _failure(exc)
    assert status is AnalysisStatus.FAILED
    assert reason.startswith(TEMPORARY_FAILURE) is temporary
    if temporary:
        assert kept is None and "/data" not in reason, "no traceback kept, no path in the message"
