"""Deliveries against real peers.

dcmtk storescp, pynetdicom SCPs answering chosen statuses, a closed port, Orthanc with its DICOMweb plugin
(STOW-RS out), and our own STOW-RS receiver served by uvicorn (STOW-RS in).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
import uvicorn
from dicom_testing import make_instances, running_orthanc, sop_of
from fastapi import FastAPI
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt

from dicomnode.delivery import (
    DicomwebPeer,
    DimsePeer,
    RetryPolicy,
    deliver,
    deliver_with_retry,
    echo,
)
from dicomnode.domain import DeliveryOutcome
from dicomnode.errors import PermanentError, RetryableError
from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.stow import build_stow_router
from dicomnode.netutil import enable_tcp_nodelay, free_port, wait_port

pytestmark = pytest.mark.integration

STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CORNERSTONE = "edge_and_negative/cornerstone"


def need(path: str, what: str) -> str:
    if not os.path.exists(path):
        msg = f"{path} not installed ({what})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)
    return path


# -- dcmtk storescp -------------------------------------------------------------------------------------
@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    exe = need(STORESCP, "Debian package dcmtk")
    port = free_port()
    out = tmp_path / "storescp-out"
    out.mkdir()
    proc = subprocess.Popen(
        [exe, "-aet", "STORESCP", "+xa", "-od", str(out), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cstore_to_storescp(storescp: tuple[int, Path], tmp_path: Path, shared_data: Path) -> None:
    port, out = storescp
    files = make_instances(tmp_path / "a", 3)
    j2k = shared_data / "edge_and_negative/cornerstone/CT1_J2KR.dcm"
    peer = DimsePeer("STORESCP", "127.0.0.1", port, "BMDNODE", name="storescp")
    res = deliver(peer, [*files, j2k])
    assert res.ok, res.message
    assert [f.status for f in res.files] == [0, 0, 0, 0]
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert set(received) == {sop_of(f) for f in [*files, j2k]}
    # The compressed image was sent as is (pynetdicom cannot transcode; the context proposed its syntax).
    assert pydicom.dcmread(received[sop_of(j2k)]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    e = echo(peer)
    assert e.ok, e.message


# -- pynetdicom SCPs with chosen behaviour ---------------------------------------------------------------
class StatusSCP:
    """A pynetdicom SCP answering C-STORE with statuses chosen per InstanceNumber (and per attempt)."""

    def __init__(self, statuses: dict[int, list[int]], *, require_calling: list[str] | None = None,
                 sop_class: str = CTImageStorage) -> None:  # fmt: skip
        self.statuses = statuses
        self.seen: list[tuple[int, int]] = []
        enable_tcp_nodelay()
        self.ae = AE(ae_title="STATUSSCP")
        self.ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        self.ae.add_supported_context("1.2.840.10008.1.1")
        if require_calling:
            self.ae.require_calling_aet = require_calling
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert self.server is not None
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        n = int(event.dataset.InstanceNumber)
        queue = self.statuses.get(n, [0])
        code = queue.pop(0) if len(queue) > 1 else queue[0]
        self.seen.append((n, code))
        return code

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def test_status_classes_from_a_real_scp(tmp_path: Path) -> None:
    scp = StatusSCP({1: [0x0000], 2: [0xB000], 3: [0xA700], 4: [0x0122], 5: [0xC000]})
    try:
        files = make_instances(tmp_path / "a", 5)
        res = deliver(DimsePeer("STATUSSCP", "127.0.0.1", scp.port, "BMDNODE"), files)
    finally:
        scp.close()
    by_n = {i + 1: f for i, f in enumerate(res.files)}
    assert by_n[1].outcome is DeliveryOutcome.SUCCESS and by_n[1].status == 0
    assert by_n[2].outcome is DeliveryOutcome.SUCCESS and by_n[2].status == 0xB000  # warning = stored
    assert by_n[3].outcome is DeliveryOutcome.RETRYING and by_n[3].status == 0xA700
    assert by_n[4].outcome is DeliveryOutcome.PERMANENT_FAILURE and by_n[4].status == 0x0122
    assert by_n[5].outcome is DeliveryOutcome.PERMANENT_FAILURE and by_n[5].status == 0xC000
    assert res.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert res.warnings == 1
    with pytest.raises(PermanentError):
        res.raise_for_outcome()


def test_transient_status_is_retried_for_the_failed_file_only(tmp_path: Path) -> None:
    scp = StatusSCP({2: [0xA700, 0xA701, 0x0000]})
    attempts: list[tuple[int, DeliveryOutcome, float | None, int]] = []
    sleeps: list[float] = []
    try:
        files = make_instances(tmp_path / "a", 3)
        res = deliver_with_retry(
            DimsePeer("STATUSSCP", "127.0.0.1", scp.port, "BMDNODE"),
            files,
            RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=10),
            sleep=sleeps.append,
            on_attempt=lambda n, r, o, d: attempts.append((n, o, d, len(r.files))),
        )
    finally:
        scp.close()
    assert res.ok and all(f.outcome is DeliveryOutcome.SUCCESS for f in res.files)
    assert [a[:3] for a in attempts] == [
        (1, DeliveryOutcome.RETRYING, 0.5),
        (2, DeliveryOutcome.RETRYING, 1.0),
        (3, DeliveryOutcome.SUCCESS, None),
    ]
    assert [a[3] for a in attempts] == [3, 1, 1], "only the unconfirmed file is resent"
    assert sleeps == [0.5, 1.0]
    assert sorted(n for n, _ in scp.seen) == [1, 2, 2, 2, 3]


def test_rejected_calling_ae_is_permanent_and_not_retried(tmp_path: Path) -> None:
    scp = StatusSCP({}, require_calling=["SOMEONE"])
    attempts: list[int] = []
    try:
        res = deliver_with_retry(
            DimsePeer("STATUSSCP", "127.0.0.1", scp.port, "BMDNODE"),
            make_instances(tmp_path / "a", 2),
            RetryPolicy(max_attempts=5, base_delay_s=0.01, max_delay_s=0.01),
            sleep=lambda s: None,
            on_attempt=lambda n, r, o, d: attempts.append(n),
        )
        e = echo(DimsePeer("STATUSSCP", "127.0.0.1", scp.port, "BMDNODE"))
    finally:
        scp.close()
    assert res.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert "calling AE title not recognised" in res.message
    assert attempts == [1]
    assert not e.ok and not e.transient and "rejected" in e.message
    assert scp.seen == []


def test_sop_class_refused_at_negotiation_is_permanent(tmp_path: Path) -> None:
    scp = StatusSCP({}, sop_class=MRImageStorage)
    try:
        res = deliver(
            DimsePeer("STATUSSCP", "127.0.0.1", scp.port, "BMDNODE"), make_instances(tmp_path / "a", 1)
        )
    finally:
        scp.close()
    assert res.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert "none of the proposed SOP classes" in res.files[0].message


def test_closed_port_is_transient_until_attempts_run_out(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    sleeps: list[float] = []
    peer = DimsePeer("NOBODY", "127.0.0.1", port, "BMDNODE", timeout_s=3)
    once = deliver(peer, make_instances(tmp_path / "a", 1))
    assert once.outcome is DeliveryOutcome.RETRYING and "cannot connect" in once.message
    with pytest.raises(RetryableError):
        once.raise_for_outcome()
    res = deliver_with_retry(
        peer, make_instances(tmp_path / "b", 1), RetryPolicy(max_attempts=3, base_delay_s=1, max_delay_s=2),
        sleep=sleeps.append,
    )  # fmt: skip
    assert res.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert "after 3 attempts" in res.message
    assert sleeps == [1, 2]
    e = echo(peer)
    assert not e.ok and e.transient


def test_unreadable_file_is_permanent_without_blocking_the_others(
    storescp: tuple[int, Path], tmp_path: Path
) -> None:
    port, out = storescp
    good = make_instances(tmp_path / "a", 1)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    res = deliver(DimsePeer("STORESCP", "127.0.0.1", port, "BMDNODE"), [*good, junk])
    assert res.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert res.failed_files() == [junk]
    assert len(list(out.iterdir())) == 1


# -- Orthanc with DICOMweb (STOW-RS out) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    exe = need(ORTHANC, "Debian package orthanc")
    need(DICOMWEB_PLUGIN, "Debian package orthanc-dicomweb")
    work = tmp_path_factory.mktemp("orthanc")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "TEST-PACS",
        "StorageDirectory": "db",
        "IndexDirectory": "db",
        "Plugins": [DICOMWEB_PLUGIN],
        "HttpServerEnabled": True,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {"node": {"AET": "BMDNODE", "Host": "127.0.0.1", "Port": 11112}},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http}", "Ssl": False},
    }
    with running_orthanc(exe, work, config):
        yield {"http": http, "dicom": dicom}


def test_stow_to_orthanc(orthanc: dict[str, int], tmp_path: Path, shared_data: Path) -> None:
    base = f"http://127.0.0.1:{orthanc['http']}"
    peer = DicomwebPeer(f"{base}/dicom-web", name="orthanc-web")
    files = make_instances(tmp_path / "a", 2)
    sr = shared_data / "edge_and_negative/cornerstone/no-pixel-data_SR.dcm"
    res = deliver_with_retry(peer, [*files, sr], RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=2))
    assert res.ok, res.message
    for f in [*files, sr]:
        found = requests.post(f"{base}/tools/lookup", data=sop_of(f), timeout=5).json()
        assert found and found[0]["Type"] == "Instance"
    probe = echo(peer)
    assert probe.ok, probe.message
    missing = deliver(DicomwebPeer(f"{base}/no-such-root"), files[:1])
    assert missing.outcome is DeliveryOutcome.PERMANENT_FAILURE and "HTTP 404" in missing.message
    down = deliver(DicomwebPeer(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=3), files[:1])
    assert down.outcome is DeliveryOutcome.RETRYING
    unreachable = echo(DicomwebPeer(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=3))
    assert not unreachable.ok and unreachable.transient


def test_cstore_to_orthanc(orthanc: dict[str, int], tmp_path: Path) -> None:
    files = make_instances(tmp_path / "a", 3)
    # Orthanc may answer a transient status while its index is busy with the previous test's writes; the
    # retry policy is what production applies, so the test applies it too (and checks the final outcome).
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=2)
    peer = DimsePeer("ORTHANC", "127.0.0.1", orthanc["dicom"], "BMDNODE")
    res = deliver_with_retry(peer, files, policy)
    assert res.ok, res.message
    stranger = deliver(DimsePeer("ORTHANC", "127.0.0.1", orthanc["dicom"], "STRANGER"), files[:1])
    # Orthanc refuses unknown calling AEs (DicomAlwaysAllowStore false) with a permanent rejection or a
    # refused C-STORE; either way it must not be retried forever.
    assert stranger.outcome is DeliveryOutcome.PERMANENT_FAILURE, stranger.message
    assert "calling AE title not recognised" in stranger.message


# -- STOW-RS in: our receiver behind a real uvicorn --------------------------------------------------------
@pytest.fixture
def stow_server(tmp_path: Path) -> Iterator[tuple[str, MemorySink]]:
    sink = MemorySink()
    spool = Spool(tmp_path / "spool", sink, other_classes="refuse")
    app = FastAPI()
    app.include_router(build_stow_router(spool))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}/dicomweb", sink
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_stow_round_trip_through_uvicorn(stow_server: tuple[str, MemorySink], tmp_path: Path) -> None:
    url, sink = stow_server
    cts = make_instances(tmp_path / "a", 3)
    res = deliver(DicomwebPeer(url, name="self"), cts)
    assert res.ok, res.message
    assert set(sink.instances) == {sop_of(f) for f in cts}
    for f in cts:
        stored = sink.instances[sop_of(f)].path
        assert stored is not None and pydicom.dcmread(stored).PixelData == pydicom.dcmread(f).PixelData
    # MR is refused by this receiver's policy: 0x0122 per instance, HTTP 202 (partial) then 409 (all).
    mixed = deliver(
        DicomwebPeer(url),
        [*make_instances(tmp_path / "b", 1), *make_instances(tmp_path / "c", 1, sop_class=MRImageStorage)],
    )
    assert mixed.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert sorted((f.status or 0) for f in mixed.files) == [0, 0x0122]
    only_mr = deliver(DicomwebPeer(url), make_instances(tmp_path / "d", 2, sop_class=MRImageStorage))
    assert only_mr.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert [f.status for f in only_mr.files] == [0x0122, 0x0122]


def test_orthanc_pushes_to_our_scp(orthanc: dict[str, int], tmp_path: Path, shared_data: Path) -> None:
    """The production direction: the PACS (Orthanc) C-STOREs a study to the node, compressed ones included."""
    from dicomnode.ingest.scp import AllowedCaller, StorageSCP

    base = f"http://127.0.0.1:{orthanc['http']}"
    sink = MemorySink()
    with StorageSCP(
        Spool(tmp_path / "spool", sink),
        ae_title="DICOMNODE",
        port=0,
        allowed_callers=[AllowedCaller("ORTHANC")],
    ) as scp:
        r = requests.put(
            f"{base}/modalities/dicomnode",
            json={"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": scp.port},
            timeout=5,
        )
        assert r.ok, r.text
        study = generate_uid()
        files = [
            *make_instances(tmp_path / "a", 3, study=study),
            shared_data / CORNERSTONE / "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
        ]
        ids = []
        for f in files:
            up = requests.post(f"{base}/instances", data=f.read_bytes(), timeout=10)
            assert up.ok, up.text
            ids.append(up.json()["ID"])
        sent = requests.post(
            f"{base}/modalities/dicomnode/store", json={"Resources": ids, "Synchronous": True}, timeout=60
        )
        assert sent.ok, sent.text
        assert sent.json()["FailedInstancesCount"] == 0
    for f in files:
        rec = sink.instances[sop_of(f)]
        assert rec.calling_ae_title == "ORTHANC" and rec.path is not None
        assert pydicom.dcmread(rec.path).PixelData == pydicom.dcmread(f).PixelData
