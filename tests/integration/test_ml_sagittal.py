"""``dicomnode train sagittal-bmd``: a 2D ResNet-50 on mid-sagittal reformats learns the L1-L2 vBMD of
phantoms, writes a checksummed bundle whose inference reproduces the held-out predictions, and serves the
node as a vBMD estimator beside the calibrated ROI.

Sized for a shared 2-core machine (coarse 3 mm phantoms, 128 x 64 reformats of 2 mm, first-stage width 8,
one thread, about two and a half minutes). The figures are printed so the run log keeps them.

Why the accuracy bound: the development phantoms draw their patient-level vBMD uniformly from 40-200
mg/cm3, so always answering the development mean scores an MAE of about 40-60 mg/cm3 on held-out phantoms
(the report gives it as ``mae_training_mean``). One sample per series (not one per vertebra as for the 3D
``bmd`` task) and a few dozen series make a 2D network noisier than the 3D one, so the bound is not the
``bmd`` task's 10 mg/cm3 but: at most 15 mg/cm3 (about the external MAE of founding study (b), 13.9, and
well inside the 40 mg/cm3 wide osteopenia band) and at most a third of the training-mean baseline, which
only a network that learned the density, not the population mean, can reach.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicomnode.cli import main
from dicomnode.errors import BundleError
from dicomnode.ml import datasets as ds
from dicomnode.ml.bundle import load_bundle, sha256_file, verify_bundle
from dicomnode.ml.train import TrainConfig, train

pytestmark = pytest.mark.slow

SOURCE = "phantom" if ds.phantom_available() else "synthetic"


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread avoids OpenMP spinning against others


@pytest.fixture(scope="module")
def sagittal_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sagittal")
    kw = {"z_levels": ("T10", "L5")} if SOURCE == "phantom" else {}  # no pelvis: half the voxels
    dev = ds.export_bmd(ds.make_cases(range(200, 232), SOURCE, **kw), root / "dev")
    ext = ds.export_bmd(ds.make_cases(range(600, 608), SOURCE, **kw), root / "external", with_masks=False)
    cfg = TrainConfig(
        task="sagittal-bmd", data=dev, out=root / "bundle", external=ext, folds=0, epochs=24, batch_size=16,
        lr=3e-3, width=8, patch=(128, 64), spacing_mm=2.0, samples_per_case=4, seed=0, progress=False,
        threads=1,
    )  # fmt: skip
    summary = train(cfg)
    return root / "bundle", ext, summary


def _external_rows(csv_path: Path) -> dict[str, tuple[Path, dict[str, tuple[float, float, float]]]]:
    """Image and per-level centroids of each external series, as the CSV gives them."""
    out: dict[str, tuple[Path, dict[str, tuple[float, float, float]]]] = {}
    with csv_path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            image = csv_path.parent / r["image"]
            sid = image.name.removesuffix(".nii.gz")
            out.setdefault(sid, (image, {}))[1][r["level"]] = (float(r["cx"]), float(r["cy"]), float(r["cz"]))
    return out


def test_sagittal_regression_beats_the_mean_on_held_out(
    sagittal_bundle: tuple[Path, Path, dict[str, Any]],
) -> None:
    path, _, summary = sagittal_bundle
    ext = summary["performance"]["external"]
    mae, baseline = ext["mae"], ext["mae_training_mean"]
    print(
        f"sagittal-bmd: held-out MAE {mae:.2f} mg/cm3 (n={ext['n']}), RMSE {ext['rmse']:.2f}, "
        f"r2 {ext['r2']:.3f}; predicting the training mean: MAE {baseline:.2f}"
    )
    assert ext["n"] == 8
    assert baseline > 25.0  # the held-out phantoms really spread over the range
    assert mae <= 15.0 and mae <= baseline / 3.0
    doc = json.loads((path / "training/evaluation/external/metrics.json").read_text())
    assert doc["mae"] == pytest.approx(mae) and doc["missing_predictions"] == []
    assert (path / "training/evaluation/external/report.html").is_file()


def test_sagittal_bundle_manifest_and_checksum(
    sagittal_bundle: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _, summary = sagittal_bundle
    manifest = verify_bundle(path)
    assert manifest.sha256 == sha256_file(path / "models/model.pt") == summary["bundle"]["sha256"]
    assert manifest.task == "sagittal_bmd_tbs" and manifest.factory == "resnet50_2d"
    assert manifest.network_kwargs["out_channels"] == 1 and manifest.network_kwargs["width"] == 8
    assert tuple(manifest.input_spec.patch_size) == (128, 64)
    assert manifest.input_spec.spacing_mm == (5.0, 2.0, 2.0)
    out = manifest.output
    assert out["units"] == "mg/cm3" and out["outputs"] == ["vbmd_mg_cm3"]
    assert out["reference_levels"] == ["L1", "L2"]
    assert out["tbs"].startswith("not provided")  # phantoms have no TBS truth: none is invented
    assert "no TBS reference" in manifest.training_data and "Not a medical device" in manifest.intended_use
    raw = json.loads((path / "configs/metadata.json").read_text())
    assert raw["performance"]["external"]["mae"] == pytest.approx(summary["performance"]["external"]["mae"])
    bad = tmp_path / "tampered"
    shutil.copytree(path, bad, ignore=shutil.ignore_patterns("training"))
    w = bad / "models/model.pt"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bad)


def test_sagittal_inference_reproduces_held_out_predictions(
    sagittal_bundle: tuple[Path, Path, dict[str, Any]],
) -> None:
    from dicomnode.ml.inference import predict_sagittal

    path, ext_csv, _ = sagittal_bundle
    report = json.loads((path / "training/report.json").read_text())
    expected = report["external_predictions"]
    bundle = load_bundle(path)
    rows = _external_rows(ext_csv)
    assert set(rows) == set(expected)
    for sid, (image, centroids) in rows.items():
        pred = predict_sagittal(bundle, ds.load_image(image), centroids)
        assert pred is not None and pred.levels == ("L1", "L2") and pred.tbs is None
        assert pred.vbmd_mg_cm3 == pytest.approx(expected[sid][0], abs=0.05), sid
    volume = ds.load_image(image)
    full = predict_sagittal(bundle, volume, centroids)
    gap = predict_sagittal(bundle, volume, {lvl: centroids[lvl] for lvl in ("L1", "L3")})
    assert full is not None and gap is not None and "L2 placed from L1 and L3" in " ".join(gap.notes)
    # an excluded L2 still centres the reformat: L2 placed half-way between L1 and L3 moves the centre by a
    # few mm at most. (The value the small test network gives for that shifted reformat is not asserted: a
    # 24-epoch network's response to a shift of a few mm is no property of the code, and it differed by
    # 17 mg/cm3 on one CPU and by less than 10 on another.)
    shift = float(np.linalg.norm(np.subtract(gap.centre_lps, full.centre_lps)))
    assert shift <= 5.0, f"reformat centre moved {shift:.1f} mm"
    assert np.isfinite(gap.vbmd_mg_cm3)
    assert predict_sagittal(bundle, volume, {"L4": centroids["L4"]}) is None


def test_sagittal_bundle_serves_the_node(sagittal_bundle: tuple[Path, Path, dict[str, Any]]) -> None:
    """As the node's vBMD estimator: accepted at start-up, 'both' reports beside the ROI, 'bundle' replaces
    the L1-L2 vBMD (the reformat centred on the engine's own L1 and L2 ROI centroids)."""
    pytest.importorskip("dicomnode.bmd")
    from dicomnode.bmd import analyze_volume
    from dicomnode.ml.inference import apply_bmd_bundle
    from dicomnode.pipeline.measure import check_options, resolve_options

    path, _, _ = sagittal_bundle
    options = resolve_options(backend=f"both:{path}")
    assert options.bmd_estimator == f"both:{path}"
    assert any("sha256" in line for line in check_options(options))
    bundle = load_bundle(path)
    case = ds.make_cases([902], SOURCE)[0]
    classical = analyze_volume(case.volume).result
    assert classical.summary is not None and classical.summary.vbmd_l1_l2_mg_cm3 is not None
    both = apply_bmd_bundle(classical, case.volume, bundle, "both")
    assert both.summary is not None
    assert both.summary.vbmd_l1_l2_mg_cm3 == classical.summary.vbmd_l1_l2_mg_cm3
    assert any(n.startswith(bundle.name) and "model - ROI" in n for n in both.summary.notes)
    assert both.algorithm_name.endswith(f"+{bundle.name}")
    assert any(bundle.manifest.sha256[:12] in w for w in both.warnings)
    only = apply_bmd_bundle(classical, case.volume, bundle, "bundle")
    assert only.summary is not None and only.summary.vbmd_l1_l2_mg_cm3 is not None
    assert only.summary.levels_used == ("L1", "L2")
    truth = (case.vbmd["L1"] + case.vbmd["L2"]) / 2.0
    roi, model = classical.summary.vbmd_l1_l2_mg_cm3, only.summary.vbmd_l1_l2_mg_cm3
    print(f"node + sagittal bundle: L1-L2 truth {truth:.1f}, ROI {roi:.1f}, model {model:.1f} mg/cm3")
    # plumbing, not luck: the node serves exactly the bundle's own inference of this case, centred on the
    # engine's ROI centroids, and its category follows that value. How accurate the network is, is a
    # held-out statistic (test_sagittal_regression_beats_the_mean_on_held_out), never one case's error: a
    # network trained on the CPU rounds differently on another CPU, and one case may land anywhere inside
    # the held-out error distribution.
    from dicomnode.ml.inference import predict_sagittal
    from dicomnode.vocab import acr_category

    centroids = {v.level: v.roi_centroid_lps_mm for v in classical.vertebrae}
    direct = predict_sagittal(bundle, case.volume, centroids)
    assert direct is not None and direct.levels == ("L1", "L2")
    assert model == pytest.approx(direct.vbmd_mg_cm3, abs=1e-9)
    assert only.summary.category == acr_category(model)
    assert only.vertebra("L1") == classical.vertebra("L1")  # per-level values stay the calibrated ROI's


def test_cli_sagittal_folds_and_tbs_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI with 2-fold CV by patient; a ``tbs`` column adds a second output with its own metrics.

    The TBS values here exercise the plumbing only (no accuracy is asserted: there is no TBS truth in a
    phantom); they are a fixed function of the case, not a claim about bone.
    """
    cases = [ds.synthetic_case(s, patient_id=f"PT{s // 2}") for s in range(8)]  # two scans per patient
    csv_path = ds.export_bmd(cases, tmp_path / "data", with_masks=False)
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0].keys(), "tbs"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "tbs": f"{1.0 + float(r['bmd_mg_cm3']) / 500.0:.3f}"})
    args = ["train", "sagittal-bmd", "--data", str(csv_path), "--out", str(tmp_path / "b"), "--epochs", "1"]
    args += ["--folds", "2", "--width", "4", "--patch", "64x32", "--spacing", "4", "--batch-size", "8"]
    args += ["--samples-per-case", "1", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    report = json.loads((tmp_path / "b/training/report.json").read_text())
    assert report["tbs"] is True and len(report["folds"]) == 2
    seen: dict[str, str] = {}
    for fold, res in report["folds"].items():
        for sid, pred in res["predictions"].items():
            assert len(pred) == 2 and np.isfinite(pred).all()
            assert seen.setdefault(f"PT{int(sid[5:9]) // 2}", fold) == fold  # a patient sits in one fold
    tbs = report["performance"]["cv"]["tbs"]
    assert tbs["n"] == 8 and tbs["mae"] >= 0.0
    manifest = verify_bundle(tmp_path / "b")
    assert (
        manifest.output["outputs"] == ["vbmd_mg_cm3", "tbs"] and manifest.network_kwargs["out_channels"] == 2
    )
    bad = [a.replace("64x32", "4x4x4").replace(str(tmp_path / "b"), str(tmp_path / "c")) for a in args]
    assert main(bad) == 1  # a 3D patch for a 2D task: one line, nothing trained
    assert "--patch" in capsys.readouterr().err and not (tmp_path / "c").exists()
