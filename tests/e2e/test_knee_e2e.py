"""Acceptance (issue 12): a DX knee study sent to the local stack comes back with the SR and SC in the same
study, dciodvfy clean.

The reference PACS's auto-routing sends CT image series only (``orthanc-config/autoroute.lua``), so the
modality sends the knee radiograph both to Orthanc (the archive) and to the node (as a modality configured
with two destinations would); the node's shipped rules route it to the knee-xray pipeline, the knee bundle
classifies it, and the SR and SC go back to Orthanc over C-STORE into the radiograph's study.

The bundle is trained in the test on a few generated radiographs (two epochs): this checks the plumbing,
not the accuracy (``tests/integration/test_knee_train.py`` does that).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
import torch
from e2e_support import (
    DCMTK_STORESCU,
    Stack,
    node_outputs,
    require_tools,
    retrieve,
    storescu_into_orthanc,
    wait_for,
)

from dicomnode.ml.knee_synthetic import make_knee, write_dataset, write_dx
from dicomnode.ml.knee_train import KneeTrainConfig, train_knee

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ACCEPTED_WARNING = "Unrecognized defined term <99DCMNODE> for value 1 of attribute <Coding Scheme Designator>"


def test_dx_knee_study_comes_back_with_sr_and_sc(tmp_path: Path, stack: Stack) -> None:
    require_tools("Orthanc", DCMTK_STORESCU, "dciodvfy")
    torch.set_num_threads(1)
    data = write_dataset(tmp_path / "train", range(10, 22), spacing_mm=1.6)
    bundle = tmp_path / "knee-bundle"
    train_knee(
        KneeTrainConfig(
            data=data,
            out=bundle,
            folds=0,
            epochs=2,
            batch_size=4,
            width=4,
            size=(48, 48),
            spacing_mm=3.0,
            models=("resnet50-finetuned",),
            threads=1,
            progress=False,
        )
    )
    study = tmp_path / "study"
    # uncompressed: storescu proposes the file's syntax only (decoding RLE / JPEG 2000 is a unit test)
    src = write_dx(make_knee(777, spacing_mm=1.6), study / "knee.dcm", photometric="MONOCHROME1")
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    study_uid = str(ds.StudyInstanceUID)

    stack.up(NODE_DESTINATION="dimse", NODE_EXTRA_CONFIG=f'analysis:\n  knee_bundle: "{bundle}"')
    storescu_into_orthanc(stack, study, study_uid, 1)
    sent = subprocess.run(
        [
            DCMTK_STORESCU,
            "-aet",
            "STORESCU",
            "-aec",
            "DICOMNODE",
            "+sd",
            "+r",
            "127.0.0.1",
            str(stack.node_dicom),
            str(study),
        ],
        env=stack.env(TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def outputs() -> dict[str, list[str]] | None:
        out = node_outputs(stack, study_uid)
        return out if out["SR"] and out["OT"] else None

    out = wait_for("the node's knee SR and SC in Orthanc", outputs, timeout=180, interval=1.0)
    assert len(out["SR"]) == 1 and len(out["OT"]) == 1
    for uid, name in ((out["SR"][0], "sr.dcm"), (out["OT"][0], "sc.dcm")):
        path = retrieve(stack, study_uid, uid, tmp_path / name)
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == study_uid and back.PatientID == ds.PatientID
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (check.stdout + check.stderr).splitlines()
        problems = [ln for ln in lines if ln.startswith(("Error", "Warning")) and ACCEPTED_WARNING not in ln]
        assert problems == [], "\n".join(problems)
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    evidence = {
        s.SeriesInstanceUID
        for e in sr.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
    }
    assert evidence == {str(ds.SeriesInstanceUID)}
