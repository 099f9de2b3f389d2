"""The distributed executor: a queued job is run by ``dicomnode work --celery-worker``, on both brokers.

The sweep runs here (as the ``work`` process that owns the sweeps would); a Celery worker in a child process
takes the task from the broker and runs the very step the local workers run, the real analysis included.
Runs once with Redis (127.0.0.1:6379) and once with RabbitMQ (127.0.0.1:5672, guest/guest), the two brokers
ARCHITECTURE.md names; each skips when its broker is not reachable, and fails instead under CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from dicomnode.config import load_settings
from dicomnode.domain import JobState
from dicomnode.ingest import Spool
from dicomnode.pipeline.executors import CeleryExecutor, analyze_job, make_celery_app
from dicomnode.pipeline.runner import Runner
from dicomnode.pipeline.sink import StoreSink
from dicomnode.store import Store, make_engine, upgrade

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Per broker: its URL (a Redis database of its own; RabbitMQ's default virtual host, purged before use) and
#: the port that must answer.
BROKERS = {
    "redis": ("redis://127.0.0.1:6379/11", 6379),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", 5672),
}


def _broker_or_skip(name: str, port: int) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        msg = f"{name} not reachable at 127.0.0.1:{port} ({exc})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_celery_worker_runs_the_queued_job(tmp_path: Path, broker: str) -> None:
    broker_url, port = BROKERS[broker]
    _broker_or_skip(broker, port)
    from dicomnode.imaging.writer import write_study
    from dicomnode.phantom import PhantomSpec, make_phantom

    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "completion": {"series_quiet_seconds": 1, "study_quiet_seconds": 1},
                "workers": {"executor": "celery", "broker_url": broker_url, "count": 1},
            }
        )
    )
    settings = load_settings(cfg)
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    store = Store(engine)
    app = make_celery_app(broker_url)
    app.control.purge()
    ph = make_phantom(
        PhantomSpec(matrix=256, spacing_mm=1.3, thickness_mm=1.5, z_levels=("T11", "L5"), seed=5)
    )
    study = write_study(ph.volume, tmp_path / "study")
    spool = Spool(settings.spool_dir, StoreSink(store))
    for f in study["soft"]:
        assert spool.ingest_file(f).ok

    log = tmp_path / "celery.log"
    with log.open("ab") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "-v", "work", "--config", str(cfg), "--celery-worker"],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Celery worker did not start"
            time.sleep(0.5)
        runner = Runner(settings, store, analyze=analyze_job)
        runner.on_jobs_created = CeleryExecutor(app, store=store).wake
        (job_id,) = runner.sweep_completion(now=datetime.now(UTC) + timedelta(seconds=5))
        deadline = time.monotonic() + 240
        while not store.get_job(job_id).state.is_final:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        job = store.get_job(job_id)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
        store.close()
    # Run by the Celery worker (its worker id), to the end (no destination: done once reported).
    assert job.state is JobState.DONE, job.message
    assert job.worker_id is not None and job.worker_id.endswith(":celery")
    result = Store(make_engine(settings.database_url_resolved())).get_result(job_id)
    assert result is not None
    assert any(Path(f).name == "sr.dcm" for f in result.files)
    assert result.result_json["status"] == "ok"
