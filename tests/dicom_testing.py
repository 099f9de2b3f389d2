"""Test support shared by the delivery and TLS tests: small Part 10 instances, and a real Orthanc run from a
config dict (started, waited for, stopped)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_instances(
    folder: Path, n: int, *, sop_class: str = CTImageStorage, study: str | None = None
) -> list[Path]:
    """``n`` small 8x8 instances of one new series (Part 10, explicit VR little endian); CT unless
    ``sop_class`` says otherwise (then the modality is MR)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "CT" if sop_class == CTImageStorage else "MR"
        ds.PatientName = "Delivery^Test"
        ds.PatientID = "DLV1"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.full(64, i, dtype=np.int16).tobytes()
        p = folder / f"f{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def ct_slice(study: str, series: str, k: int, size: int = 8, patient: str = "Test^Patient") -> Dataset:
    """Slice ``k`` (``size`` x ``size``, every pixel ``k``) of a CT series, ready for C-STORE (explicit VR
    little endian)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.PatientName = patient
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(k)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.full(size * size, k, dtype=np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def assert_all_recorded(database: Path, study: str, acked: dict[str, bytes]) -> None:
    """Every instance of ``study`` answered with success (``acked``: SOP Instance UID -> pixel bytes) has its
    record in the node's SQLite ``database`` and its file on disk with the same pixels."""
    from dicomnode.store import Store, make_engine

    engine = make_engine(f"sqlite:///{database}")
    try:
        store = Store(engine)
        recorded = {}
        for s in store.list_series(study_uid=study).items:
            for inst in store.instances(s.series_instance_uid):
                recorded[inst.sop_instance_uid] = inst.path
        missing = [uid for uid in acked if uid not in recorded]
        assert not missing, f"{len(missing)} acknowledged instance(s) lost"
        for uid, pixels in acked.items():
            assert pydicom.dcmread(recorded[uid]).PixelData == pixels
    finally:
        engine.dispose()


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@contextmanager
def running_orthanc(exe: str, work: Path, config: dict[str, Any]) -> Iterator[None]:
    """Orthanc on ``config`` (written to ``work/orthanc.json``), ready when ``/system`` answers on its
    ``HttpPort``; stopped on exit. Its log, ``work/orthanc.log``, ends the error when it never starts."""
    (work / "orthanc.json").write_text(json.dumps(config))
    log = open(work / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [exe, str(work / "orthanc.json")],
        cwd=work,
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        end = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{config['HttpPort']}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("Orthanc did not start: " + (work / "orthanc.log").read_text()[-2000:])
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
