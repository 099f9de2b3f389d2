"""``dicomnode evaluate``: metrics against scikit-learn, unmatched ids listed, plots and report written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from dicomnode.cli import main
from dicomnode.errors import InputError
from dicomnode.ml import agreement as m
from dicomnode.ml.evaluate import evaluate


def _pair(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.uniform(30.0, 200.0, n)
    pred = ref + rng.normal(3.0, 12.0, n)
    # the reference class comes from a reference threshold, with a few discordant cases (as a T-score would)
    truth = (ref < 80.0).astype(int)
    flip = rng.choice(n, size=max(1, n // 15), replace=False)
    truth[flip] = 1 - truth[flip]
    pred[:3] = pred[3]  # ties in the scores
    return ref, pred, truth


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_point_metrics_match_sklearn(seed: int) -> None:
    ref, pred, truth = _pair(120, seed)
    got = m.point_metrics(ref, pred, truth, threshold=80.0)
    called = (pred < 80.0).astype(int)
    tn, fp, _fn, _tp = skm.confusion_matrix(truth, called, labels=[0, 1]).ravel()
    expected = {
        "mae": skm.mean_absolute_error(ref, pred),
        "rmse": float(np.sqrt(skm.mean_squared_error(ref, pred))),
        "r2": skm.r2_score(ref, pred),
        "pearson_r": float(np.corrcoef(ref, pred)[0, 1]),
        "auc": skm.roc_auc_score(truth, -pred),
        "sensitivity": skm.recall_score(truth, called),
        "specificity": tn / (tn + fp),
        "precision": skm.precision_score(truth, called),
        "f1": skm.f1_score(truth, called),
        "accuracy": skm.accuracy_score(truth, called),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    diff = pred - ref
    sd = np.std(diff, ddof=1)
    assert got["bland_altman_bias"] == pytest.approx(diff.mean(), abs=1e-9)
    assert got["bland_altman_loa_low"] == pytest.approx(diff.mean() - 1.96 * sd, abs=1e-9)
    assert got["bland_altman_loa_high"] == pytest.approx(diff.mean() + 1.96 * sd, abs=1e-9)
    # r2 is the coefficient of determination, not r squared
    assert got["r2"] != pytest.approx(got["pearson_r"] ** 2, abs=1e-6)


def test_roc_curve_area_equals_auc() -> None:
    _ref, pred, truth = _pair(80, 7)
    fpr, tpr, _ = m.roc_curve(truth, -pred)
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, -pred, drop_intermediate=False)
    assert np.trapezoid(tpr, fpr) == pytest.approx(skm.auc(sk_fpr, sk_tpr), abs=1e-9)
    assert np.trapezoid(tpr, fpr) == pytest.approx(m.roc_auc(truth, -pred), abs=1e-9)


def test_undefined_metrics_are_nan_not_errors() -> None:
    got = m.point_metrics([100.0, 150.0], [110.0, 140.0], [0, 0])
    assert np.isnan(got["auc"]) and np.isnan(got["sensitivity"])
    assert got["specificity"] == 1.0


def test_category_confusion() -> None:
    mat = m.category_confusion([150, 100, 50, 50], [130, 70, 60, 125])
    assert mat == [[1, 0, 0], [0, 0, 1], [1, 0, 1]]


def test_bootstrap_is_seeded_and_brackets_point() -> None:
    ref, pred, truth = _pair(60, 4)
    a = m.bootstrap_ci(ref, pred, truth, n_boot=200, seed=5)
    b = m.bootstrap_ci(ref, pred, truth, n_boot=200, seed=5)
    assert a == b
    point = m.point_metrics(ref, pred, truth)
    assert a["mae"].low <= point["mae"] <= a["mae"].high
    assert a["mae"].low < a["mae"].high


def test_evaluate_csv_end_to_end(tmp_path: Path) -> None:
    ref, pred, truth = _pair(100, 11)
    ids = [f"ACC{i:04d}" for i in range(100)]
    _write_csv(
        tmp_path / "ref.csv",
        ["id", "bmd_mg_cm3", "osteoporosis"],
        [[i, r, t] for i, r, t in zip(ids, ref, truth, strict=True)] + [["ONLYREF", 90.0, 0]],
    )
    # one reference id without prediction, one prediction without reference, one without value
    _write_csv(
        tmp_path / "pred.csv",
        ["id", "bmd_mg_cm3"],
        [[i, p] for i, p in zip(ids, pred, strict=True)] + [["ONLYPRED", 70.0], ["NOVALUE", ""]],
    )
    out = tmp_path / "out"
    rc = main(
        ["evaluate", "--reference", str(tmp_path / "ref.csv"), "--predictions", str(tmp_path / "pred.csv"),
         "--out", str(out), "--bootstrap", "100"]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n"] == 100
    assert doc["mae"] == pytest.approx(skm.mean_absolute_error(ref, pred), abs=1e-6)
    assert doc["auc"] == pytest.approx(skm.roc_auc_score(truth, -pred), abs=1e-6)
    assert doc["r2"] == pytest.approx(skm.r2_score(ref, pred), abs=1e-6)
    assert doc["missing_predictions"] == ["ONLYREF"]
    assert doc["unmatched_predictions"] == ["ONLYPRED"]
    assert doc["predictions_without_value"] == ["NOVALUE"]
    for name in m.METRIC_NAMES[1:]:
        lo, hi = doc[f"{name}_ci95"]
        assert lo is not None and hi is not None and lo <= hi, name
    assert sum(map(sum, doc["confusion_matrix_acr"]["matrix"])) == 100
    for png in ("roc.png", "scatter.png", "bland_altman.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    report = (out / "report.html").read_text()
    assert "ONLYREF" in report and "ONLYPRED" in report and report.count("data:image/png;base64") == 3


def test_evaluate_result_json_folder(tmp_path: Path) -> None:
    ref_rows = [["1.2.3.1", 70.0, 1], ["ACC2", 130.0, 0], ["1.2.3.3", 100.0, 0], ["1.2.3.9", 60.0, 1]]
    _write_csv(tmp_path / "ref.csv", ["id", "bmd_mg_cm3", "osteoporosis"], ref_rows)
    folder = tmp_path / "results"
    docs = [
        {"study_instance_uid": "1.2.3.1", "summary": {"vbmd_l1_l2_mg_cm3": 75.0}},
        {
            "study_instance_uid": "1.2.3.2",
            "accession_number": "ACC2",
            "summary": {"vbmd_l1_l2_mg_cm3": 120.0},
        },
        {"study_instance_uid": "1.2.3.3", "summary": {"vbmd_l1_l2_mg_cm3": 95.0}},
        {"study_instance_uid": "1.2.3.4", "summary": {"vbmd_l1_l2_mg_cm3": 50.0}},
        {"study_instance_uid": "1.2.3.9", "status": "failed", "summary": None},
    ]
    for i, d in enumerate(docs):
        (folder / f"job{i}").mkdir(parents=True)
        (folder / f"job{i}" / "result.json").write_text(json.dumps(d))
    doc = evaluate(tmp_path / "ref.csv", folder, tmp_path / "out", n_boot=50)
    assert doc["n"] == 3
    assert doc["mae"] == pytest.approx((5 + 10 + 5) / 3)
    assert doc["missing_predictions"] == ["1.2.3.9"]
    assert doc["unmatched_predictions"] == ["1.2.3.4"]
    assert doc["predictions_without_value"] == ["1.2.3.9"]


def test_bad_reference_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_csv(tmp_path / "ref.csv", ["id", "bmd"], [["a", 1]])
    _write_csv(tmp_path / "pred.csv", ["id", "bmd_mg_cm3"], [["a", 1]])
    with pytest.raises(InputError, match="missing column"):
        evaluate(tmp_path / "ref.csv", tmp_path / "pred.csv", tmp_path / "o")
    rc = main(["evaluate", "--reference", str(tmp_path / "ref.csv"), "--predictions",
               str(tmp_path / "pred.csv"), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bmd_mg_cm3" in err
