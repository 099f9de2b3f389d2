"""``dicomnode train knee-xray`` on generated knee radiographs (issue 12, items 1-2).

Sized for a shared 2-core machine: 48 development and 24 external radiographs at 1.6 mm, knee crops of
48 x 48 pixels of 3 mm, first-stage width 4, 32 epochs, 3 folds, one thread (about a minute for the five
models). Deterministic kernels and seeds as in ``dicomnode.ml.train``; deterministic per machine, not across
CPUs (different vector kernels round differently): with 16 epochs the ResNet-50 reached 0.667 on the external
cases on an Intel host and passed on an AMD one, so it trains until its figures stand clear of the bounds
(on that Intel host: out-of-fold 0.833, AUC 0.957, external 0.958).

What "learns" means here: the classes are balanced by construction, so the majority-class baseline (always
answering the most frequent training class) scores about 0.5 on held-out radiographs; the report states it
beside every figure. The fine-tuned ResNet-50 must beat it by at least 0.25 in out-of-fold accuracy over
all 48 development cases and on the 24 external ones, with an out-of-fold AUC of at least 0.8. These are
statistics over held-out cases, not a single case. No accuracy is claimed for patients.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from dicomnode.cli import main
from dicomnode.domain import AnalysisStatus
from dicomnode.errors import BundleError
from dicomnode.ml.bundle import load_bundle, sha256_file, verify_bundle
from dicomnode.ml.knee_synthetic import make_knee, write_dataset, write_dx
from dicomnode.pipeline.executors import analyze_job
from dicomnode.pipeline.jobs import AnalysisRequest
from dicomnode.pipeline.knee import NO_MODEL, analyze_knee
from dicomnode.pipeline.measure import AnalysisOptions, check_options

pytestmark = pytest.mark.slow

ARGS = [
    "--folds",
    "3",
    "--epochs",
    "32",
    "--batch-size",
    "8",
    "--lr",
    "0.01",
    "--width",
    "4",
    "--patch",
    "48",
    "--spacing",
    "3",
    "--threads",
    "1",
    "--no-progress",
]
ACCEPTED_WARNING = "Unrecognized defined term <99DCMNODE> for value 1 of attribute <Coding Scheme Designator>"


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("knee")
    dev = write_dataset(root / "dev", range(100, 148), spacing_mm=1.6)
    ext = write_dataset(root / "ext", range(900, 924), spacing_mm=1.6)
    out = root / "bundle"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            ["train", "knee-xray", "--data", str(dev), "--external", str(ext), "--out", str(out), *ARGS]
        )
    printed = buf.getvalue()
    print(printed)  # the run log keeps the table
    assert rc == 0
    return out, ext, printed


def test_prints_and_writes_the_study_comparison(trained: tuple[Path, Path, str]) -> None:
    out, _, printed = trained
    for model in ("resnet50-finetuned", "resnet50-frozen", "resnet18", "vgg16", "cnn3"):
        assert model in printed
    assert "study_accuracy" in printed and "quoted, not ours" in printed
    with (out / "training" / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == [
        "resnet50-finetuned",
        "resnet50-frozen",
        "resnet18",
        "vgg16",
        "cnn3",
    ]
    assert all(r["cv_accuracy"] and r["external_accuracy"] for r in rows)
    assert (out / "training" / "comparison.png").stat().st_size > 1000


def test_resnet50_learns_above_the_majority_baseline(trained: tuple[Path, Path, str]) -> None:
    out, _, _ = trained
    report = json.loads((out / "training" / "report.json").read_text())
    res = report["models"]["resnet50-finetuned"]
    cv, ext = res["cross_validation"], res["external"]
    print(
        f"resnet50 out-of-fold accuracy {cv['accuracy']:.3f} (baseline {res['cv_baseline']:.3f}), "
        f"AUC {cv['auc']:.3f}; external {ext['accuracy']:.3f} (baseline {res['external_baseline']:.3f})"
    )
    assert cv["n"] == 48 and ext["n"] == 24
    assert cv["accuracy"] >= res["cv_baseline"] + 0.25
    assert ext["accuracy"] >= res["external_baseline"] + 0.25
    assert cv["auc"] >= 0.8


def test_bundle_loads_and_a_tampered_one_is_refused(trained: tuple[Path, Path, str], tmp_path: Path) -> None:
    out, _, _ = trained
    manifest = verify_bundle(out)
    assert manifest.task == "radiograph" and manifest.output["classes"] == ["normal", "osteoporosis"]
    assert manifest.raw["transfer_weights"] is None  # trained from scratch: said so
    load_bundle(out)
    bad = tmp_path / "tampered"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("training"))
    weights = bad / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bad)
    # the node's start-up check refuses it too (and names the good one)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        check_options(AnalysisOptions(knee_bundle=str(bad)))
    assert check_options(AnalysisOptions(knee_bundle=str(out))) == [f"knee: {manifest.identification}"]
    outcome = analyze_knee(out.parent / "ext" / "images", tmp_path / "o", bundle_path=str(bad))
    assert outcome.status is AnalysisStatus.FAILED and "sha256 mismatch" in (outcome.reason or "")


def _dciodvfy(path: str) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    proc = subprocess.run([tool, path], capture_output=True, text=True, timeout=120)
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return [ln for ln in lines if ln.startswith(("Error", "Warning")) and ACCEPTED_WARNING not in ln]


def _sr_texts(ds: Any) -> list[str]:
    """Every concept name, coded value and text value in an SR content tree."""
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            out.extend(str(c.CodeMeaning) for c in item.get(seq, []))
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(_sr_texts(item))
    return out


def _request(folder: Path, out: Path, series_uid: str) -> AnalysisRequest:
    return AnalysisRequest(
        job_id=1,
        study_instance_uid="",
        series_instance_uid=series_uid,
        version=1,
        input_dir=folder,
        out_dir=out,
        job_key=f"{series_uid}/knee-xray",
        pipeline="knee-xray",
    )


def test_node_job_writes_sr_and_sc_in_the_study(trained: tuple[Path, Path, str], tmp_path: Path) -> None:
    out, _, _ = trained
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    case = make_knee(4242, density=0.1, spacing_mm=1.6, laterality="L")
    src = write_dx(
        case, tmp_path / "in" / "knee.dcm", photometric="MONOCHROME1", transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    outcome = analyze_job(
        _request(src.parent, tmp_path / "out", str(ds.SeriesInstanceUID)),
        AnalysisOptions(knee_bundle=str(out)),
    )
    assert outcome.status is AnalysisStatus.OK, outcome.reason
    knee: dict[str, Any] = outcome.result_json["knee"]
    assert knee["class"] in ("normal", "osteoporosis") and 0.5 <= knee["probability"] <= 1.0
    assert outcome.outputs.sr and len(outcome.outputs.sc) == 1
    for path in (outcome.outputs.sr, outcome.outputs.sc[0]):
        written = pydicom.dcmread(path)
        assert written.StudyInstanceUID == ds.StudyInstanceUID and written.PatientID == ds.PatientID
        assert _dciodvfy(path) == []
    texts = _sr_texts(pydicom.dcmread(outcome.outputs.sr))
    assert "Probability" in texts and "image model only: no fusion bundle configured" in " ".join(texts)
    assert knee["class"].capitalize() in texts  # the class as a coded qualitative evaluation


def test_without_a_bundle_the_job_says_no_model_configured(tmp_path: Path) -> None:
    import pydicom

    src = write_dx(make_knee(7, spacing_mm=1.6), tmp_path / "in" / "knee.dcm")
    uid = str(pydicom.dcmread(src, stop_before_pixels=True).SeriesInstanceUID)
    outcome = analyze_job(_request(src.parent, tmp_path / "out", uid), AnalysisOptions())
    assert outcome.status is AnalysisStatus.NOT_QUALIFYING
    assert outcome.reason == NO_MODEL and outcome.reason.startswith("no model configured")
    assert outcome.outputs.sr is None and outcome.outputs.sc == ()


def test_site_weights_are_checksummed_and_named(trained: tuple[Path, Path, str], tmp_path: Path) -> None:
    from dicomnode.ml.networks import resnet50_2d

    out, _, _ = trained
    weights = tmp_path / "site-resnet50.pt"
    torch.manual_seed(0)
    torch.save(resnet50_2d(out_channels=5, width=4).state_dict(), weights)  # another head: left out
    digest = sha256_file(weights)
    quick = [
        "--folds",
        "0",
        "--epochs",
        "1",
        "--models",
        "resnet50-finetuned",
        "--patch",
        "48",
        "--spacing",
        "3",
        "--width",
        "4",
        "--threads",
        "1",
        "--no-progress",
    ]
    data = out.parent / "dev" / "labels.csv"
    rc = main(
        [
            "train",
            "knee-xray",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "b1"),
            "--weights",
            str(weights),
            "--weights-sha256",
            "0" * 64,
            *quick,
        ]
    )
    assert rc == 1 and not (tmp_path / "b1" / "configs").exists()
    rc = main(
        [
            "train",
            "knee-xray",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "b2"),
            "--weights",
            str(weights),
            "--weights-sha256",
            digest,
            *quick,
        ]
    )
    assert rc == 0
    manifest = verify_bundle(tmp_path / "b2")
    assert manifest.raw["transfer_weights"] == {"file": "site-resnet50.pt", "sha256": digest}
    assert str(tmp_path) not in (tmp_path / "b2" / "configs" / "metadata.json").read_text()


def test_node_reports_the_fused_estimate_with_the_labs_used(
    trained: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """Item 5: with a fusion bundle and the patient's labs in the window the SR names them (with dates) and
    gives the fused class; without labs in the window the image result stands alone and the SR says so."""
    import dataclasses
    from datetime import date

    import pydicom
    from web_testing import make_settings, make_store

    from dicomnode.labs.csv_io import read_lab_csv
    from dicomnode.ml.fusion import FusionConfig, train_fusion, write_fusion_dataset
    from dicomnode.pipeline.knee import patient_labs

    out, _, _ = trained
    data, labs_csv = write_fusion_dataset(tmp_path / "cohort", 80, 5, lab_signal=True)
    train_fusion(FusionConfig(data=data, labs=labs_csv, out=tmp_path / "fusion", folds=0))
    src = write_dx(make_knee(99, density=0.1, spacing_mm=1.6), tmp_path / "in" / "knee.dcm")
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    # the patient's labs, pushed as FHIR Observations to the node's endpoint, found by the job's Patient ID
    from fastapi.testclient import TestClient
    from web_testing import ADMIN_PASSWORD, build_admin_app

    from dicomnode.web.fhir import router

    settings = make_settings(tmp_path / "data")
    store = make_store(settings)
    app = build_admin_app(settings, store)
    app.include_router(router)
    every = read_lab_csv(labs_csv)
    first = every[0].patient_id  # a patient of the cohort with lab values, sampled 12 days before the study
    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": v.loinc}]},
                "subject": {"identifier": {"value": str(ds.PatientID)}},
                "effectiveDateTime": "2025-12-20T09:00:00Z",
                "valueQuantity": {"value": v.value, "unit": v.unit},
            }
        }
        for v in every
        if v.patient_id == first
    ]
    r = TestClient(app).post(
        "/fhir",
        json={"resourceType": "Bundle", "type": "batch", "entry": entries},
        auth=("admin", ADMIN_PASSWORD),
    )
    assert r.status_code == 200, r.text
    labs = patient_labs(store, [src])
    assert len(labs) == 6
    options = AnalysisOptions(knee_bundle=str(out), fusion_bundle=str(tmp_path / "fusion"))
    request = dataclasses.replace(
        _request(src.parent, tmp_path / "o1", str(ds.SeriesInstanceUID)), lab_values=labs
    )
    outcome = analyze_job(request, options)
    assert outcome.status is AnalysisStatus.OK, outcome.reason
    assert outcome.result_json["knee"]["fused_class"] in ("normal", "osteoporosis")
    texts = " ".join(_sr_texts(pydicom.dcmread(outcome.outputs.sr)))
    when = labs[0].effective.isoformat()
    assert "fused with laboratory values" in texts and "25-hydroxyvitamin D" in texts and when in texts
    assert "Osteoporosis class, image and laboratory values fused" in texts
    assert _dciodvfy(outcome.outputs.sr) == []
    # labs far from the study date: declined, the image answers, the SR says why
    old = tuple(dataclasses.replace(v, effective=date(2025, 1, 2)) for v in labs)
    for lab_values, why in ((old, "declined (no Calcium"), ((), "no laboratory values of the patient")):
        request = dataclasses.replace(
            _request(src.parent, tmp_path / f"o{len(lab_values)}", str(ds.SeriesInstanceUID)),
            lab_values=lab_values,
        )
        outcome = analyze_job(request, options)
        assert outcome.status is AnalysisStatus.OK and outcome.result_json["knee"]["fused_class"] is None
        texts = " ".join(_sr_texts(pydicom.dcmread(outcome.outputs.sr)))
        assert why in texts and "image model only" in texts


def test_bad_radiographs_get_clear_reasons(trained: tuple[Path, Path, str], tmp_path: Path) -> None:
    out, _, _ = trained
    case = make_knee(31, spacing_mm=1.6)
    bad = {
        "nospacing": ({"spacing_attribute": "none"}, "no Pixel Spacing or Imager Pixel Spacing"),
        "chest": ({"body_part": "CHEST", "series_description": "CHEST PA"}, "body part CHEST: not a knee"),
        "hand": ({"body_part": "HAND", "series_description": "HAND PA"}, "body part HAND: not a knee"),
    }
    for name, (kw, reason) in bad.items():
        write_dx(case, tmp_path / name / "x.dcm", **kw)  # type: ignore[arg-type]
        outcome = analyze_knee(tmp_path / name, tmp_path / f"out-{name}", bundle_path=str(out))
        assert outcome.status is AnalysisStatus.NOT_QUALIFYING, name
        assert reason in (outcome.reason or "") and "\n" not in (outcome.reason or "")
        assert outcome.outputs.sr is None
    rc = main(
        ["analyze", str(tmp_path / "nospacing"), "--out", str(tmp_path / "cli"), "--knee-bundle", str(out)]
    )
    assert rc == 2
