"""Founding study (a), the CT side in the node (issue 12 items 4 and 5).

A fusion bundle trained by ``train fusion --image-input ct-vbmd --image-results DIR`` on a generated cohort
(CT ``result.json`` files and lab values with signal) is configured as ``analysis.fusion_bundle``. A
phantom CT study whose patient has stored lab values goes through the node's steps (ingest, routing, the
analysis step fetching the labs): its SR gives the fused class and probability beside the vBMD category and
names the lab values with their dates, dciodvfy clean. The same study analysed without lab values keeps
the image result alone and the SR says why. Plumbing on one case; the fused model's accuracy is
``tests/unit/test_fusion_train.py``'s (held-out statistics).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from web_testing import (
    complete_and_route,
    ingest,
    make_runner,
    make_settings,
    make_store,
)

from dicomnode.domain import AnalysisStatus, JobState
from dicomnode.labs.csv_io import read_lab_csv
from dicomnode.ml.fusion import FusionConfig, train_fusion, write_fusion_dataset
from dicomnode.pipeline.analyze import analyze_path
from dicomnode.pipeline.executors import job_function
from dicomnode.pipeline.measure import options_from_settings
from dicomnode.pipeline.rules_in_force import RulesInForce

ACCEPTED_WARNING = "Unrecognized defined term <99DCMNODE> for value 1 of attribute <Coding Scheme Designator>"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _phantom_study(folder: Path) -> list[Path]:
    """A phantom CT study T10-S1 (the sacrum in view: the levels are named without doubt), coarse grid."""
    from dicomnode.imaging.writer import write_study
    from dicomnode.phantom import PhantomSpec, make_phantom

    ph = make_phantom(PhantomSpec(matrix=96, spacing_mm=4.0, thickness_mm=1.5, z_levels=("T10", "S1")))
    series = write_study(
        ph.volume, folder, header={"StudyDescription": "CT ABDOMEN PHANTOM", "BodyPartExamined": "ABDOMEN"}
    )
    return [p for paths in series.values() for p in paths]


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


def test_ct_job_reports_the_fused_class_with_the_labs_used_and_without_labs_says_why(tmp_path: Path) -> None:
    # the bundle: image score = minus the calibrated-ROI L1-L2 vBMD, read from the cohort's result.json
    cohort = tmp_path / "cohort"
    data, labs_csv = write_fusion_dataset(cohort, 80, 5, lab_signal=True, ct_results=True)
    bundle = tmp_path / "fusion"
    report = train_fusion(
        FusionConfig(
            data=data,
            labs=labs_csv,
            out=bundle,
            folds=0,
            image_input="ct-vbmd",
            image_results=cohort / "results",
        )
    )
    assert report["image_input"] == "ct-vbmd" and report["rows_left_out"] == 0

    files = _phantom_study(tmp_path / "in")
    header = pydicom.dcmread(files[-1], stop_before_pixels=True)
    day = date.fromisoformat(f"{header.StudyDate[:4]}-{header.StudyDate[4:6]}-{header.StudyDate[6:]}")
    settings = make_settings(tmp_path / "data", analysis={"fusion_bundle": str(bundle)})
    store = make_store(settings)
    # a cohort patient's six lab values, stored for the phantom's patient, sampled 12 days before the CT
    every = read_lab_csv(labs_csv)
    first = every[0].patient_id
    mine = [
        dataclasses.replace(v, patient_id=str(header.PatientID), effective=day - timedelta(days=12))
        for v in every
        if v.patient_id == first
    ]
    assert store.add_lab_values(mine) == 6

    assert ingest(settings, store, files) == len(files)
    options = options_from_settings(settings)
    runner = make_runner(settings, store, RulesInForce(store, settings).select, job_function(options))
    jobs = complete_and_route(runner)
    assert len(jobs) == 1
    assert runner.run_next_job("test-worker") == jobs[0]
    job = store.get_job(jobs[0])
    assert job.state in (JobState.REPORTED, JobState.DONE, JobState.FAILED), job.message
    result = store.get_result(jobs[0])
    assert result is not None and result.outputs.sr is not None, job.message
    fusion = result.result_json["fusion"]
    assert fusion["fused_class"] in ("normal", "osteoporosis"), fusion["note"]
    assert 0.5 <= fusion["class_probability"] <= 1.0
    assert fusion["image_input"] == "ct-vbmd"
    vbmd = result.result_json["summary"]["vbmd_l1_l2_mg_cm3"]
    assert fusion["image_score"] == pytest.approx(-vbmd)
    assert len(fusion["labs_used"]) == 6
    sr = pydicom.dcmread(result.outputs.sr)
    texts = _sr_texts(sr)
    joined = " ".join(texts)
    assert "Osteoporosis class, image and laboratory values fused" in texts
    assert "Probability of the fused class" in texts
    assert "Bone density category (ACR QCT, vBMD)" in texts  # the image result, beside the fused one
    assert "fused with laboratory values" in joined and "25-hydroxyvitamin D" in joined
    assert (day - timedelta(days=12)).isoformat() in joined
    assert _dciodvfy(str(result.outputs.sr)) == []

    # the same CT without lab values: the image result alone, and the SR says why
    run = analyze_path(tmp_path / "in", tmp_path / "alone", options=options, lab_values=())
    assert run.result.status is AnalysisStatus.OK and run.outputs is not None and run.outputs.sr is not None
    doc = run.result.to_json_dict()
    assert doc["fusion"]["fused_class"] is None and doc["fusion"]["probability_osteoporosis"] is None
    texts = _sr_texts(pydicom.dcmread(run.outputs.sr))
    joined = " ".join(texts)
    assert "image model only: no laboratory values of the patient" in joined
    assert "Osteoporosis class, image and laboratory values fused" not in texts
    assert "Bone density category (ACR QCT, vBMD)" in texts
    assert _dciodvfy(str(run.outputs.sr)) == []
