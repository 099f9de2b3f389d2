"""``train knee-xray`` input and figures without training (issue 12, item 2): the CSV (2 or 3 classes, bad
rows named by line), the metrics of 2 and 3 classes, the comparison table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.cli import main
from dicomnode.errors import InputError
from dicomnode.ml.knee_synthetic import make_knee, write_dataset, write_dx
from dicomnode.ml.knee_train import classification_metrics, format_table, read_knee_csv


def test_three_classes_in_clinical_order(tmp_path: Path) -> None:
    csv_path = write_dataset(tmp_path, range(9), n_classes=3, spacing_mm=3.2)
    items, classes = read_knee_csv(csv_path)
    assert classes == ("normal", "osteopenia", "osteoporosis")
    assert sorted({it.label for it in items}) == [0, 1, 2]


def test_bad_csv_rows_are_named(tmp_path: Path) -> None:
    write_dx(make_knee(1, spacing_mm=3.2), tmp_path / "a.dcm")
    cases = {
        "path,label\na.dcm,normal\na.dcm,a\na.dcm,b\na.dcm,c\n": "4 classes",
        "path,label\nmissing.dcm,normal\na.dcm,osteoporosis\n": "line 2: image missing.dcm not found",
        "file,label\na.dcm,normal\n": "missing column\\(s\\) path",
    }
    for n, (text, message) in enumerate(cases.items()):
        p = tmp_path / f"c{n}.csv"
        p.write_text(text)
        with pytest.raises(InputError, match=message):
            read_knee_csv(p)


def test_metrics_for_two_and_three_classes() -> None:
    y2 = np.array([0, 0, 1, 1])
    p2 = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]], np.float32)
    m = classification_metrics(y2, p2, 2)
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0 and m["n"] == 4
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]], np.float32)
    m3 = classification_metrics(y3, p3, 3)
    assert m3["accuracy"] == 0.75 and 0.5 < m3["auc"] <= 1.0
    table = format_table(
        [{"model": "cnn3", "start": "random weights", "cv_accuracy": 0.5, "study_accuracy": 0.66}]
    )
    assert "cnn3" in table and "quoted, not ours" in table


def test_cli_refuses_a_folder_for_knee_xray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "knee-xray", "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    assert rc == 1 and "must be a CSV" in capsys.readouterr().err
