"""The spool retention sweep removes a study's received files *and* the rows of those instances (a row
never points at a file that is gone); study, series and job rows stay as history. Real instances, received
through the spool into the store."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.config import Settings
from dicomnode.ingest import Spool
from dicomnode.pipeline.runner import Runner
from dicomnode.pipeline.sink import StoreSink
from dicomnode.store import Store, make_engine, upgrade

pytestmark = pytest.mark.integration


def _instance(path: Path, study: str, series: str, k: int, sop_class: str = CTImageStorage) -> None:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.PatientID = "RET"
    ds.InstanceNumber = k + 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros(16, dtype=np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def test_retention_deletes_the_rows_of_the_instances_it_removes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", retention={"spool_days": 30})
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    store = Store(engine)
    spool = Spool(settings.spool_dir, StoreSink(store))
    old, kept = generate_uid(), generate_uid()
    old_series, kept_series = generate_uid(), generate_uid()
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        for study, series in ((old, old_series), (kept, kept_series)):
            f = src / f"{series}-{k}.dcm"
            _instance(f, study, series, k)
            assert spool.ingest_file(f, source="dimse").ok
    # An instance of another storage class (kept under ignored/) belongs to the old study too.
    sc = src / "sc.dcm"
    _instance(sc, old, generate_uid(), 0, SecondaryCaptureImageStorage)
    assert spool.ingest_file(sc, source="dimse").ignored
    assert store.ingest_totals()[0] == 7

    ancient = (datetime.now(UTC) - timedelta(days=31)).timestamp()
    for base in (settings.spool_dir / old, settings.spool_dir / "ignored" / old):
        for f in base.rglob("*"):
            os.utime(f, (ancient, ancient))
    runner = Runner(settings, store, analyze=lambda *a, **k: None)  # type: ignore[arg-type,return-value]
    assert runner.clean_spool() == 2  # the study's folder in the spool and under ignored/

    assert not (settings.spool_dir / old).exists()
    assert store.instances(old_series) == []
    # The history stays: the study and its series are still listed.
    assert store.get_study(old).study_instance_uid == old
    assert store.get_series(old_series).series_instance_uid == old_series
    # The other study is untouched, files and rows.
    survivors = store.instances(kept_series)
    assert len(survivors) == 3 and all(i.path.is_file() for i in survivors)
    assert store.ingest_totals()[0] == 3
    # No row points at a file that is gone.
    for s in store.list_series(limit=100).items:
        assert all(i.path.is_file() for i in store.instances(s.series_instance_uid))
    spool.close()
    engine.dispose()
