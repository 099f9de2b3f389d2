"""How ``dicomnode serve|receive|work`` put the parts together (``dicomnode.cli.node``): rules saved in the UI
reach the runner without a restart (also across the split ``receive`` / ``work`` processes), the worker
settings and their CLI overrides, the sweeps' lease released on stop. Nothing is started: no port is opened.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_testing import ADMIN_PASSWORD, fake_analyze, make_settings

from dicomnode.cli.node import build_node, load
from dicomnode.errors import ConfigError
from dicomnode.routing import default_rules_text
from dicomnode.store import Store, make_engine

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.8.498.77"
IGNORE_ALL = "mode: first_match\nrules: []\nfallback: {action: ignore}\n"
ADMIN = ("admin", ADMIN_PASSWORD)


def _receive(store: Store, tmp: Path, study: str, at: datetime) -> None:
    series = study + ".1"
    folder = tmp / "spool" / series
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        path = folder / f"{i}.dcm"
        path.write_bytes(b"DICM")
        store.record_instance(
            study_uid=study,
            series_uid=series,
            sop_instance_uid=f"{series}.{i + 1}",
            sop_class_uid=CT,
            transfer_syntax="1.2.840.10008.1.2.1",
            path=path,
            size_bytes=4,
            study_attrs={"StudyDescription": "CT ABDOMEN"},
            series_attrs={
                "Modality": "CT",
                "SOPClassUID": CT,
                "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
                "SliceThickness": 3.0,
                "ConvolutionKernel": "STANDARD",
                "BodyPartExamined": "ABDOMEN",
            },
            calling_aet="PACS",
            source="dimse",
            slice_position=float(i * 3),
            now=at,
        )


@pytest.fixture
def work_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DICOMNODE_ADMIN_PASSWORD", ADMIN_PASSWORD)
    settings = make_settings(tmp_path / "data")
    node = build_node(settings, "work", analyze=fake_analyze)
    yield node
    node.stop()


def test_work_node_routes_with_the_web_rules_provider(work_node: Any) -> None:
    """One rules provider, constructed in cli and handed to both: nothing is patched after construction."""
    web = work_node.app.state.web
    assert work_node.runner.select == web.rules.provider.select  # bound methods of the same provider
    assert web.actions.on_jobs_created == work_node.executor.wake
    assert work_node.runner.delivery_lease_s == 120.0 and work_node.runner.stale_job_s == 300.0


def test_rules_saved_in_another_process_apply_to_the_next_routing(work_node: Any, tmp_path: Path) -> None:
    settings = work_node.settings
    # The split case: 'receive' has its own app and store on the same database; an admin saves rules there.
    from dicomnode.web.app import create_app

    receive_store = Store(make_engine(settings.database_url_resolved()))
    receive_app = create_app(settings, receive_store, role="receive")
    t0 = datetime.now(UTC)
    _receive(work_node.store, tmp_path, STUDY, t0)
    with TestClient(receive_app) as client:
        r = client.put("/api/rules", json={"yaml": IGNORE_ALL, "comment": "pause"}, auth=ADMIN)
        assert r.status_code == 200
        # The work process's very next routing decision uses the new version: nothing is analysed.
        assert work_node.runner.sweep_completion(now=t0 + timedelta(hours=1)) == []
        decisions = work_node.store.decisions(STUDY)
        assert decisions and not any(d.decision.selected for d in decisions)

        # Back to the shipped rules: a new study is selected at once.
        r = client.put("/api/rules", json={"yaml": default_rules_text(), "comment": "resume"}, auth=ADMIN)
        assert r.status_code == 200
        other = STUDY + "0"
        _receive(work_node.store, tmp_path, other, t0)
        jobs = work_node.runner.sweep_completion(now=t0 + timedelta(hours=2))
        assert len(jobs) == 1
        assert work_node.store.get_job(jobs[0]).study_instance_uid == other
    receive_store.close()


def test_stop_releases_the_sweeps(work_node: Any) -> None:
    assert work_node.runner.owns_sweeps() is True
    store = Store(make_engine(work_node.settings.database_url_resolved()))
    try:
        assert store.lease_holder("sweeps") == work_node.runner.sweep_owner
        work_node.stop()
        assert store.lease_holder("sweeps") is None
    finally:
        store.close()


def _args(config: Path, **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(config=config, http_port=None, delivery_lease=None, stale_job=None, **kw)


def test_worker_leases_come_from_the_config_and_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path / 'data'}\nworkers: {{delivery_lease_seconds: 45, stale_job_seconds: 90}}\n"
    )
    s = load(_args(cfg))
    assert (s.workers.delivery_lease_seconds, s.workers.stale_job_seconds) == (45.0, 90.0)
    a = _args(cfg)
    a.delivery_lease, a.stale_job = 10.0, 600.0
    s = load(a)
    assert (s.workers.delivery_lease_seconds, s.workers.stale_job_seconds) == (10.0, 600.0)
    a.stale_job = -1.0
    with pytest.raises(ConfigError, match="--stale-job"):
        load(a)
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nworkers: {{delivery_lease_seconds: 0}}\n")
    with pytest.raises(ConfigError, match=r"workers\.delivery_lease_seconds"):
        load(_args(cfg))
