"""What a C-STORE success promises, under each ``dicom.durability``.

``power`` (the default): after a power loss, every flush the promise needs happens, in the right order, before
the answer (a power cut cannot be staged in a test; the order and the settings can be checked).

``process``: the same order (bytes written, file renamed, record committed, then the answer) and no flush at
all, the recording SQLite connection on ``synchronous=NORMAL`` in WAL mode, the node's other connections
still ``FULL``.

The process-crash half, in both modes (kill -9 in the middle of four associations), is
``tests/integration/test_hardening_dimse.py::test_kill_9_while_storing_loses_no_acknowledged_instance``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import text

from dicomnode.cli.admin import config_summary
from dicomnode.cli.node import build_node, build_spool
from dicomnode.config import Settings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.ingest import Spool
from dicomnode.pipeline.sink import StoreSink
from dicomnode.routing import default_rules
from dicomnode.store import Store, make_engine, upgrade


def encoded_ct(study: str, series: str, k: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.InstanceNumber = k + 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.full(16, k, dtype=np.int16).tobytes()
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    upgrade(engine)
    return Store(engine)


def _event_log() -> tuple[list[tuple[str, str]], Any]:
    """A list of (kind, what) events and the thread-safe function that appends to it."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def note(kind: str, what: str) -> None:
        with lock:
            events.append((kind, what))

    return events, note


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"


def _store_four_at_once(send: Any, results: list[Any]) -> None:
    """Run ``send(k)`` for k = 0..3 in four threads at once; each must have stored its instance."""
    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r.ok and r.path is not None for r in results)


def _trace_renames_and_commits(monkeypatch: pytest.MonkeyPatch, sink: Any, note: Any) -> None:
    """Note each rename (``os.replace``) once done and each instance once its transaction is committed."""
    real_replace, real_record = os.replace, sink.record_instances

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        note("rename", f"{src} -> {dst}")

    def record_instances(instances: Any) -> list[bool]:
        out = real_record(instances)  # returns once the transaction is committed
        for inst in instances:
            note("commit", str(inst.path))
        return out

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(sink, "record_instances", record_instances)


def test_sqlite_commits_are_flushed_to_the_device(store: Store) -> None:
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2, "FULL: a commit is on the device"
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_every_flush_happens_before_the_answer_in_order(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four instances stored at once (group commit): for each, the file data is flushed before its
    rename, the directory after it, and the database commit after both; the answers come last."""
    events, note = _event_log()
    lock = threading.Lock()
    real_fsync = os.fsync
    real_fdatasync = getattr(os, "fdatasync", os.fsync)

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        note("data", _fd_path(fd))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        note("dir", _fd_path(fd))

    sink = StoreSink(store)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    _trace_renames_and_commits(monkeypatch, sink, note)
    spool = Spool(tmp_path / "spool", sink)
    study, series = generate_uid(), generate_uid()
    results: list[Any] = []

    def send(k: int) -> None:
        res = spool.ingest_dataset(encoded_ct(study, series, k), ExplicitVRLittleEndian)
        note("answer", str(res.path))
        with lock:
            results.append(res)

    _store_four_at_once(send, results)
    for res in results:
        final = str(res.path)
        rename = next(i for i, (k, w) in enumerate(events) if k == "rename" and w.endswith(f"-> {final}"))
        tmp = events[rename][1].split(" -> ")[0]
        data = [i for i, (k, w) in enumerate(events) if k == "data" and w in (tmp, "?")]
        dirs = [i for i, (k, w) in enumerate(events) if k == "dir" and w in (str(res.path.parent), "?")]
        commit = events.index(("commit", final))
        answer = events.index(("answer", final))
        assert data and data[0] < rename, "the bytes are on the device before the file gets its name"
        assert any(rename < i < commit for i in dirs), "the directory entry is flushed before the record"
        assert rename < commit < answer, "the record is committed after the file landed, the answer last"
    assert store.get_series(series).n_instances == 4


# -- dicom.durability: process ------------------------------------------------------------------------------


def _synchronous(engine: Any) -> tuple[int, str]:
    with engine.connect() as conn:
        synchronous = conn.execute(text("PRAGMA synchronous")).scalar()
        return synchronous, conn.execute(text("PRAGMA journal_mode")).scalar()


def test_durability_defaults_to_power_and_refuses_other_values(tmp_path: Path) -> None:
    assert Settings().dicom.durability == "power" and Settings().dicom.flush_to_device
    cfg = tmp_path / "node.yaml"
    cfg.write_text("dicom:\n  durability: process\n")
    assert not load_settings(cfg, environ={}).dicom.flush_to_device
    env = {"DICOMNODE_DICOM__DURABILITY": "process"}
    assert load_settings(None, environ=env).dicom.durability == "process"
    cfg.write_text("dicom:\n  durability: fast\n")
    with pytest.raises(ConfigError, match=r"dicom\.durability"):
        load_settings(cfg, environ={})


@pytest.mark.parametrize(
    ("mode", "says"), [("power", "survives a power loss"), ("process", "NOT a power loss or kernel crash")]
)
def test_check_config_says_what_a_success_survives(mode: str, says: str) -> None:
    settings = Settings(dicom={"durability": mode})
    rules = default_rules()
    line = next(x for x in config_summary(settings, rules, None).splitlines() if "durability" in x)
    assert f"durability    {mode}:" in line and says in line


def test_power_records_on_the_nodes_engine_and_flushes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    spool, close = build_spool(settings, engine)
    try:
        assert spool.fsync
        assert spool.sink.store.engine is engine
        assert _synchronous(engine) == (2, "wal")
    finally:
        close()
        engine.dispose()


def test_process_records_on_a_normal_connection_of_its_own(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dicom={"durability": "process"})
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    spool, close = build_spool(settings, engine)
    try:
        assert not spool.fsync
        assert spool.sink.store.engine is not engine
        assert _synchronous(spool.sink.store.engine) == (1, "wal"), "NORMAL in WAL: survives an app crash"
        assert _synchronous(engine) == (2, "wal"), "the node's other commits stay FULL"
    finally:
        close()
        engine.dispose()


def test_process_mode_node_keeps_full_for_everything_but_the_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from web_testing import ADMIN_PASSWORD, make_settings

    from dicomnode.netutil import free_port

    monkeypatch.setenv("DICOMNODE_ADMIN_PASSWORD", ADMIN_PASSWORD)
    settings = make_settings(tmp_path / "data", dicom={"port": free_port(), "durability": "process"})
    node = build_node(settings, "receive")  # nothing started, no port opened
    try:
        spool = node.scp.spool
        assert not spool.fsync
        assert _synchronous(spool.sink.store.engine)[0] == 1
        assert _synchronous(node.store.engine)[0] == 2
    finally:
        node.stop()


def test_process_mode_writes_renames_commits_then_answers_without_any_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four instances stored at once (group commit) with ``dicom.durability: process``: for each, its bytes
    are written before its file is renamed into place, the record committed after the rename, the answer
    last; no fsync or fdatasync is called, and the record is in the database."""
    settings = Settings(data_dir=tmp_path, dicom={"durability": "process"})
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    spool, close = build_spool(settings, engine)
    events, note = _event_log()
    lock = threading.Lock()
    real_writev, real_write = os.writev, os.write

    def flush(fd: int) -> None:
        note("flush", _fd_path(fd))
        raise AssertionError("no flush in process mode")

    def writev(fd: int, buffers: Any) -> int:
        note("write", _fd_path(fd))
        return real_writev(fd, buffers)

    def write(fd: int, data: Any) -> int:
        note("write", _fd_path(fd))
        return real_write(fd, data)

    monkeypatch.setattr(os, "fdatasync", flush)
    monkeypatch.setattr(os, "fsync", flush)
    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "write", write)
    _trace_renames_and_commits(monkeypatch, spool.sink, note)
    study, series = generate_uid(), generate_uid()
    results: list[Any] = []
    sent: dict[str, bytes] = {}

    def send(k: int) -> None:
        data = encoded_ct(study, series, k)
        res = spool.ingest_dataset(data, ExplicitVRLittleEndian)
        note("answer", str(res.path))
        with lock:
            results.append(res)
            sent[str(res.path)] = data

    try:
        _store_four_at_once(send, results)
        assert not [e for e in events if e[0] == "flush"], "nothing is flushed"
        for res in results:
            final = str(res.path)
            rename = next(i for i, (k, w) in enumerate(events) if k == "rename" and w.endswith(f"-> {final}"))
            tmp = events[rename][1].split(" -> ")[0]
            writes = [i for i, (k, w) in enumerate(events) if k == "write" and w in (tmp, "?")]
            commit = events.index(("commit", final))
            answer = events.index(("answer", final))
            assert writes and writes[-1] < rename, "the bytes are written before the file gets its name"
            assert rename < commit < answer, "the record is committed after the file landed, the answer last"
            assert Path(final).read_bytes().endswith(sent[final]), "the file holds the dataset as sent"
        assert Store(engine).get_series(series).n_instances == 4, "committed: another connection sees them"
    finally:
        close()
        engine.dispose()
