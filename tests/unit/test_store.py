"""Store behaviour, the same tests on SQLite and on PostgreSQL.

The PostgreSQL variant runs in a fresh database created for this test run (and dropped after). It skips with
the reason when PostgreSQL is unreachable, except under CI (``CI=true``) where that is a failure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from postgres_testing import postgres_unavailable_reason, temporary_database
from sqlalchemy import Engine, inspect, text

from dicomnode.domain import DeliveryOutcome, JobState, ResultFiles, RuleDecision
from dicomnode.errors import InputError
from dicomnode.store import (
    InvalidTransitionError,
    NewInstance,
    NotFoundError,
    Store,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from dicomnode.store.models import Base

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = "1.2.840.10008.1.2.1"
TABLES = {
    "studies",
    "series",
    "instances",
    "routing_decisions",
    "jobs",
    "job_events",
    "results",
    "deliveries",
    "delivery_attempts",
    "audit_events",
    "rule_versions",
    "users",
    "scheduler_lease",
}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason is not None:
        if _ci():
            pytest.fail(reason + " -- required under CI")
        pytest.skip(reason)
    with temporary_database() as url:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
        upgrade(eng)
    else:
        eng = make_engine(request.getfixturevalue("pg_url"))
        with eng.begin() as conn:  # a clean slate per test, schema kept
            conn.execute(text(f"TRUNCATE {', '.join(sorted(TABLES))} RESTART IDENTITY CASCADE"))
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


def add(
    store: Store,
    i: int,
    *,
    series: str = "1.2.3.1",
    study: str = "1.2.3",
    at: datetime = T0,
    series_attrs: dict[str, Any] | None = None,
    **kw: Any,
) -> bool:
    return store.record_instance(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=f"{series}.{i}",
        sop_class_uid=kw.pop("sop_class_uid", CT),
        transfer_syntax=ELE,
        path=f"spool/{series}/{i}.dcm",
        size_bytes=1000 + i,
        study_attrs={"StudyDescription": "CT ABDOMEN", "PatientID": "P1"},
        series_attrs=series_attrs
        if series_attrs is not None
        else {"Modality": "CT", "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"), "SliceThickness": 3.0},
        calling_aet="PACS",
        source=kw.pop("source", "dimse"),
        now=at,
        **kw,
    )


def job_for(
    store: Store, series: str = "1.2.3.1", version: int = 1, dests: tuple[str, ...] = ("pacs",)
) -> int:
    add(store, 0, series=series)  # no-op when the instance is already there
    return store.create_job(series, "bmd", list(dests), version, now=T0)


# -- schema -------------------------------------------------------------------------------------------


def test_migrations_create_every_table_and_are_idempotent(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= TABLES
    assert current_revision(engine) == head_revision()
    assert upgrade(engine) == head_revision()  # second run: nothing to do, no error


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == [], f"models.py and the migrations differ: {diffs}"


# -- ingest and completion ----------------------------------------------------------------------------


def test_record_instance_is_idempotent_and_counts(store: Store) -> None:
    assert add(store, 1) is True
    assert add(store, 2) is True
    assert add(store, 1) is False  # same SOP Instance UID again
    series = store.get_series("1.2.3.1")
    assert series.n_instances == 2
    assert series.attributes["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    study = store.get_study("1.2.3")
    assert (study.n_series, study.n_instances, study.calling_aet) == (1, 2, "PACS")
    assert [p.name for p in store.instance_paths("1.2.3.1")] == ["1.dcm", "2.dcm"]
    with pytest.raises(ValueError):
        add(store, 3, source="carrier-pigeon")


def test_record_instance_rejects_naive_datetimes(store: Store) -> None:
    with pytest.raises(Exception, match="naive"):
        add(store, 1, at=datetime(2026, 1, 1))


def test_series_ready_after_quiet_periods(store: Store) -> None:
    add(store, 1, at=T0)
    add(store, 2, at=T0 + timedelta(seconds=10))
    add(store, 1, series="1.2.3.2", at=T0 + timedelta(seconds=50))  # same study, other series

    def ready(after: float) -> list[str]:
        found = store.series_ready_for_completion(T0 + timedelta(seconds=after), 30, 60, 3600)
        return sorted(s.series_instance_uid for s in found)

    assert ready(20) == []  # series still receiving
    assert ready(45) == []  # series quiet, but the study received 5 s ago... and must be quiet 60 s
    assert ready(111) == ["1.2.3.1", "1.2.3.2"]
    store.mark_series_complete("1.2.3.1", now=T0 + timedelta(seconds=111))
    assert ready(112) == ["1.2.3.2"]
    assert store.get_series("1.2.3.1").completed_at == T0 + timedelta(seconds=111)


def test_max_wait_completes_a_series_that_keeps_receiving(store: Store) -> None:
    for i in range(10):
        add(store, i, at=T0 + timedelta(seconds=20 * i))
    now = T0 + timedelta(seconds=190)
    assert store.series_ready_for_completion(now, 30, 60, max_wait=3600) == []
    assert [s.series_instance_uid for s in store.series_ready_for_completion(now, 30, 60, max_wait=180)] == [
        "1.2.3.1"
    ]


def test_late_instance_reopens_series_and_bumps_version_once_a_job_exists(store: Store) -> None:
    add(store, 1)
    store.mark_series_complete("1.2.3.1", now=T0 + timedelta(minutes=5))
    add(store, 2, at=T0 + timedelta(minutes=6))  # no job yet: only re-opened
    s = store.get_series("1.2.3.1")
    assert (s.completed_at, s.version, s.needs_new_version) == (None, 1, False)

    store.mark_series_complete("1.2.3.1", now=T0 + timedelta(minutes=10))
    job_v1 = store.create_job("1.2.3.1", "bmd", ["pacs"], 1)
    add(store, 3, at=T0 + timedelta(minutes=11))
    s = store.get_series("1.2.3.1")
    assert (s.completed_at, s.version, s.needs_new_version, s.n_instances) == (None, 2, True, 3)

    job_v2 = store.create_job("1.2.3.1", "bmd", ["pacs"], s.version)
    assert store.get_series("1.2.3.1").needs_new_version is False
    assert store.supersede("1.2.3.1", below_version=2) == [job_v1]
    assert store.get_job(job_v1).state == JobState.SUPERSEDED
    assert store.get_job(job_v2).state == JobState.PENDING


def test_series_summaries_merge_levels_and_fill_from_instances(store: Store) -> None:
    attrs = {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SOPClassUID": ""}
    for i in range(4):
        add(store, i, series_attrs=attrs, slice_position=-100.0 + 2.5 * i)
    add(store, 0, series="1.2.3.9", series_attrs={"Modality": "CT"}, number_of_frames=40)
    summaries = {s.series_instance_uid: s for s in store.series_summaries("1.2.3")}
    a = summaries["1.2.3.1"]
    assert a.get("StudyDescription") == "CT ABDOMEN"  # study level merged in
    assert a.get("ImageType") == ("ORIGINAL", "PRIMARY", "AXIAL")  # JSON list back to a tuple
    assert a.get("SOPClassUID") == CT  # blank in the header, known from the instances
    assert a.n_instances == 4
    assert a.z_extent_mm == pytest.approx(7.5)
    b = summaries["1.2.3.9"]
    assert b.get("NumberOfFrames") == 40
    assert b.z_extent_mm is None
    assert store.series_summaries("1.2.3", complete_only=True) == []
    with pytest.raises(NotFoundError):
        store.series_summaries("9.9.9")


def test_decisions_are_kept_with_reasons(store: Store) -> None:
    add(store, 1)
    d = RuleDecision("1.2.3.1", True, "abdominal-ct-bmd", "analyze", "bmd", ("pacs",), ("a: pass", "b"), 1)
    store.record_decisions("1.2.3", [d], now=T0)
    (got,) = store.decisions("1.2.3")
    assert got.decision == d
    assert got.study_instance_uid == "1.2.3"
    assert store.get_study("1.2.3").routed_at == T0


# -- jobs -----------------------------------------------------------------------------------------------


def test_create_job_is_idempotent_and_claim_takes_oldest(store: Store) -> None:
    add(store, 1)
    add(store, 1, series="1.2.3.2")
    j1 = store.create_job("1.2.3.1", "bmd", ["pacs"], 1)
    assert store.create_job("1.2.3.1", "bmd", ["pacs"], 1) == j1
    j2 = store.create_job("1.2.3.2", "bmd", [], 1)
    first = store.claim_next_job("w1")
    second = store.claim_next_job("w2")
    assert first is not None and second is not None
    assert (first.id, first.state, first.worker_id, first.attempts) == (j1, JobState.ANALYSING, "w1", 1)
    assert (second.id, second.destinations) == (j2, ())
    assert store.claim_next_job("w3") is None
    with pytest.raises(NotFoundError):
        store.create_job("9.9", "bmd", [], 1)


def test_claim_can_filter_by_pipeline(store: Store) -> None:
    add(store, 1)
    store.create_job("1.2.3.1", "other", [], 1)
    assert store.claim_next_job("w", pipelines=["bmd"]) is None
    claimed = store.claim_next_job("w", pipelines=["other"])
    assert claimed is not None and claimed.pipeline == "other"


def test_job_transitions_are_checked_and_form_a_timeline(store: Store) -> None:
    jid = job_for(store)
    with pytest.raises(InvalidTransitionError, match="pending -> done"):
        store.set_job_state(jid, JobState.DONE)
    store.claim_next_job("w1")
    store.set_job_state(jid, JobState.ANALYSING)  # same state: a no-op, no new event
    store.set_job_state(jid, JobState.REPORTED, "SR written")
    detail = store.job_detail(jid)
    steps = [(e.from_state, e.to_state) for e in detail.events]
    assert steps == [
        (None, JobState.PENDING),
        (JobState.PENDING, JobState.ANALYSING),
        (JobState.ANALYSING, JobState.REPORTED),
    ]
    assert detail.events[-1].message == "SR written"
    with pytest.raises(NotFoundError):
        store.set_job_state(9999, JobState.FAILED)


def test_final_states_allow_only_admin_reruns(store: Store) -> None:
    jid = job_for(store)
    store.claim_next_job("w")
    job = store.set_job_state(jid, JobState.NOT_QUALIFYING, "MR series")
    assert job.finished_at is not None and job.message == "MR series"
    with pytest.raises(InvalidTransitionError):
        store.set_job_state(jid, JobState.ANALYSING)
    rerun = store.set_job_state(jid, JobState.PENDING, "re-run", actor="admin")
    assert (rerun.state, rerun.worker_id, rerun.finished_at) == (JobState.PENDING, None, None)
    store.set_job_state(jid, JobState.SUPERSEDED)
    for state in JobState:
        if state != JobState.SUPERSEDED:
            with pytest.raises(InvalidTransitionError):
                store.set_job_state(jid, state)


def test_reset_stale_jobs_and_heartbeat(store: Store) -> None:
    add(store, 1)
    add(store, 1, series="1.2.3.2")
    a = store.create_job("1.2.3.1", "bmd", [], 1)
    b = store.create_job("1.2.3.2", "bmd", [], 1)
    store.claim_next_job("w1", now=T0)
    store.claim_next_job("w2", now=T0)
    store.heartbeat(b, now=T0 + timedelta(minutes=10))
    assert {j.id for j in store.unfinished_jobs()} == {a, b}
    reset = store.reset_stale_jobs(older_than=T0 + timedelta(minutes=5))
    assert reset == [a]
    ja = store.get_job(a)
    assert (ja.state, ja.worker_id) == (JobState.PENDING, None)
    assert store.get_job(b).state == JobState.ANALYSING
    reclaimed = store.claim_next_job("w3")
    assert reclaimed is not None and (reclaimed.id, reclaimed.attempts) == (a, 2)


def test_record_result_replaces_on_rerun(store: Store) -> None:
    jid = job_for(store)
    store.record_result(jid, {"status": "ok", "l1_hu": 120.5}, [Path("out/sr.dcm")])
    store.record_result(jid, {"status": "ok", "l1_hu": 121.0}, ["out/sr.dcm", "out/sc1.dcm"])
    res = store.get_result(jid)
    assert res is not None
    assert res.result_json["l1_hu"] == 121.0
    assert res.files == (Path("out/sr.dcm"), Path("out/sc1.dcm"))
    assert store.job_detail(jid).result == res


def test_result_keeps_its_typed_outputs(store: Store) -> None:
    """The record keeps which file is the SR, the SCs, result.json and the PNGs, as the analysis said."""
    jid = job_for(store)
    outputs = ResultFiles("o/result.json", "o/report-v1.dcm", ("o/overview.dcm", "o/l1.dcm"), ("o/l1.png",))
    store.record_result(jid, {"status": "ok"}, outputs)
    res = store.get_result(jid)
    assert res is not None and res.outputs == outputs
    assert res.outputs.dicom == ("o/report-v1.dcm", "o/overview.dcm", "o/l1.dcm")  # SR first, any name
    assert res.files == tuple(Path(f) for f in outputs.all)
    # a row written before migration 0004 (a plain file list) still tells its SR and SCs apart
    store.record_result(jid, {"status": "ok"}, ["o/result.json", "o/sr.dcm", "o/sc_01.dcm", "o/a.png"])
    old = store.get_result(jid)
    assert old is not None and old.outputs == ResultFiles(
        "o/result.json", "o/sr.dcm", ("o/sc_01.dcm",), ("o/a.png",)
    )


# -- deliveries -----------------------------------------------------------------------------------------


def _reported_job(store: Store, dests: tuple[str, ...] = ("pacs", "archive")) -> int:
    jid = job_for(store, dests=dests)
    store.claim_next_job("w")
    store.set_job_state(jid, JobState.REPORTED)
    return jid


def test_deliveries_are_unique_per_job_destination_version(store: Store) -> None:
    jid = _reported_job(store)
    first = store.create_deliveries(jid, ["pacs", "archive"])
    again = store.create_deliveries(jid, ["pacs", "archive", "pacs"])
    assert sorted(d.id for d in first) == sorted(d.id for d in again)
    assert store.list_deliveries(job_id=jid).total == 2
    assert store.get_job(jid).state == JobState.DELIVERING
    assert {d.outcome for d in first} == {DeliveryOutcome.PENDING}
    assert {d.study_instance_uid for d in first} == {"1.2.3"}


def test_no_destination_means_done(store: Store) -> None:
    jid = _reported_job(store, dests=())
    assert store.create_deliveries(jid, []) == []
    assert store.get_job(jid).state == JobState.DONE


def test_delivery_retry_then_success_finishes_job(store: Store) -> None:
    jid = _reported_job(store)
    pacs, archive = sorted(store.create_deliveries(jid, ["pacs", "archive"]), key=lambda d: d.destination)[
        ::-1
    ]
    now = T0 + timedelta(hours=1)
    assert {d.id for d in store.due_deliveries(now)} == {pacs.id, archive.id}
    with pytest.raises(ValueError):
        store.record_delivery_attempt(pacs.id, DeliveryOutcome.RETRYING, "timeout")
    store.record_delivery_attempt(
        pacs.id, DeliveryOutcome.RETRYING, "timeout", now + timedelta(minutes=1), now=now
    )
    store.record_delivery_attempt(archive.id, DeliveryOutcome.SUCCESS, "200", now=now)
    assert [d.id for d in store.due_deliveries(now + timedelta(seconds=30))] == []
    assert [d.id for d in store.due_deliveries(now + timedelta(minutes=2))] == [pacs.id]
    assert store.get_job(jid).state == JobState.DELIVERING
    done = store.record_delivery_attempt(
        pacs.id, DeliveryOutcome.SUCCESS, "0x0000", now=now + timedelta(minutes=2)
    )
    assert (done.attempts, done.outcome, done.delivered_at) == (
        2,
        DeliveryOutcome.SUCCESS,
        now + timedelta(minutes=2),
    )
    assert [a.outcome for a in store.delivery_attempts(pacs.id)] == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.SUCCESS,
    ]
    assert store.get_job(jid).state == JobState.DONE
    assert store.due_deliveries(now + timedelta(days=1)) == []


def test_permanent_failure_fails_job_and_resend_reopens(store: Store) -> None:
    jid = _reported_job(store, dests=("pacs",))
    (d,) = store.create_deliveries(jid, ["pacs"])
    store.record_delivery_attempt(d.id, DeliveryOutcome.PERMANENT_FAILURE, "association rejected")
    job = store.get_job(jid)
    assert job.state == JobState.FAILED
    assert job.message is not None and "pacs" in job.message and "association rejected" in job.message
    again = store.resend_delivery(d.id, actor="admin")
    assert again.outcome == DeliveryOutcome.PENDING
    assert store.get_job(jid).state == JobState.DELIVERING
    events = store.list_audit(target=f"delivery:{d.id}").items
    assert [(e.actor, e.action, e.before["outcome"]) for e in events] == [
        ("admin", "delivery.resend", "permanent_failure")
    ]


def test_lease_keeps_a_second_sweeper_away(store: Store) -> None:
    jid = _reported_job(store, dests=("pacs",))
    store.create_deliveries(jid, ["pacs"])
    now = T0 + timedelta(hours=1)
    assert len(store.due_deliveries(now, lease=60)) == 1
    assert store.due_deliveries(now + timedelta(seconds=30), lease=60) == []
    assert len(store.due_deliveries(now + timedelta(seconds=61))) == 1


def test_rerun_reopens_the_versions_deliveries_once_reported(store: Store) -> None:
    jid = _reported_job(store, dests=("pacs", "archive"))
    first = {d.destination: d for d in store.create_deliveries(jid, ["pacs", "archive"])}
    now = T0 + timedelta(hours=1)
    store.record_delivery_attempt(first["pacs"].id, DeliveryOutcome.SUCCESS, "0x0000", now=now)
    store.record_delivery_attempt(first["archive"].id, DeliveryOutcome.PERMANENT_FAILURE, "refused", now=now)
    assert store.get_job(jid).state == JobState.FAILED

    # Only finished jobs can be re-run; the re-run is audited and keeps the job's version.
    with pytest.raises(NotFoundError):
        store.rerun_job(424242, actor="admin")
    job = store.rerun_job(jid, actor="admin", now=now + timedelta(minutes=1))
    assert (job.state, job.version, job.id) == (JobState.PENDING, 1, jid)
    with pytest.raises(InvalidTransitionError):
        store.rerun_job(jid, actor="admin")
    (audit,) = store.list_audit(target=f"job:{jid}").items
    assert (audit.action, audit.before["state"], audit.after["state"]) == ("job.rerun", "failed", "pending")
    # While it is analysed again, nothing of it is due and its old deliveries cannot be resent.
    assert store.due_deliveries(now + timedelta(days=1)) == []
    with pytest.raises(InvalidTransitionError):
        store.resend_delivery(first["archive"].id, actor="admin")

    store.claim_next_job("w2")
    store.set_job_state(jid, JobState.REPORTED)
    again = {d.destination: d for d in store.create_deliveries(jid, ["pacs", "archive"])}
    # The same rows (one per job, destination, version), re-opened for the new result.
    assert {k: d.id for k, d in again.items()} == {k: d.id for k, d in first.items()}
    assert {d.outcome for d in again.values()} == {DeliveryOutcome.PENDING}
    assert {d.attempts for d in again.values()} == {0}
    assert store.get_job(jid).state == JobState.DELIVERING
    due = store.due_deliveries(now + timedelta(hours=1))
    assert {d.id for d in due} == {d.id for d in again.values()}
    for d in due:
        store.record_delivery_attempt(d.id, DeliveryOutcome.SUCCESS, "0x0000", now=now + timedelta(hours=1))
    assert store.get_job(jid).state == JobState.DONE
    # The earlier run stays in the attempt history.
    history = store.delivery_attempts(first["archive"].id)
    assert [a.outcome for a in history] == [
        DeliveryOutcome.PERMANENT_FAILURE,
        DeliveryOutcome.PENDING,
        DeliveryOutcome.SUCCESS,
    ]
    assert history[1].message is not None and "re-opened" in history[1].message
    # Calling it again (recovery after a crash) changes nothing: the job is no longer REPORTED.
    store.create_deliveries(jid, ["pacs", "archive"])
    assert {d.outcome for d in store.list_deliveries(job_id=jid).items} == {DeliveryOutcome.SUCCESS}


def test_scheduler_lease_one_holder_takeover_on_expiry_and_release(store: Store) -> None:
    assert store.lease_holder("sweeps", now=T0) is None
    assert store.acquire_lease("sweeps", "node-a", 30, now=T0) is True
    assert store.acquire_lease("sweeps", "node-b", 30, now=T0 + timedelta(seconds=1)) is False
    # Renewal by the holder pushes the expiry.
    assert store.acquire_lease("sweeps", "node-a", 30, now=T0 + timedelta(seconds=20)) is True
    assert store.acquire_lease("sweeps", "node-b", 30, now=T0 + timedelta(seconds=40)) is False
    assert store.lease_holder("sweeps", now=T0 + timedelta(seconds=40)) == "node-a"
    # node-a stops renewing (it died): once its lease expired, node-b takes over and node-a is out.
    assert store.acquire_lease("sweeps", "node-b", 30, now=T0 + timedelta(seconds=51)) is True
    assert store.acquire_lease("sweeps", "node-a", 30, now=T0 + timedelta(seconds=52)) is False
    assert store.lease_holder("sweeps", now=T0 + timedelta(seconds=52)) == "node-b"
    # Other lease names are independent.
    assert store.acquire_lease("other", "node-a", 30, now=T0 + timedelta(seconds=52)) is True
    # A graceful stop releases at once; only the holder can release.
    assert store.release_lease("sweeps", "node-a") is False
    assert store.release_lease("sweeps", "node-b") is True
    assert store.acquire_lease("sweeps", "node-a", 30, now=T0 + timedelta(seconds=53)) is True


def test_concurrent_lease_acquisition_has_one_winner(store: Store) -> None:
    results: dict[str, bool] = {}
    barrier = threading.Barrier(4)

    def grab(owner: str) -> None:
        barrier.wait()
        results[owner] = store.acquire_lease("race", owner, 60, now=T0)

    threads = [threading.Thread(target=grab, args=(f"p{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [False, False, False, True]
    winner = next(o for o, ok in results.items() if ok)
    assert store.lease_holder("race", now=T0) == winner


def test_users_table_holds_accounts(store: Store) -> None:
    from web_testing import FAST_HASHER

    from dicomnode.web.users import UserStore

    users = UserStore(store.engine, FAST_HASHER)
    users.create("admin", "admin-pass-1", "admin")
    users.create("pacs", "sender-pass-1", "sender")
    with pytest.raises(InputError):
        users.create("admin", "another-pass", "viewer")  # username is unique
    token = users.new_token("pacs")
    assert users.verify_token(token) == users.get("pacs")
    assert users.verify_password("admin", "admin-pass-1") is not None
    listed = users.list_users()
    assert [(u.username, u.role, tok) for u, _, tok in listed] == [
        ("admin", "admin", False),
        ("pacs", "sender", True),
    ]
    assert all(at.tzinfo is not None for _, at, _ in listed)
    cols = {c["name"]: c for c in inspect(store.engine).get_columns("users")}
    assert set(cols) == {"id", "username", "role", "password_hash", "token_sha256", "created_at", "disabled"}
    assert cols["token_sha256"]["nullable"] and not cols["username"]["nullable"]


# -- audit, rule versions, queries -----------------------------------------------------------------------


def test_audit_and_rule_versions(store: Store) -> None:
    eid = store.audit("admin", "rules.update", "rules", {"version": 1}, {"version": 2}, now=T0)
    page = store.list_audit()
    assert page.total == 1 and page.items[0].id == eid and page.items[0].after == {"version": 2}
    assert store.latest_rule_version() is None
    v1 = store.add_rule_version("admin", "mode: first_match\nrules: []\n", "empty")
    v2 = store.add_rule_version("admin", "mode: all_match\nrules: []\n")
    assert store.latest_rule_version() == store.get_rule_version(v2)
    assert [v.id for v in store.list_rule_versions().items] == [v2, v1]
    with pytest.raises(NotFoundError):
        store.get_rule_version(999)


def test_listings_filter_and_paginate(store: Store) -> None:
    for k in range(5):
        add(store, 0, series=f"1.2.3.{k}", at=T0 + timedelta(seconds=k))
        store.create_job(f"1.2.3.{k}", "bmd", [], 1)
    add(store, 0, study="7.7", series="7.7.1")
    store.create_job("7.7.1", "bmd", [], 1)
    store.claim_next_job("w")
    page = store.list_jobs(limit=2, offset=0)
    assert (page.total, len(page.items)) == (6, 2)
    assert page.items[0].id > page.items[1].id  # newest first
    assert store.list_jobs(state=JobState.ANALYSING).total == 1
    assert store.list_jobs(state=[JobState.PENDING, JobState.ANALYSING]).total == 6
    assert store.list_jobs(study_uid="7.7").total == 1
    assert store.list_jobs(series_uid="1.2.3.4").items[0].series_instance_uid == "1.2.3.4"
    assert store.list_studies().total == 2
    assert store.list_series(study_uid="1.2.3", limit=3).total == 5
    counts = store.job_counts()
    assert counts[JobState.PENDING] == 5 and counts[JobState.ANALYSING] == 1 and counts[JobState.DONE] == 0
    assert set(store.delivery_counts()) == set(DeliveryOutcome)
    assert store.ping() is True


# -- concurrency ------------------------------------------------------------------------------------------


def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    n_jobs = 24
    for k in range(n_jobs):
        add(store, 0, series=f"1.2.3.{k}")
        store.create_job(f"1.2.3.{k}", "bmd", [], 1)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            while (job := store.claim_next_job(name)) is not None:
                with lock:
                    claimed.append((name, job.id))
        except BaseException as exc:  # surfaced below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ids = [j for _, j in claimed]
    assert len(ids) == n_jobs and len(set(ids)) == n_jobs  # every job exactly once
    assert store.job_counts()[JobState.ANALYSING] == n_jobs


def test_concurrent_ingest_of_one_series_loses_no_instance(store: Store) -> None:
    errors: list[BaseException] = []

    def sender(offset: int) -> None:
        try:
            for i in range(10):
                add(store, offset + i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(100 * k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.get_series("1.2.3.1").n_instances == 30
    assert store.list_studies().total == 1


def _upgrade_concurrently(url: str, n: int = 3) -> list[BaseException]:
    errors: list[BaseException] = []

    def run() -> None:
        eng = make_engine(url)
        try:
            upgrade(eng)
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_upgrades_of_a_fresh_sqlite_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    assert _upgrade_concurrently(url) == []
    eng = make_engine(url)
    assert current_revision(eng) == head_revision()
    eng.dispose()


def test_attribute_values_are_stored_as_plain_json(store: Store) -> None:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat, PersonName

    attrs = {
        "SliceThickness": DSfloat("2.5"),
        "SeriesNumber": IS("3"),
        "ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY"]),
        "OperatorsName": PersonName("Doe^J"),
        "Weird": float("nan"),
        "Blob": b"\x00\x01",
    }
    add(store, 1, series_attrs={"Modality": "CT", **attrs})
    got = store.get_series("1.2.3.1").attributes
    assert got["SliceThickness"] == 2.5 and type(got["SliceThickness"]) is float
    assert got["SeriesNumber"] == 3 and type(got["SeriesNumber"]) is int
    assert got["ImageType"] == ("ORIGINAL", "PRIMARY")
    assert got["OperatorsName"] == "Doe^J"
    assert got["Weird"] is None and got["Blob"] is None


def test_sqlite_direct_recording_writes_what_the_core_path_writes(tmp_path: Path) -> None:
    # On SQLite, record_instances runs its statements on the driver's cursor (recording.SqliteStatements);
    # the same batches through SQLAlchemy Core must leave the same rows: new study and series, duplicates in
    # and across batches, study attributes merged, a late instance re-opening a complete series with a job.
    stores = []
    for name, direct in (("direct", True), ("core", False)):
        eng = make_engine(f"sqlite:///{tmp_path / name}.sqlite3")
        upgrade(eng)
        st = Store(eng)
        st.sqlite_direct = direct
        stores.append(st)

    def item(i: int, series: str, at: datetime, **study: Any) -> NewInstance:
        return NewInstance(
            study_uid="1.2.3",
            series_uid=series,
            sop_instance_uid=f"{series}.{i}",
            sop_class_uid=CT,
            transfer_syntax=ELE,
            path=f"spool/{series}/{i}.dcm",
            size_bytes=1000 + i,
            study_attrs={"StudyDescription": "CT", **study},
            series_attrs={"Modality": "CT", "ImageType": ("ORIGINAL", "PRIMARY"), "SliceThickness": 1.25},
            calling_aet="PACS",
            source="dimse",
            slice_position=-float(i) if i % 3 else None,
            number_of_frames=None,
            now=at,
        )

    for st in stores:
        assert st.record_instances(
            [item(1, "1.2.3.1", T0), item(2, "1.2.3.1", T0), item(1, "1.2.3.1", T0)]
        ) == [
            True,
            True,
            False,
        ]
        later = T0 + timedelta(seconds=5)
        assert st.record_instances(
            [item(2, "1.2.3.1", later), item(3, "1.2.3.2", later, AccessionNumber="A1")]
        ) == [
            False,
            True,
        ]
        st.mark_series_complete("1.2.3.1", now=T0 + timedelta(seconds=60))
        st.create_job("1.2.3.1", "bmd", ["pacs"], 1, now=T0 + timedelta(seconds=61))
        assert st.record_instances([item(4, "1.2.3.1", T0 + timedelta(seconds=90))]) == [True]
        assert st.record_instances([item(5, "1.2.3.1", T0 + timedelta(seconds=30))]) == [True]  # older time

    def dump(st: Store) -> dict[str, list[Any]]:
        with st.engine.connect() as conn:
            return {
                table: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
                for table in ("studies", "series", "instances")
            }

    direct, core = (dump(st) for st in stores)
    assert direct == core
    series = stores[0].get_series("1.2.3.1")
    assert (series.n_instances, series.version, series.needs_new_version, series.completed_at) == (
        4,
        2,
        True,
        None,
    )
    assert series.last_received_at == T0 + timedelta(seconds=90)
    assert stores[0].get_study("1.2.3").attributes["AccessionNumber"] == "A1"


def test_recording_transactions_of_two_processes_queue_on_the_lock_file(tmp_path: Path) -> None:
    # Two WriteQueues on one database stand for two receiving processes (each its own open file: flock
    # conflicts between them as between processes): the second waits until the first lets go.
    from dicomnode.store.recording import WriteQueue

    database = str(tmp_path / "node.sqlite3")
    first, second = WriteQueue(database), WriteQueue(database)
    order: list[str] = []
    inside = threading.Event()

    def other() -> None:
        inside.wait(5)
        with second.held():
            order.append("second")

    t = threading.Thread(target=other)
    t.start()
    with first.held():
        inside.set()
        t.join(0.2)  # the other thread is blocked on the lock, not done
        assert t.is_alive()
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]
    assert Path(first.path).exists()
