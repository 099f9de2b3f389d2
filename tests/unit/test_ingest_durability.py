"""What a C-STORE success promises after a power loss: every flush the promise needs happens, in the right
order, before the answer (a power cut cannot be staged in a test; the order and the settings can be checked).

The process-crash half (kill -9 in the middle of four associations) is
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

from dicomnode.ingest import Spool
from dicomnode.pipeline.sink import StoreSink
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


def test_sqlite_commits_are_flushed_to_the_device(store: Store) -> None:
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2, "FULL: a commit is on the device"
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_every_flush_happens_before_the_answer_in_order(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four instances stored at once (group commit): for each, the file data is flushed before its
    rename, the directory after it, and the database commit after both; the answers come last."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_replace, real_fsync = os.replace, os.fsync
    real_fdatasync = getattr(os, "fdatasync", os.fsync)

    def note(kind: str, what: str) -> None:
        with lock:
            events.append((kind, what))

    def fd_path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        note("data", fd_path(fd))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        note("dir", fd_path(fd))

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        note("rename", f"{src} -> {dst}")

    sink = StoreSink(store)
    real_record = sink.record_instances

    def record_instances(instances: Any) -> list[bool]:
        out = real_record(instances)  # returns once the transaction is committed
        for inst in instances:
            note("commit", str(inst.path))
        return out

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(sink, "record_instances", record_instances)
    spool = Spool(tmp_path / "spool", sink)
    study, series = generate_uid(), generate_uid()
    results: list[Any] = []

    def send(k: int) -> None:
        res = spool.ingest_dataset(encoded_ct(study, series, k), ExplicitVRLittleEndian)
        note("answer", str(res.path))
        with lock:
            results.append(res)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r.ok and r.path is not None for r in results)
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
