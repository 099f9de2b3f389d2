"""The store on a real PostgreSQL: several worker processes claiming jobs, migrations via the CLI.

Runs in a fresh database created for this module and dropped after. Skips with the reason when PostgreSQL
is unreachable, except under CI (``CI=true``) where that is a failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from postgres_testing import postgres_unavailable_reason, temporary_database
from sqlalchemy import inspect

from dicomnode.cli import main
from dicomnode.domain import JobState
from dicomnode.store import Store, current_revision, head_revision, make_engine, upgrade

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pg_server() -> str:
    reason = postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " -- required under CI")
        pytest.skip(reason)
    return "ok"


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    with temporary_database() as url:
        yield url


def _claim_all(url: str, name: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = Store.from_url(url)
    got = []
    while (job := store.claim_next_job(name)) is not None:
        got.append(job.id)
    store.close()
    out.put((name, got))


def test_worker_processes_never_claim_the_same_job(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    store = Store(engine)
    n_jobs = 40
    for k in range(n_jobs):
        store.record_instance(
            study_uid="1.2.3",
            series_uid=f"1.2.3.{k}",
            sop_instance_uid=f"1.2.3.{k}.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax="1.2.840.10008.1.2.1",
            path=f"spool/{k}.dcm",
            size_bytes=10,
            study_attrs={},
            series_attrs={"Modality": "CT"},
            calling_aet="PACS",
            source="dimse",
            now=T0,
        )
        store.create_job(f"1.2.3.{k}", "bmd", [], 1, now=T0)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(pg_url, f"p{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ids = [j for _, got in results for j in got]
    assert sorted(ids) == sorted(set(ids)), "a job was claimed twice"
    assert len(ids) == n_jobs
    assert store.job_counts()[JobState.ANALYSING] == n_jobs
    engine.dispose()


def test_cli_db_upgrade_on_postgres(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DICOMNODE_DATABASE_URL", pg_url)
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "upgrade"]) == 0  # idempotent
    assert f"revision {head_revision()}" in capsys.readouterr().out
    engine = make_engine(pg_url)
    assert current_revision(engine) == head_revision()
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()
    assert main(["db", "current"]) == 0


def test_concurrent_upgrades_of_a_fresh_postgres_database(pg_url: str) -> None:
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        eng = make_engine(pg_url)
        try:
            upgrade(eng)
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(pg_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
