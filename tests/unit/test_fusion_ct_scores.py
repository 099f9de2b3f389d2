"""``train fusion`` with the image score of study a's CT model read from the analyses' ``result.json``
(``--image-input ct-vbmd`` / ``ct-model-vbmd``, ``--image-results DIR``; issue 12 item 4).

The score is read by the one function the node uses on its own result (``ml.fusion.ct_image_score``), so
a bundle is trained on the number it is applied to. Training from the results gives exactly what training
from a CSV column holding the same scores gives (same patient folds), and bad input gets one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from dicomnode.cli import main
from dicomnode.ml.fusion import ct_image_score, write_fusion_dataset

ROI = "vBMD: calibrated trabecular ROI (internal calibration), erosion 4 mm"
MODEL = "vBMD: model bundle densenet 1.0 (sha256:0123456789ab)"


def _doc(value: float | None, *components: str, status: str = "ok") -> dict[str, Any]:
    summary = {"vbmd_l1_l2_mg_cm3": value}
    return {"status": status, "summary": summary, "algorithm_components": list(components)}


def test_each_estimator_gives_the_score_it_states() -> None:
    # calibrated ROI alone: ct-vbmd is minus its L1-L2 vBMD; no model score
    assert ct_image_score(_doc(95.0, ROI), "ct-vbmd") == (-95.0, "")
    score, why = ct_image_score(_doc(95.0, ROI), "ct-model-vbmd")
    assert score is None and "no CT bmd bundle configured" in why
    # bundle:PATH: the summary is the model's, so it is no ROI score
    assert ct_image_score(_doc(88.0, MODEL), "ct-model-vbmd") == (-88.0, "")
    score, why = ct_image_score(_doc(88.0, MODEL), "ct-vbmd")
    assert score is None and "not the calibrated ROI's" in why
    # both:PATH: the ROI in the summary, the model's value in its algorithm line
    both = f"{MODEL}, beside the ROI: densenet 1.0: L1-L2 vBMD 101.5 mg/cm3; model - ROI = +6.5 mg/cm3"
    assert ct_image_score(_doc(95.0, ROI, both), "ct-vbmd") == (-95.0, "")
    assert ct_image_score(_doc(95.0, ROI, both), "ct-model-vbmd") == (-101.5, "")
    # no value, a failed analysis, a bundle of another input: None and why
    assert ct_image_score(_doc(None, ROI), "ct-vbmd")[1] == "no L1-L2 vBMD in the CT analysis"
    assert "did not succeed" in ct_image_score(_doc(95.0, ROI, status="failed"), "ct-vbmd")[1]
    assert "knee-probability" in ct_image_score(_doc(95.0, ROI), "knee-probability")[1]


def _train(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["train", "fusion", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_fusion_reads_the_ct_results_with_the_same_folds_as_a_score_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, labs = write_fusion_dataset(tmp_path / "c", 90, 3, lab_signal=True, ct_results=True)
    results = tmp_path / "c" / "results"
    gone = sorted(results.iterdir())[0]
    (gone / "result.json").unlink()  # a study whose analysis wrote nothing: left out and counted
    common = ["--labs", str(labs), "--folds", "3", "--image-input", "ct-vbmd"]
    rc, out, err = _train(
        ["--data", str(data), "--out", str(tmp_path / "b1"), "--image-results", str(results), *common], capsys
    )
    assert rc == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["rows_left_out"] == 1 and printed["image_input"] == "ct-vbmd"
    assert printed["rows_left_out_first"] == ["line 2: no result.json for its study"]
    report = json.loads((tmp_path / "b1" / "training" / "report.json").read_text())
    assert report["n"] == 89
    assert report["cross_validation"]["image"]["auc"] > 0.7  # the generated image sees the status
    meta = json.loads((tmp_path / "b1" / "configs" / "metadata.json").read_text())
    assert meta["input"]["image_input"] == "ct-vbmd" and meta["input"]["image_scores_from"] == "results"

    # the same scores as a CSV column (minus the vBMD of each result.json): the very same comparison
    column = tmp_path / "column.csv"
    with data.open(newline="") as src, column.open("w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["patient_id", "date", "label", "image_score"])
        for r in csv.DictReader(src):
            path = results / r["patient_id"] / "result.json"
            if path.is_file():
                vbmd = json.loads(path.read_text())["summary"]["vbmd_l1_l2_mg_cm3"]
                w.writerow([r["patient_id"], r["date"], r["label"], -vbmd])
    rc, _, err = _train(["--data", str(column), "--out", str(tmp_path / "b2"), *common], capsys)
    assert rc == 0, err
    again = json.loads((tmp_path / "b2" / "training" / "report.json").read_text())
    assert again["cross_validation"] == report["cross_validation"]

    # evaluate --fusion reads the results the same way
    rc = main(
        [
            "evaluate",
            "--fusion",
            str(tmp_path / "b1"),
            "--reference",
            str(data),
            "--labs",
            str(labs),
            "--image-results",
            str(results),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "ev" / "three_way.json").read_text())["n"] == 89


def test_bad_ct_results_input_gets_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, labs = write_fusion_dataset(tmp_path / "c", 20, 4, lab_signal=True, ct_results=True)
    results = tmp_path / "c" / "results"
    base = ["--data", str(data), "--labs", str(labs), "--out", str(tmp_path / "o"), "--folds", "0"]
    cases = [
        (["--image-results", str(results)], "--image-results needs --image-input ct-vbmd or ct-model-vbmd"),
        (["--image-input", "ct-vbmd", "--image-results", str(tmp_path / "nope")], "no such folder"),
        (["--image-input", "ct-vbmd", "--image-results", str(tmp_path)], "study_instance_uid or accession"),
    ]
    (tmp_path / "result.json").write_text(json.dumps(_doc(90.0, ROI)))  # a folder whose CSV has no key
    keyless = tmp_path / "keyless.csv"
    keyless.write_text("patient_id,date,label\np1,2026-01-01,normal\n")
    for extra, message in cases:
        argv = base if "study_instance_uid" not in message else [*base[:1], str(keyless), *base[2:]]
        rc, _, err = _train([*argv, *extra], capsys)
        assert rc == 1 and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
