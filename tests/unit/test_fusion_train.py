"""``dicomnode train fusion`` and ``dicomnode evaluate --fusion`` (issue 12, item 4; founding study a).

Generated cohorts: a latent bone status sets the label, the image score sees it through noise (out-of-fold
AUC about 0.8), the lab values carry it (``lab_signal``) or are drawn independently of it; one patient in
ten has no lab values. Where the labs carry signal the fused model must beat the image model on the same
patients (held-out AUC at least 0.05 higher); where they carry none it must not gain (at most 0.03 higher)
and the lab models must be near chance. Statistics over 120 held-out patients, not single cases.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from dicomnode.cli import main
from dicomnode.errors import BundleError
from dicomnode.labs.values import make_value
from dicomnode.ml.fusion import apply_fusion, load_fusion_bundle, write_fusion_dataset


def _cohort(root: Path, signal: bool) -> tuple[Path, Path, Path]:
    dev, labs = write_fusion_dataset(root / "dev", 120, 1, lab_signal=signal)
    ext, ext_labs = write_fusion_dataset(root / "ext", 60, 2, lab_signal=signal)
    merged = root / "labs.csv"
    merged.write_text(labs.read_text() + "".join(ext_labs.read_text().splitlines(True)[1:]))
    return dev, ext, merged


def _train(root: Path, signal: bool) -> tuple[dict[str, Any], str, Path]:
    import contextlib
    import io

    dev, ext, labs = _cohort(root, signal)
    out = root / "bundle"
    argv = [
        "train",
        "fusion",
        "--data",
        str(dev),
        "--labs",
        str(labs),
        "--external",
        str(ext),
        "--out",
        str(out),
    ]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--folds", "3"]) == 0
    print(buf.getvalue())  # the run log keeps the table
    return json.loads((out / "training" / "report.json").read_text()), buf.getvalue(), out


Trained = tuple[dict[str, Any], str, Path]


@pytest.fixture(scope="module")
def signal(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(tmp_path_factory.mktemp("fusion-signal"), True)


@pytest.fixture(scope="module")
def no_signal(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(tmp_path_factory.mktemp("fusion-none"), False)


def test_labs_with_signal_improve_on_the_image(
    signal: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, printed, out = signal
    root = out.parent
    for label in ("image only", "labs only (SVM)", "labs only (neural network)", "image + labs (fused)"):
        assert label in printed
    for split in ("cross_validation", "external"):
        m = report[split]
        assert m["fused"]["auc"] >= m["image_same"]["auc"] + 0.05, split
        assert (
            m["fused"]["n"] < m["fused_or_image"]["n"] == m["image"]["n"]
        )  # missing labs: declined, counted
        for key in ("accuracy", "recall", "precision", "f1", "auc"):
            assert 0.0 <= m["fused"][key] <= 1.0
    assert report["patients_with_missing_labs"] > 0 and report["missing_policy"] == "decline"

    # evaluate: the same three-way comparison on the external cohort, from the bundle
    ev = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            "--fusion",
            str(out),
            "--reference",
            str(root / "ext" / "cohort.csv"),
            "--labs",
            str(root / "labs.csv"),
            "--out",
            str(ev),
        ]
    )
    assert rc == 0
    shown = capsys.readouterr().out
    assert "image + labs (fused)" in shown and "labs only (SVM)" in shown
    doc = json.loads((ev / "three_way.json").read_text())
    assert doc["metrics"]["fused"]["auc"] == pytest.approx(report["external"]["fused"]["auc"])


def test_labs_without_signal_bring_no_gain(no_signal: Trained) -> None:
    report, _, _ = no_signal
    m = report["cross_validation"]
    assert m["fused"]["auc"] <= m["image_same"]["auc"] + 0.03
    assert m["svm"]["auc"] < 0.65 and m["mlp"]["auc"] < 0.65


def test_fused_answer_names_its_labs_or_declines(signal: Trained, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(signal[2], out)
    bundle = load_fusion_bundle(out)
    day = date(2026, 3, 10)
    labs = [
        make_value("p", code, value, unit, date(2026, 3, 1))
        for code, value, unit in (
            ("17861-6", 8.6, "mg/dL"),
            ("2777-1", 3.5, "mg/dL"),
            ("6768-6", 110, "U/L"),
            ("62292-8", 14, "ng/mL"),
            ("2731-8", 70, "pg/mL"),
            ("2160-0", 0.9, "mg/dL"),
        )
    ]
    p, used, note = apply_fusion(bundle, 1.0, labs, day)
    assert p is not None and p > 0.5  # labs of an osteoporotic pattern and a high image score
    assert len(used) == 6 and "2026-03-01" in note and "25-hydroxyvitamin D" in note
    p, _, note = apply_fusion(bundle, 1.0, labs[:3], day)
    assert p is None and "declined" in note and "image model only" in note
    p, _, note = apply_fusion(bundle, 1.0, labs, date(2026, 9, 1))  # outside the 90-day window
    assert p is None and "within 90 days" in note
    params = out / "models" / "fusion.json"
    params.write_text(params.read_text().replace("0", "1", 1))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_fusion_bundle(out)


def test_bad_inputs_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev, _, labs = _cohort(tmp_path, True)
    assert main(["train", "fusion", "--data", str(dev), "--out", str(tmp_path / "o")]) == 1
    assert "needs --labs" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,date,label,image_score\np1,2026-01-01,maybe,0.3\n")
    assert (
        main(["train", "fusion", "--data", str(bad), "--labs", str(labs), "--out", str(tmp_path / "o")]) == 1
    )
    err = capsys.readouterr().err
    assert "line 2: label 'maybe'" in err and "Traceback" not in err


def test_the_node_feeds_a_bundle_only_the_score_it_was_trained_on(signal: Trained, tmp_path: Path) -> None:
    from dicomnode.pipeline.fusion import fuse, knee_score

    _, _, knee_bundle = signal
    assert load_fusion_bundle(knee_bundle).image_input == "knee-probability"
    dev, _, labs = _cohort(tmp_path, True)
    other = tmp_path / "other"
    argv = ["train", "fusion", "--data", str(dev), "--labs", str(labs), "--out", str(other), "--folds", "0"]
    assert main([*argv, "--image-input", "other"]) == 0
    values = [make_value("p", "17861-6", 9.0, "mg/dL", date(2026, 3, 1))]
    found = fuse(str(other), knee_score(0.9), values, date(2026, 3, 2))
    assert found.probability is None and "takes other scores" in found.note
    assert "image model only" in found.note
