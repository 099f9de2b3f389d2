"""The shared write path of ingest (dicomnode.ingest.spool) with a real filesystem and an in-memory sink."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicomnode.ingest import MemorySink, OtherClassPolicy, ReceivedInstance, Spool, reindex_spool
from dicomnode.ingest import spool as spool_module
from dicomnode.ingest.spool import IngestResult

# Some tests build deliberately invalid UIDs; pydicom warns when they are assigned.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def make_ds(
    sop_class: str = CTImageStorage, *, study: str | None = None, series: str | None = None
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "CT" if sop_class == CTImageStorage else "MR"
    ds.PatientName = "Doe^Jane"
    ds.StudyDescription = "CT ABDOMEN"
    ds.SliceThickness = "1.25"
    ds.InstanceNumber = "7"
    ds.ImagePositionPatient = ["-100", "-120", "35.5"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.int16).tobytes()
    return ds


def encode(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = ts == ImplicitVRLittleEndian
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def part10(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(ts)
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


class FailingSink:
    """A sink whose database is down (raises), then comes back."""

    def __init__(self) -> None:
        self.down = True
        self.inner = MemorySink()

    def record_instance(self, instance: ReceivedInstance) -> bool:
        if self.down:
            raise ConnectionError("database is down")
        return self.inner.record_instance(instance)


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def spool(tmp_path: Path, sink: MemorySink) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool", sink)
    yield spool
    spool.close()


def leftover_temp(spool: Spool) -> list[Path]:
    """Temp files left once the spool is closed (closing removes the empty ones it created ahead)."""
    spool.close()
    return list(spool.temp_dir.iterdir())


def test_stored_bytes_are_exactly_what_was_received(spool: Spool, sink: MemorySink) -> None:
    ds = make_ds()
    data = encode(ds, ImplicitVRLittleEndian)
    res = spool.ingest_dataset(
        data, ImplicitVRLittleEndian, sop_class_uid=CTImageStorage, sop_instance_uid=ds.SOPInstanceUID,
        calling_ae_title="PACS",
    )  # fmt: skip
    assert res.status == 0x0000 and res.ok and not res.ignored
    assert res.path == spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert res.path is not None
    raw = res.path.read_bytes()
    assert raw.endswith(data), "dataset bytes must be written as received, not re-encoded"
    back = pydicom.dcmread(res.path)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "PACS"
    assert np.array_equal(back.pixel_array, np.arange(16, dtype=np.int16).reshape(4, 4))
    rec = sink.instances[ds.SOPInstanceUID]
    assert rec.path == res.path and rec.source == "dimse" and rec.calling_ae_title == "PACS"
    assert rec.attributes["StudyDescription"] == "CT ABDOMEN"
    assert rec.attributes["SliceThickness"] == pytest.approx(1.25)
    assert "PatientName" not in rec.attributes
    assert rec.instance_number == 7
    assert rec.image_position_patient == (-100.0, -120.0, 35.5)
    assert rec.image_orientation_patient == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert not leftover_temp(spool), "no temp file left behind"


def test_duplicate_is_overwritten_and_reported(spool: Spool, sink: MemorySink) -> None:
    ds = make_ds()
    first = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    ds.SliceThickness = "2.5"
    second = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert first.ok and not first.duplicate
    assert second.ok and second.duplicate
    assert second.path == first.path
    assert second.path is not None and pydicom.dcmread(second.path).SliceThickness == 2.5
    assert len(sink) == 1 and sink.calls == 2


@pytest.mark.parametrize(
    ("mutate", "status", "word"),
    [
        (lambda ds: delattr(ds, "SOPInstanceUID"), 0xC211, "SOPInstanceUID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "../../etc"), 0xC211, "StudyInstanceUID"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.03"), 0xC211, "SeriesInstanceUID"),
        (lambda ds: delattr(ds, "SOPClassUID"), 0xC211, "SOPClassUID"),
    ],
)
def test_bad_uids_fail_and_write_nothing(
    spool: Spool, sink: MemorySink, mutate: Any, status: int, word: str
) -> None:
    ds = make_ds()
    mutate(ds)
    res = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert res.status == status and not res.ok
    assert res.comment is not None and word in res.comment
    assert len(sink) == 0
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []


def test_request_and_dataset_must_agree(spool: Spool) -> None:
    ds = make_ds()
    data = encode(ds)
    wrong_class = spool.ingest_dataset(data, ExplicitVRLittleEndian, sop_class_uid=MRImageStorage)
    wrong_sop = spool.ingest_dataset(data, ExplicitVRLittleEndian, sop_instance_uid="1.2.3.4")
    assert wrong_class.status == 0xA900
    assert wrong_sop.status == 0xC212


def test_unparseable_and_truncated_data_fail_with_c210(spool: Spool, sink: MemorySink) -> None:
    data = encode(make_ds())
    for bad in (b"\x00\x01garbage", data[: len(data) - 5]):
        res = spool.ingest_dataset(bad, ExplicitVRLittleEndian)
        assert res.status == 0xC210 and res.comment
    assert len(sink) == 0


def test_free_space_floor_gives_a700(tmp_path: Path, sink: MemorySink) -> None:
    spool = Spool(tmp_path / "s", sink, free_space_floor_mb=10**12)  # an exabyte: always below
    res = spool.ingest_dataset(encode(make_ds()), ExplicitVRLittleEndian)
    assert res.status == 0xA700 and "free space" in (res.comment or "")
    assert len(sink) == 0


def test_database_failure_keeps_file_fails_and_reindex_recovers(tmp_path: Path) -> None:
    failing = FailingSink()
    spool = Spool(tmp_path / "s", failing)
    ds = make_ds()
    res = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert res.status == 0xA702 and not res.ok
    assert res.path is None
    kept = spool.final_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ignored=False)
    assert kept.is_file(), "the file must stay when the database write fails"
    failing.down = False
    report = reindex_spool(spool)
    assert report.recorded_new == 1 and report.failed == []
    rec = failing.inner.instances[ds.SOPInstanceUID]
    assert rec.source == "reindex" and rec.path == kept
    assert rec.attributes["Modality"] == "CT"
    again = spool.reindex()
    assert again.recorded_new == 0 and again.already_known == 1


def test_reindex_reports_misplaced_files_and_removes_stale_temp(spool: Spool, sink: MemorySink) -> None:
    ds = make_ds()
    wrong = spool.root / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(part10(ds))
    stale = spool.new_temp_path()
    stale.write_bytes(b"half a file")
    old = time.time() - 10 * 86400
    os.utime(stale, (old, old))
    fresh = spool.new_temp_path()
    fresh.write_bytes(b"being written")
    report = reindex_spool(spool)
    assert report.recorded_new == 0
    assert len(report.failed) == 1 and "belongs" in report.failed[0][1]
    assert report.stale_temp_removed == 1
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("policy", list(OtherClassPolicy))
def test_other_sop_classes_follow_the_policy(tmp_path: Path, policy: OtherClassPolicy) -> None:
    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink, other_classes=policy)
    ds = make_ds(MRImageStorage)
    res = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    if policy is OtherClassPolicy.REFUSE:
        assert res.status == 0x0122 and len(sink) == 0
        return
    assert res.status == 0x0000 and res.ignored
    rec = sink.instances[ds.SOPInstanceUID]
    assert rec.ignored
    if policy is OtherClassPolicy.IGNORE:
        assert (
            res.path
            == spool.ignored_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        )
        assert res.path is not None and res.path.is_file()
    else:
        assert res.path is None and rec.path is None
        assert [p for p in spool.root.rglob("*.dcm")] == []


def test_policy_coercion_from_config_values() -> None:
    assert OtherClassPolicy.coerce("ignore") is OtherClassPolicy.IGNORE
    assert OtherClassPolicy.coerce("REFUSE") is OtherClassPolicy.REFUSE
    assert OtherClassPolicy.coerce(True) is OtherClassPolicy.IGNORE
    assert OtherClassPolicy.coerce(False) is OtherClassPolicy.REFUSE
    with pytest.raises(ValueError):
        OtherClassPolicy.coerce("maybe")


def test_ingest_file_moves_part10_bytes_unchanged(spool: Spool, sink: MemorySink) -> None:
    ds = make_ds()
    raw = part10(ds)
    tmp = spool.new_temp_path()
    tmp.write_bytes(raw)
    res = spool.ingest_file(tmp, source="stow")
    assert res.ok and res.path is not None
    assert res.path.read_bytes() == raw
    assert not tmp.exists()
    assert sink.instances[ds.SOPInstanceUID].source == "stow"


def test_ingest_file_refuses_non_part10_and_other_study(spool: Spool, sink: MemorySink) -> None:
    tmp = spool.new_temp_path()
    tmp.write_bytes(encode(make_ds()))  # no preamble / file meta
    res = spool.ingest_file(tmp)
    assert res.status == 0xC210 and not tmp.exists()
    tmp2 = spool.new_temp_path()
    tmp2.write_bytes(part10(make_ds()))
    res2 = spool.ingest_file(tmp2, expected_study_uid="1.2.3.4.5")
    assert res2.status == 0xA900 and not tmp2.exists()
    assert len(sink) == 0


def test_write_error_is_a_failure_not_an_exception(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: Any, dst: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    res = spool.ingest_dataset(encode(make_ds()), ExplicitVRLittleEndian)
    assert res.status == 0xA701 and "Permission denied" in (res.comment or "")
    assert not leftover_temp(spool), "the temp file is cleaned up"


def test_unexpected_errors_never_escape(tmp_path: Path) -> None:
    def bad_summary(ds: Dataset) -> dict[str, Any]:
        raise RuntimeError("summary exploded")

    def bad_callback(result: Any) -> None:
        raise RuntimeError("callback exploded")

    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink, header_fn=bad_summary, on_result=bad_callback)
    ds = make_ds()
    res = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    # A broken summary loses attributes, never the instance.
    assert res.ok and sink.instances[ds.SOPInstanceUID].attributes == {}


def test_metrics_count_instances_and_bytes(spool: Spool) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    stored0 = value("dicomnode_ingest_instances_total", source="dimse", result="stored")
    failed0 = value("dicomnode_ingest_instances_total", source="dimse", result="failed")
    bytes0 = value("dicomnode_ingest_bytes_total", source="dimse")
    data = encode(make_ds())
    spool.ingest_dataset(data, ExplicitVRLittleEndian)
    spool.ingest_dataset(b"garbage!", ExplicitVRLittleEndian)
    assert value("dicomnode_ingest_instances_total", source="dimse", result="stored") == stored0 + 1
    assert value("dicomnode_ingest_instances_total", source="dimse", result="failed") == failed0 + 1
    assert value("dicomnode_ingest_bytes_total", source="dimse") == bytes0 + len(data)


def test_logs_carry_no_patient_data(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    ds = make_ds()
    ds.SOPInstanceUID = "1.2.03"  # invalid: produces a warning line
    spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert caplog.records, "a refused instance is logged"
    assert "Doe" not in caplog.text and "Jane" not in caplog.text


def test_series_summary_is_computed_once_per_series(tmp_path: Path) -> None:
    calls: list[str] = []

    def summary(ds: Dataset) -> dict[str, Any]:
        calls.append(str(ds.SOPInstanceUID))
        return {"SeriesDescription": str(ds.get("SeriesDescription", ""))}

    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink, header_fn=summary)
    first = make_ds()
    first.SeriesDescription = "first"
    second = make_ds(study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
    second.SeriesDescription = "second"
    other = make_ds()
    for ds in (first, second, other):
        assert spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian).ok
    assert calls == [first.SOPInstanceUID, other.SOPInstanceUID]
    assert sink.instances[second.SOPInstanceUID].attributes["SeriesDescription"] == "first"


def test_ingest_file_outside_the_temp_area_is_copied_not_taken(
    spool: Spool, sink: MemorySink, tmp_path: Path
) -> None:
    ds = make_ds()
    src = tmp_path / "import" / "a.dcm"
    src.parent.mkdir()
    src.write_bytes(part10(ds))
    res = spool.ingest_file(src, source="import")
    assert res.ok and res.path is not None
    assert src.is_file() and src.read_bytes() == res.path.read_bytes()
    junk = tmp_path / "import" / "junk.dcm"
    junk.write_bytes(b"junk")
    assert spool.ingest_file(junk).status == 0xC210
    assert junk.is_file(), "a refused file outside the spool is left alone"
    assert not leftover_temp(spool)


def test_durability_order_data_sync_then_rename_then_directory_sync(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync
    real_fdatasync = getattr(os, "fdatasync", os.fsync)

    def fdatasync(fd: int) -> None:
        events.append(
            ("data", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?")
        )
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        events.append(("dir", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ds = make_ds()
    res = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert res.ok and res.path is not None
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["data", "rename"], "file data is on disk before it gets its final name"
    dirs = {p for k, p in events if k == "dir"}
    if "?" not in dirs:  # /proc available: check which directories were flushed
        series_dir, study_dir = res.path.parent, res.path.parent.parent
        assert {str(series_dir), str(study_dir), str(spool.root)} <= dirs


class GatedSink(MemorySink):
    """A sink whose record blocks until the test opens the gate (a slow database commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def record_instance(self, instance: ReceivedInstance) -> bool:
        self.entered.set()
        assert self.gate.wait(30)
        return super().record_instance(instance)


def test_answer_waits_for_the_record(tmp_path: Path) -> None:
    sink = GatedSink()
    spool = Spool(tmp_path / "s", sink)
    ds = make_ds()
    final = spool.final_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ignored=False)
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian))
    )
    worker.start()
    assert sink.entered.wait(30)
    deadline = time.monotonic() + 30
    while not final.is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert final.is_file(), "the file is in place before the record is made"
    assert not results, "no status before the database record is done"
    sink.gate.set()
    worker.join(30)
    assert results and results[0].status == 0x0000 and results[0].path == final


def test_no_record_before_the_file_landed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink)
    renaming, gate = threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_replace(src: Any, dst: Any) -> None:
        renaming.set()
        assert gate.wait(30)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    ds = make_ds()
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian))
    )
    worker.start()
    assert renaming.wait(30)
    time.sleep(0.2)
    assert ds.SOPInstanceUID not in sink.instances, "the record waits for the file to be in place"
    assert not results, "no status before the file is renamed into place"
    gate.set()
    worker.join(30)
    assert results and results[0].ok and results[0].path is not None and results[0].path.is_file()
    assert sink.instances[ds.SOPInstanceUID].path == results[0].path


@pytest.mark.parametrize(
    ("error", "status"), [(OSError(28, "No space left on device"), 0xA700), (OSError(5, "I/O error"), 0xA701)]
)
def test_file_that_fails_to_land_is_refused_and_never_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, status: int
) -> None:
    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink)

    def broken_replace(src: Any, dst: Any) -> None:
        raise error

    monkeypatch.setattr(os, "replace", broken_replace)
    ds = make_ds()
    res = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert res.status == status and not res.ok, "the sender must keep its copy and resend"
    assert not leftover_temp(spool)
    assert ds.SOPInstanceUID not in sink.instances, "a refused instance leaves no record"
    monkeypatch.undo()
    # The resend lands the file and records it.
    again = spool.ingest_dataset(encode(ds), ExplicitVRLittleEndian)
    assert again.ok and again.path is not None and again.path.is_file()
    assert sink.instances[ds.SOPInstanceUID].path == again.path


def test_pydicom_parses_the_header_of_the_first_instance_of_a_series_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The others are checked and recorded from what the structure check collects (UIDs, instance number,
    # position, orientation: the same values), and a first instance pydicom cannot read is still refused.
    from dicomnode.ingest import dicomparse

    parsed: list[str] = []
    real = dicomparse.HeaderScan.dataset

    def dataset(self: dicomparse.HeaderScan) -> Dataset:
        parsed.append(str(self.text(0x00080018)))
        return real(self)

    monkeypatch.setattr(dicomparse.HeaderScan, "dataset", dataset)
    sink = MemorySink()
    spool = Spool(tmp_path / "s", sink)
    first = make_ds()
    rest = [make_ds(study=first.StudyInstanceUID, series=first.SeriesInstanceUID) for _ in range(3)]
    rest[1].InstanceNumber = "8"
    rest[1].ImagePositionPatient = ["-100", "-120", "36.75"]
    data = [memoryview(encode(ds)) for ds in (first, *rest)]
    assert all(spool.ingest_dataset(d, ExplicitVRLittleEndian).ok for d in data)
    assert set(parsed) == {first.SOPInstanceUID}
    second = sink.instances[rest[1].SOPInstanceUID]
    assert second.instance_number == 8 and second.image_position_patient == (-100.0, -120.0, 36.75)
    assert second.image_orientation_patient == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert second.series_instance_uid == first.SeriesInstanceUID
    assert second.attributes == sink.instances[first.SOPInstanceUID].attributes
    assert second.attributes["StudyDescription"] == "CT ABDOMEN"
    assert second.path is not None and second.path.read_bytes().endswith(bytes(data[2]))

    def unreadable(self: dicomparse.HeaderScan) -> Dataset:
        raise dicomparse.DatasetError("dataset cannot be parsed: a test")

    monkeypatch.setattr(dicomparse.HeaderScan, "dataset", unreadable)
    new_series = make_ds()
    res = spool.ingest_dataset(encode(new_series), ExplicitVRLittleEndian)
    assert res.status == 0xC210 and new_series.SOPInstanceUID not in sink.instances


def test_a_short_write_is_written_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev
    calls: list[int] = []

    def writev(fd: int, buffers: list[Any]) -> int:
        calls.append(len(buffers))
        return real(fd, [memoryview(buffers[0])[:1000]])  # at most 1000 bytes of the first buffer

    monkeypatch.setattr(os, "writev", writev)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        spool_module._write_all(fd, b"m" * 1500, memoryview(b"d" * 2500), b"")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"m" * 1500 + b"d" * 2500
    assert calls == [2, 2, 1, 1, 1], "both parts, then the rest of the second"


def test_temp_names_are_unique_and_known_as_this_process(spool: Spool) -> None:
    from dicomnode.ingest.spool import _TEMP_NAME

    names = [spool.new_temp_path().name for _ in range(1000)]
    assert len(set(names)) == 1000
    assert all((m := _TEMP_NAME.match(n)) and int(m.group(1)) == os.getpid() for n in names)


def _stored(spool: Spool) -> IngestResult:
    ds = make_ds()
    res = spool.ingest_dataset(
        encode(ds), ExplicitVRLittleEndian, sop_class_uid=CTImageStorage, sop_instance_uid=ds.SOPInstanceUID
    )
    assert res.status == 0x0000 and res.path is not None
    return res


def test_temp_files_are_created_ahead_used_and_removed_at_close(spool: Spool) -> None:
    _stored(spool)  # the first C-STORE starts the thread that creates them
    deadline = time.monotonic() + 10
    while len(list(spool.temp_dir.iterdir())) < spool_module.TEMP_FILES_AHEAD and time.monotonic() < deadline:
        time.sleep(0.01)
    ahead = list(spool.temp_dir.iterdir())
    assert len(ahead) == spool_module.TEMP_FILES_AHEAD
    assert all(p.stat().st_size == 0 and p.name.startswith(f"{os.getpid()}-") for p in ahead)
    inodes = {p.stat().st_ino for p in ahead}
    res = _stored(spool)
    assert res.path is not None and res.path.stat().st_ino in inodes, "written into a file created ahead"
    assert not leftover_temp(spool), "closing removes the files not used"
    _stored(spool)  # a C-STORE after close() starts again
    assert not leftover_temp(spool)


def test_temp_files_created_ahead_too_long_ago_are_not_used(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "TEMP_AHEAD_MAX_AGE_S", -1.0)
    _stored(spool)
    time.sleep(0.2)
    for _ in range(3):
        _stored(spool)
    assert not leftover_temp(spool)


def test_temp_files_named_by_an_earlier_process_with_this_id_are_removed(
    tmp_path: Path, sink: MemorySink
) -> None:
    # A container's node has the same process id at every start: its files from before are not "alive".
    root = tmp_path / "spool"
    (root / ".tmp").mkdir(parents=True)
    earlier = root / ".tmp" / f"{os.getpid()}-{'f' * 16}1.part"
    earlier.write_bytes(b"")
    spool = Spool(root, sink)
    assert not earlier.exists()
    mine = spool.new_temp_path()
    mine.write_bytes(b"being written")
    Spool(root, sink)  # another spool of this process keeps this process's files
    assert mine.exists()
