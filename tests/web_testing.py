"""Helpers for the web tests (``tests/unit/test_web_*``, ``tests/integration/test_web_*``, ``tests/e2e``).

Seeds a node the real way: a small phantom study written by ``dicomnode.imaging.writer.write_study``, ingested
through the spool and the store sink, completed and routed by the pipeline's Runner (with the web's rules
provider), analysed by the real analysis step when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from fastapi import FastAPI

from dicomnode.config import Settings, load_settings
from dicomnode.netutil import free_port
from dicomnode.store import Store, make_engine, upgrade

ADMIN_PASSWORD = "admin-pass-123"
VIEWER_PASSWORD = "viewer-pass-123"
#: Cheap argon2 parameters: the tests log in many times.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def make_settings(data_dir: Path, **extra: Any) -> Settings:
    """Settings for a test node: data in ``data_dir``, one C-STORE destination on a closed port that fails
    at once (``delivery.max_attempts: 1``), short completion periods."""
    closed = free_port()  # nobody listens there: association refused
    cfg: dict[str, Any] = {
        "data_dir": str(data_dir),
        "dicom": {"port": free_port(), "free_space_floor_mb": 0},
        "http": {"port": free_port()},
        "completion": {"series_quiet_seconds": 1, "study_quiet_seconds": 0},
        "destinations": [
            {
                "kind": "dimse",
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": closed,
                "timeout_seconds": 2,
            }
        ],
        "delivery": {"max_attempts": 1, "backoff_base_seconds": 1, "backoff_max_seconds": 1},
    }
    cfg.update(extra)
    path = data_dir.parent / f"{data_dir.name}-config.yaml"
    import yaml

    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return load_settings(path, environ={})


def make_store(settings: Settings) -> Store:
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    return Store(engine)


@dataclass(frozen=True)
class PhantomStudy:
    study_uid: str
    localizer: list[Path]
    soft: list[Path]
    bone: list[Path]

    @property
    def files(self) -> list[Path]:
        return [*self.localizer, *self.bone, *self.soft]


def write_phantom_study(folder: Path, matrix: int = 96) -> PhantomStudy:
    """A three-series phantom study (localizer, 5 mm bone kernel, 3 mm soft) small enough for unit tests."""
    import pydicom

    from dicomnode.imaging.writer import write_study
    from dicomnode.phantom import PhantomSpec, make_phantom

    ph = make_phantom(
        PhantomSpec(
            matrix=matrix, spacing_mm=min(5.0, 384.0 / matrix), thickness_mm=1.5, z_levels=("T11", "L5")
        )
    )
    series = write_study(
        ph.volume, folder, header={"StudyDescription": "CT ABDOMEN PHANTOM", "BodyPartExamined": "ABDOMEN"}
    )
    uid = str(pydicom.dcmread(series["soft"][0], stop_before_pixels=True).StudyInstanceUID)
    return PhantomStudy(uid, series["localizer"], series["soft"], series["bone"])


def ingest(settings: Settings, store: Store, files: Sequence[Path]) -> int:
    """Ingest ``files`` through the real spool write path into the store; returns how many were stored."""
    from dicomnode.ingest import Spool
    from dicomnode.pipeline.sink import StoreSink

    spool = Spool(settings.spool_dir, StoreSink(store), fsync=False)
    n = 0
    for f in files:
        r = spool.ingest_file(Path(f), calling_ae_title="TESTSCU")
        n += bool(r.ok)
    return n


def make_runner(
    settings: Settings, store: Store, select: Callable[..., Any] | None, analyze: Any = None
) -> Any:
    """The pipeline's Runner with the real (in-process) analysis unless ``analyze`` is given."""
    from dicomnode.pipeline.executors import analyze_job
    from dicomnode.pipeline.runner import Runner

    return Runner(settings, store, analyze=analyze or analyze_job, select=select)


def complete_and_route(runner: Any) -> list[int]:
    """Complete every series (as if the quiet period were over) and route; returns the job ids."""
    jobs: list[int] = runner.sweep_completion(now=datetime.now(UTC) + timedelta(hours=2))
    return jobs


def build_admin_app(settings: Settings, store: Store, *, probe: Any = None) -> FastAPI:
    """``create_app`` with the admin installed explicitly (known admin password, cheap hashing)."""
    from dicomnode.web.admin import install_admin
    from dicomnode.web.app import create_app

    app = create_app(settings, store, admin=False)
    install_admin(
        app,
        settings,
        store,
        environ={"DICOMNODE_ADMIN_PASSWORD": ADMIN_PASSWORD},
        password_hasher=FAST_HASHER,
        probe=probe,
    )
    app.state.web.users.create("viewer", VIEWER_PASSWORD, "viewer")
    return app


def write_sc(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A small RGB secondary-capture DICOM (stands in for the report's overlay in fast tests)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    rgb[size // 4 : size // 2, size // 4 : size // 2] = (255, 0, 0)
    rgb[..., 2] = rng.integers(0, 30, (size, size), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def fake_analyze(request: Any) -> Any:
    """A quick analysis step: a fixed result.json and one SC overlay (the real one takes ~10 s)."""
    import json

    from dicomnode.domain import AnalysisStatus, ResultFiles
    from dicomnode.pipeline.runner import AnalysisOutcome

    result = {
        "status": "ok",
        "reason": None,
        "series_instance_uid": request.series_instance_uid,
        "summary": {
            "l1_hu": 142.0,
            "vbmd_l1_l2_mg_cm3": 118.5,
            "category": "osteopenia",
            "contrast_phase": "native",
        },
        "vertebrae": [{"level": "L1", "trabecular_hu_mean": 142.0, "vbmd_mg_cm3": 117.0, "excluded": False}],
    }
    rj = request.out_dir / "result.json"
    rj.write_text(json.dumps(result))
    sc = write_sc(request.out_dir / "sc_00_overview.dcm")
    return AnalysisOutcome(AnalysisStatus.OK, None, result, outputs=ResultFiles(str(rj), None, (str(sc),)))


@dataclass
class SeededNode:
    """A node with one phantom study received, routed, analysed (fake step) and its delivery failed."""

    settings: Settings
    store: Store
    app: FastAPI
    study: PhantomStudy
    runner: Any
    job_id: int


def seed_node(tmp: Path, *, analyze: Any = None, probe: Any = None, matrix: int = 80) -> SeededNode:
    settings = make_settings(tmp / "data")
    store = make_store(settings)
    app = build_admin_app(settings, store, probe=probe)
    study = write_phantom_study(tmp / "study", matrix=matrix)
    ingest(settings, store, study.files)
    runner = make_runner(settings, store, app.state.web.rules.select, analyze=analyze or fake_analyze)
    jobs = complete_and_route(runner)
    runner.run_next_job("test-worker")
    return SeededNode(settings, store, app, study, runner, jobs[0])
