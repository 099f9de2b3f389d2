"""The C-STORE SCP against real peers: dcmtk storescu/echoscu and pynetdicom SCUs over loopback sockets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.delivery import DimsePeer, deliver
from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.reactors import event_driven_reactors_enabled
from dicomnode.ingest.scp import AllowedCaller, StorageSCP

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
CORNERSTONE = "edge_and_negative/cornerstone"
#: cornerstone test file -> storescu option that proposes its transfer syntax (so it is sent as is).
COMPRESSED = {
    "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm": "-xs",
    "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm": "-xt",
    "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm": "-xv",
    "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm": "-xr",
    "CT1_J2KR.dcm": "-xv",
}


def need_tool(path: str) -> str:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        msg = f"{path} not installed (Debian package dcmtk)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)
    return path


def dcmtk_env() -> dict[str, str]:
    # dcmtk keeps Nagle on unless told (stack.md G1).
    return dict(os.environ, TCP_NODELAY="1")


def make_ct(folder: Path, n: int, *, study: str | None = None, rows: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = generate_uid()
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.PatientName = "Ingest^Test"
        ds.PatientID = "ING1"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = rows
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (np.arange(rows * rows, dtype=np.int16) + i).tobytes()
        p = folder / f"ct{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def storescu(
    port: int, *args: str, aet: str = "STORESCU", aec: str = "DICOMNODE"
) -> subprocess.CompletedProcess[str]:
    cmd = [need_tool(STORESCU), "-aet", aet, "-aec", aec, *args[:-1], "127.0.0.1", str(port), args[-1]]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def send_raw(
    port: int, sop_class: str, sop_instance: str, data: bytes, *, context_class: str | None = None
) -> int | None:
    """Send a C-STORE whose dataset bytes are exactly ``data`` (pynetdicom would re-encode a Dataset)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(context_class or sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.Priority = 2
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.DataSet = BytesIO(data)
        cx_id = assoc.accepted_contexts[0].context_id
        assert cx_id is not None
        # Same dance as Association.send_c_store: pause the reactor while we exchange one message.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, cx_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        return None if rsp is None or rsp.Status is None else int(rsp.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = False
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[StorageSCP, MemorySink, Spool]]:
    sink = MemorySink()
    spool = Spool(tmp_path / "spool", sink)
    scp = StorageSCP(
        spool,
        port=0,
        allowed_callers=[AllowedCaller("STORESCU"), AllowedCaller("PINNED", "10.255.255.1")],
        max_associations=30,
    )
    scp.start()
    try:
        yield scp, sink, spool
    finally:
        scp.stop()


def assert_same_instance(stored: Path, source: Path) -> None:
    a, b = pydicom.dcmread(stored), pydicom.dcmread(source)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    assert a.PixelData == b.PixelData


def test_storescu_single_file_and_folder(node: tuple[StorageSCP, MemorySink, Spool], tmp_path: Path) -> None:
    scp, sink, _ = node
    files = make_ct(tmp_path / "in", 6)
    r1 = storescu(scp.port, str(files[0]))
    assert r1.returncode == 0, r1.stderr
    r2 = storescu(scp.port, "+sd", str(tmp_path / "in"))
    assert r2.returncode == 0, r2.stderr
    assert len(sink) == 6
    for f in files:
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        rec = sink.instances[sop]
        assert rec.path is not None and rec.path.is_file()
        assert rec.calling_ae_title == "STORESCU" and rec.source == "dimse"
        assert_same_instance(rec.path, f)
    assert sink.calls == 7  # the first file was sent twice: a duplicate, overwritten


def test_compressed_files_are_stored_as_received(
    node: tuple[StorageSCP, MemorySink, Spool], shared_data: Path
) -> None:
    scp, sink, _ = node
    folder = shared_data / CORNERSTONE
    for name, option in COMPRESSED.items():
        r = storescu(scp.port, option, str(folder / name))
        assert r.returncode == 0, f"{name}: {r.stderr}"
        src = pydicom.dcmread(folder / name)
        rec = sink.instances[src.SOPInstanceUID]
        assert rec.transfer_syntax_uid == src.file_meta.TransferSyntaxUID, name
        assert rec.path is not None
        assert_same_instance(rec.path, folder / name)
    # JPEG lossless process 14 (4.57) has no storescu option: our own SCU sends it as is.
    p14 = folder / "CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm"
    res = deliver(DimsePeer("DICOMNODE", "127.0.0.1", scp.port, "STORESCU"), [p14])
    assert res.ok, res.message
    sop = pydicom.dcmread(p14, stop_before_pixels=True).SOPInstanceUID
    assert sink.instances[sop].transfer_syntax_uid == "1.2.840.10008.1.2.4.57"
    # The structured report (another SOP class) is accepted and kept aside under the default policy.
    r = storescu(scp.port, str(folder / "no-pixel-data_SR.dcm"))
    assert r.returncode == 0, r.stderr
    sr = sink.instances[pydicom.dcmread(folder / "no-pixel-data_SR.dcm").SOPInstanceUID]
    assert sr.ignored and sr.path is not None and "ignored" in sr.path.parts


def test_association_policy(node: tuple[StorageSCP, MemorySink, Spool], tmp_path: Path) -> None:
    scp, sink, _ = node
    f = make_ct(tmp_path / "in", 1)[0]
    bad = storescu(scp.port, str(f), aet="INTRUDER")
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr
    pinned = storescu(scp.port, str(f), aet="PINNED")  # allowed, but only from another address
    assert "Calling AE Title Not Recognized" in pinned.stderr
    wrong_called = storescu(scp.port, str(f), aec="SOMEONE")
    assert "Called AE Title Not Recognized" in wrong_called.stderr
    assert len(sink) == 0
    echo = subprocess.run(
        [need_tool(ECHOSCU), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(scp.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr


def test_garbage_and_half_open_connections_do_not_stop_the_scp(
    node: tuple[StorageSCP, MemorySink, Spool], tmp_path: Path
) -> None:
    scp, sink, _ = node
    idle = socket.create_connection(("127.0.0.1", scp.port))  # connects and never speaks
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"\x01\x00\x00\x00\xff\xff\xff\xff"):
        with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass  # reset by the SCP is an acceptable answer to garbage
    f = make_ct(tmp_path / "in", 1)[0]
    r = storescu(scp.port, str(f))
    assert r.returncode == 0, r.stderr
    assert len(sink) == 1
    idle.close()


def test_truncated_wrong_class_and_uidless_datasets(
    node: tuple[StorageSCP, MemorySink, Spool], tmp_path: Path
) -> None:
    scp, sink, spool = node
    ds = pydicom.dcmread(make_ct(tmp_path / "in", 1)[0])
    sop = str(ds.SOPInstanceUID)
    data = encode(ds)
    assert send_raw(scp.port, CTImageStorage, sop, data[:-100]) == 0xC210
    assert send_raw(scp.port, CTImageStorage, sop, b"\xde\xad\xbe\xef" * 10) == 0xC210
    no_uid = ds.copy()
    del no_uid.SOPInstanceUID
    assert send_raw(scp.port, CTImageStorage, sop, encode(no_uid)) == 0xC211
    # A CT dataset sent as MR: the dataset does not match the SOP class of the request.
    assert send_raw(scp.port, MRImageStorage, sop, data) == 0xA900
    assert len(sink) == 0
    assert [p for p in spool.root.rglob("*.dcm")] == []
    assert send_raw(scp.port, CTImageStorage, sop, data) == 0x0000
    assert len(sink) == 1


def test_refuse_policy_rejects_other_classes_at_negotiation(tmp_path: Path, shared_data: Path) -> None:
    sink = MemorySink()
    with StorageSCP(Spool(tmp_path / "s", sink, other_classes="refuse"), port=0) as scp:
        r = storescu(scp.port, str(shared_data / CORNERSTONE / "no-pixel-data_SR.dcm"))
        assert r.returncode != 0
        assert (
            "No presentation context" in r.stderr or "no acceptable presentation context" in r.stderr.lower()
        )
        ok = storescu(scp.port, str(make_ct(tmp_path / "in", 1)[0]))
        assert ok.returncode == 0, ok.stderr
    assert len(sink) == 1


def test_twenty_concurrent_associations(node: tuple[StorageSCP, MemorySink, Spool], tmp_path: Path) -> None:
    scp, sink, _ = node
    results: dict[str, int | None] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def pynetdicom_sender(k: int) -> None:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        files = make_ct(tmp_path / f"p{k}", 4)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
        if not assoc.is_established:
            errors.append(f"sender {k}: association not established")
            return
        for f in files:
            st = assoc.send_c_store(f)
            with lock:
                results[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = (
                    int(st.Status) if st else None
                )
            time.sleep(0.05)  # keep the associations overlapping
        assoc.release()

    def storescu_sender(k: int) -> None:
        folder = tmp_path / f"s{k}"
        files = make_ct(folder, 4)
        r = storescu(scp.port, "+sd", str(folder))
        for f in files:
            with lock:
                results[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = (
                    0 if r.returncode == 0 else None
                )

    threads = [
        threading.Thread(target=pynetdicom_sender if k % 2 else storescu_sender, args=(k,)) for k in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(results) == 80
    assert all(v == 0 for v in results.values()), results
    for sop in results:
        rec = sink.instances[sop]
        assert rec.path is not None and rec.path.is_file()
    assert len(sink) == 80


def test_below_free_space_floor_answers_a700(tmp_path: Path) -> None:
    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink, free_space_floor_mb=shutil.disk_usage(tmp_path).free / 1e6 + 10_000)
    with StorageSCP(spool, port=0) as scp:
        f = make_ct(tmp_path / "in", 1)[0]
        r = storescu(scp.port, "-v", str(f))
        assert r.returncode != 0
        assert "Refused: OutOfResources" in r.stderr, r.stderr
        ds = pydicom.dcmread(f)
        assert send_raw(scp.port, CTImageStorage, ds.SOPInstanceUID, encode(ds)) == 0xA700
    assert len(sink) == 0


def test_storescu_into_the_real_store(tmp_path: Path) -> None:
    """The production sink: storescu -> SCP -> spool -> Store (SQLite), concurrent associations included."""
    from dicomnode.pipeline.sink import StoreSink
    from dicomnode.store import Store, make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    upgrade(engine)
    store = Store(engine)
    spool = Spool(tmp_path / "spool", StoreSink(store))
    study = generate_uid()
    folders = [tmp_path / f"in{k}" for k in range(3)]
    files = {k: make_ct(folders[k], 5, study=study) for k in range(3)}
    with StorageSCP(spool, port=0) as scp:
        threads = [threading.Thread(target=storescu, args=(scp.port, "+sd", str(f))) for f in folders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        storescu(scp.port, str(files[0][0]))  # a duplicate
    for k in range(3):
        series_uid = str(pydicom.dcmread(files[k][0], stop_before_pixels=True).SeriesInstanceUID)
        rows = store.instances(series_uid)
        assert len(rows) == 5
        assert all(r.path.is_file() and r.source == "dimse" and r.calling_aet == "STORESCU" for r in rows)
        series = store.get_series(series_uid)
        assert series.n_instances == 5 and series.modality == "CT"
    engine.dispose()


def test_event_driven_reactors_serve_dcmtk_back_to_back(
    node: tuple[StorageSCP, MemorySink, Spool], tmp_path: Path
) -> None:
    # StorageSCP.start installs the event-driven pynetdicom reactors (pynetdicom 3.0.x): dcmtk peers that
    # fire requests back to back on one association must get every answer, and the association must close
    # with a normal release.
    scp, sink, _ = node
    if pynetdicom.__version__.startswith("3.0."):
        assert event_driven_reactors_enabled()
    echo = subprocess.run(
        [need_tool(ECHOSCU), "-aet", "STORESCU", "-aec", "DICOMNODE", "--repeat", "100", "-d",
         "127.0.0.1", str(scp.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr[-2000:]
    log = echo.stdout + echo.stderr
    assert log.count("Received Echo Response (Success)") == 100
    assert "Releasing Association" in log and "Aborting" not in log
    files = make_ct(tmp_path / "burst", 40)
    r = storescu(scp.port, "+sd", str(tmp_path / "burst"))
    assert r.returncode == 0, r.stderr
    for f in files:
        rec = sink.instances[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID]
        assert rec.path is not None and rec.path.is_file()
