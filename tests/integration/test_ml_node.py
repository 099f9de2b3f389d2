"""Model bundles in the node: a bundle trained here on phantoms is used by the analysis and named by its SR;
a tampered bundle, or one whose input spec the node's series cannot meet, is refused at start-up.

Issue 5 acceptance: "Trained on phantoms made by ``dicomnode phantom``, ..., the resulting bundle loads in the
node and produces an SR that names it." The bundle is trained for a few seconds: what is checked here is the
wiring (configuration -> analysis -> result.json -> SR), not the accuracy of the network (that is
``test_ml_train.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch
import yaml

from dicomnode.domain import AnalysisStatus
from dicomnode.ml import datasets as ds
from dicomnode.ml.bundle import load_bundle
from dicomnode.ml.train import TrainConfig, train
from dicomnode.netutil import free_port as _free_port
from dicomnode.pipeline.analyze import analyze_path
from dicomnode.pipeline.measure import resolve_options

pytestmark = pytest.mark.integration

ACCESSION = "ACC-ML-1"
ALGORITHM_NAME = hd.sr.CodedConcept(value="111001", scheme_designator="DCM", meaning="Algorithm Name")
ALGORITHM_PARAMETERS = hd.sr.CodedConcept(
    value="111002", scheme_designator="DCM", meaning="Algorithm Parameters"
)


@pytest.fixture(scope="module")
def bmd_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vBMD bundle trained for seconds on coarse phantoms (as ``dicomnode train bmd`` makes them)."""
    if not ds.phantom_available():
        pytest.fail("dicomnode.phantom is part of the package; it must be importable")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bmd-bundle")
    dev = ds.export_bmd(ds.make_cases(range(300, 304), "phantom", matrix=80, spacing_mm=3.0), root / "dev")
    cfg = TrainConfig(
        task="bmd", data=dev, out=root / "bundle", folds=0, epochs=2, batch_size=16, lr=3e-3, width=4,
        patch=(32, 32, 32), spacing_mm=3.0, samples_per_case=1, seed=0, progress=False, threads=1,
        name="phantom-vbmd-test", version="0.0.1",
    )  # fmt: skip
    train(cfg)
    return root / "bundle"


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom CT series T11-L5 as DICOM files (what the node receives)."""
    from dicomnode.imaging.writer import write_dicom_series
    from dicomnode.phantom import PhantomSpec, make_phantom

    ph = make_phantom(
        PhantomSpec(matrix=160, spacing_mm=2.0, thickness_mm=2.5, z_levels=("T11", "L5"), seed=5)
    )
    folder = tmp_path_factory.mktemp("series") / "in"
    write_dicom_series(ph.volume, folder, header={"AccessionNumber": ACCESSION})
    return folder


def _sr_algorithm_texts(path: Path) -> tuple[set[str], set[str]]:
    """Algorithm names and parameters of every measurement group of an SR read back with highdicom."""
    sr = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(path))  # 2D regions only: Comprehensive SR
    names: set[str] = set()
    params: set[str] = set()

    def walk(items: pydicom.Sequence | None) -> None:
        for item in items or []:
            if "ConceptNameCodeSequence" in item and "TextValue" in item:
                code = item.ConceptNameCodeSequence[0].CodeValue
                if code == ALGORITHM_NAME.value:
                    names.add(str(item.TextValue))
                elif code == ALGORITHM_PARAMETERS.value:
                    params.add(str(item.TextValue))
            walk(item.get("ContentSequence"))

    walk(sr.ContentSequence)
    return names, params


def test_bundle_trained_on_phantoms_is_named_by_the_sr(
    bmd_bundle: Path, phantom_series: Path, tmp_path: Path
) -> None:
    """Issue 5 acceptance: the phantom-trained bundle runs in the node's analysis and the SR names it."""
    bundle = load_bundle(bmd_bundle)
    options = resolve_options(bmd_estimator=f"both:{bmd_bundle}", erosion_mm=3.5)
    run = analyze_path(phantom_series, tmp_path / "out", job_key="ml-node-1", options=options)
    assert run.result.status is AnalysisStatus.OK, run.result.reason
    # the SR names the bundle (name and version) beside the engine
    assert run.outputs is not None and run.outputs.sr is not None
    names, params = _sr_algorithm_texts(run.outputs.sr)
    assert any(bundle.name in n for n in names), names
    assert any(bundle.name in p and bundle.version in p and bundle.manifest.sha256[:12] in p for p in params)
    assert any(p.startswith("engine: dicomnode") for p in params)
    assert any("erosion 3.5 mm" in p for p in params)
    # both estimators: the calibrated ROI stays, the model's vBMD and the difference are reported
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["accession_number"] == ACCESSION
    from dicomnode.ml.evaluate import read_predictions

    # ``dicomnode evaluate`` finds this result under its accession number
    preds = read_predictions(tmp_path / "out")
    assert preds.values[ACCESSION] == pytest.approx(doc["summary"]["vbmd_l1_l2_mg_cm3"])
    assert bundle.name in doc["algorithm_name"] and bundle.version in doc["algorithm_version"]
    assert any("model - ROI" in n for n in doc["summary"]["notes"])
    assert any("model - ROI" in p for p in params)
    assert doc["summary"]["calibration"]["method"] != f"model:{bundle.name}"


def test_series_the_bundle_cannot_serve_fails_with_one_line(
    bmd_bundle: Path, phantom_series: Path, tmp_path: Path
) -> None:
    """A series the bundle's input spec cannot meet (slices too thick): one line naming the bundle."""
    strict = tmp_path / "strict"
    shutil.copytree(bmd_bundle, strict, ignore=shutil.ignore_patterns("training"))
    meta = strict / "configs" / "metadata.json"
    doc = json.loads(meta.read_text())
    doc["input_spec"]["max_spacing_mm"] = 1.0  # the series has 2.5 mm slices
    meta.write_text(json.dumps(doc))
    run = analyze_path(phantom_series, tmp_path / "out", options=resolve_options(f"bundle:{strict}"))
    assert run.result.status is AnalysisStatus.FAILED
    reason = run.result.reason or ""
    assert doc["name"] in reason and "coarser" in reason and "\n" not in reason
    assert not (tmp_path / "out" / "sr.dcm").exists()


# --- start-up refusal ---------------------------------------------------------------------------------


def _tampered(bundle: Path, where: Path) -> Path:
    bad = where / "tampered-bundle"
    shutil.copytree(bundle, bad, ignore=shutil.ignore_patterns("training"))
    weights = bad / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    return bad


def _node(args: list[str], tmp_path: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def _config(tmp_path: Path, analysis: dict[str, object]) -> Path:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "dicom": {"port": _free_port()},
                "http": {"port": _free_port()},
                "analysis": analysis,
            }
        )
    )
    return cfg


@pytest.mark.parametrize("role", ["serve", "work"])
def test_tampered_bundle_stops_the_node_at_start(bmd_bundle: Path, tmp_path: Path, role: str) -> None:
    bad = _tampered(bmd_bundle, tmp_path)
    cfg = _config(tmp_path, {"bmd_estimator": f"both:{bad}"})
    proc = _node([role, "--config", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and "sha256 mismatch" in lines[0]
    assert "Traceback" not in proc.stderr and "HTTP" not in proc.stdout  # never started


def test_bundle_no_ct_can_meet_stops_the_node_at_start(bmd_bundle: Path, tmp_path: Path) -> None:
    mr = tmp_path / "mr-bundle"
    shutil.copytree(bmd_bundle, mr, ignore=shutil.ignore_patterns("training"))
    meta = mr / "configs" / "metadata.json"
    doc = json.loads(meta.read_text())
    doc["input_spec"]["modalities"] = ["MR"]
    meta.write_text(json.dumps(doc))
    cfg = _config(tmp_path, {"backend": f"bundle:{mr}"})
    proc = _node(["serve", "--config", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and doc["name"] in lines[0] and "CT" in lines[0], proc.stderr


def test_analyze_refuses_a_tampered_bundle_before_reading(
    bmd_bundle: Path, phantom_series: Path, tmp_path: Path
) -> None:
    bad = _tampered(bmd_bundle, tmp_path)
    proc = _node(
        ["analyze", str(phantom_series), "--out", str(tmp_path / "out"), "--bmd-estimator", f"both:{bad}"],
        tmp_path,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sha256 mismatch" in lines[0] and str(bad) in lines[0], proc.stderr
    assert not (tmp_path / "out" / "sr.dcm").exists()
