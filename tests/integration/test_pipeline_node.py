"""The node's processes against real peers: config errors, ``echo``, and ``receive`` + ``work`` split over
PostgreSQL with a pynetdicom sender and a pynetdicom storage peer as the destination, stopped by SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from postgres_testing import postgres_unavailable_reason, temporary_database
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomnode.domain import JobState
from dicomnode.netutil import free_port as _free_port
from dicomnode.store import Store

pytestmark = pytest.mark.integration

DICOMNODE = [sys.executable, "-m", "dicomnode"]


class Peer:
    """A pynetdicom C-ECHO / C-STORE SCP keeping what it receives in memory."""

    def __init__(self, ae_title: str = "PEER") -> None:
        self.received: list[pydicom.Dataset] = []
        self.callers: list[str] = []
        ae = AE(ae_title)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax)
        self.port = _free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda e: 0x0000)],
        )

    def _store(self, event: Any) -> int:
        self.received.append(event.dataset)
        self.callers.append(event.assoc.requestor.ae_title)
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.stop()


def _config(path: Path, **data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DICOMNODE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"dicom": {"port": "eleven"}}, "dicom.port"),
        ({"destinations": [{"kind": "dimse", "name": "x", "ae_title": "X", "host": "h", "port": 0}]}, "port"),
        ({"completion": {"series_quiet_secs": 3}}, "completion.series_quiet_secs"),
    ],
)
@pytest.mark.parametrize("role", ["serve", "receive", "work"])
def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, role: str, data: dict[str, Any], field: str
) -> None:
    cfg = _config(tmp_path / "bad.yaml", data_dir=str(tmp_path / "data"), **data)
    proc = _run(role, "--config", str(cfg))
    assert proc.returncode == 2
    assert field in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_echo_a_dimse_destination(tmp_path: Path, peer: Peer) -> None:
    closed = _free_port()
    cfg = _config(
        tmp_path / "node.yaml",
        data_dir=str(tmp_path / "data"),
        destinations=[
            {"kind": "dimse", "name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": peer.port},
            {"kind": "dimse", "name": "gone", "ae_title": "PEER", "host": "127.0.0.1", "port": closed},
        ],
    )
    ok = _run("echo", "peer", "--config", str(cfg))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    down = _run("echo", "gone", "--config", str(cfg))
    assert down.returncode == 1
    assert "FAILED" in down.stdout
    unknown = _run("echo", "nowhere", "--config", str(cfg))
    assert unknown.returncode == 2
    assert "nowhere" in unknown.stderr and "peer" in unknown.stderr


@pytest.fixture
def pg_url() -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " -- required under CI")
        pytest.skip(reason)
    with temporary_database() as url:
        yield url


def _start(role: str, cfg: Path, log: Path, http_port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DICOMNODE_ADMIN_PASSWORD="integration-admin")
    with log.open("ab") as fh:
        cmd = [*DICOMNODE, "-v", role, "--config", str(cfg), "--http-port", str(http_port), *extra]
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{role} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/api/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{role} did not start:\n{log.read_text()[-3000:]}")


def _send(files: list[Path], port: int) -> None:
    ae = AE("MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status is not None and status.Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.slow
def test_receive_and_work_split_over_postgresql(tmp_path: Path, pg_url: str, peer: Peer) -> None:
    from dicomnode.imaging.writer import write_study
    from dicomnode.phantom import PhantomSpec, make_phantom

    ph = make_phantom(
        PhantomSpec(matrix=256, spacing_mm=1.3, thickness_mm=1.5, z_levels=("T11", "L5"), seed=3)
    )
    study = write_study(ph.volume, tmp_path / "study")
    dicom_port, recv_http, work_http = _free_port(), _free_port(), _free_port()
    cfg = _config(
        tmp_path / "node.yaml",
        data_dir=str(tmp_path / "data"),
        database_url=pg_url,
        dicom={"port": dicom_port, "allowed_calling_aets": ["MODALITY"]},
        completion={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        destinations=[
            {"kind": "dimse", "name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": peer.port}
        ],
    )
    receiver = _start("receive", cfg, tmp_path / "receive.log", recv_http)
    worker = _start("work", cfg, tmp_path / "work.log", work_http)
    try:
        _send([*study["localizer"], *study["soft"]], dicom_port)
        deadline = time.monotonic() + 180
        while not any(ds.Modality == "SR" for ds in peer.received) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert any(ds.Modality == "SR" for ds in peer.received), (tmp_path / "work.log").read_text()[-3000:]
    finally:
        for proc in (worker, receiver):
            proc.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=60), receiver.wait(timeout=60)]
    # SIGTERM is a graceful stop: exit status 0, and the stop was logged.
    assert codes == [0, 0]
    assert "stopping" in (tmp_path / "work.log").read_text()
    soft_uid = pydicom.dcmread(study["soft"][0], stop_before_pixels=True).SeriesInstanceUID
    (sr,) = [ds for ds in peer.received if ds.Modality == "SR"]
    assert sr.StudyInstanceUID == pydicom.dcmread(study["soft"][0], stop_before_pixels=True).StudyInstanceUID
    assert set(peer.callers) == {"DICOMNODE"}
    store = Store.from_url(pg_url)
    try:
        jobs = store.list_jobs().items
        assert [(j.series_instance_uid, j.state) for j in jobs] == [(soft_uid, JobState.DONE)]
        decisions = {d.decision.series_instance_uid: d.decision for d in store.decisions(sr.StudyInstanceUID)}
        assert len(decisions) == 2 and decisions[soft_uid].selected
    finally:
        store.close()


def test_serve_on_the_embedded_default_answers_health_and_stops_on_sigint(tmp_path: Path) -> None:
    """``serve`` with the embedded defaults (SQLite in the data dir) answers health and stops on SIGINT."""
    http = _free_port()
    cfg = _config(tmp_path / "node.yaml", data_dir=str(tmp_path / "data"), dicom={"port": _free_port()})
    proc = _start("serve", cfg, tmp_path / "serve.log", http, "--analysis-in-process")
    try:
        health = requests.get(f"http://127.0.0.1:{http}/api/health", timeout=5).json()
        assert health["status"] == "ok" and health["role"] == "serve"
        assert (tmp_path / "data" / "dicomnode.sqlite3").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0
