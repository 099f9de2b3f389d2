"""Founding study (a): an image model's output fused with laboratory values (late fusion), two classes.

Inputs of ``dicomnode train fusion``:

* a CSV ``patient_id,date,label,image_score``: one row per patient and study; ``label`` the reference class
  (``normal``/``osteoporosis``, or 0/1 with 1 = osteoporosis); ``image_score`` the image model's output for
  that study, larger meaning more likely osteoporosis (the probability of a ``radiograph`` bundle, or the
  class probability of the DenseNet-121 vBMD model; a vBMD in mg/cm3 works when given negated);
* or, for a CT image model (``--image-results DIR``, study a's CT side), a CSV
  ``patient_id,date,label`` with ``study_instance_uid`` or ``accession_number``, and a folder of the
  ``result.json`` files the CT analysis wrote for those studies (``dicomnode analyze``, or the node's
  results): the image score is read from them as the node reads it from its own analysis
  (:func:`ct_image_score`; ``--image-input ct-vbmd`` or ``ct-model-vbmd``), so a bundle is trained on
  exactly the number it is applied to;
* a lab CSV (:func:`dicomnode.labs.csv_io.read_lab_csv`).

Lab features: per analyte the value nearest to the study date within ``window_days`` (before or after).
Missing values are handled explicitly (``missing``): ``decline`` (default) - a patient without every
analyte in the window gets no lab or fused answer, the image model answers for the fused column, and the
counts are reported; ``impute`` - the training folds' median is used and the count of imputed values kept.

Models, all fitted on the same patient folds: **image only** (logistic regression on the image score),
**labs only**: an RBF support-vector machine (decision value calibrated to a probability by logistic
regression) and a small neural network (one hidden layer of 8 ReLU units; the study's "fuzzy neural
network" is not reproduced as such), and **fused**: logistic regression stacking the image score and both
lab models' outputs, fitted on inner out-of-fold predictions so the stacker never sees a base model's
in-sample fit.

The bundle stores every parameter as JSON (``models/fusion.json``, SHA-256 in the manifest) and is applied
with numpy: no pickle, so a bundle stays data, never code.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.errors import BundleError, InputError
from dicomnode.labs.csv_io import read_lab_csv
from dicomnode.labs.values import ANALYTES, LabValue

FloatArray = npt.NDArray[np.float64]
SCHEMA = "dicomnode-fusion-bundle/1"
METADATA = Path("configs/metadata.json")
PARAMS = Path("models/fusion.json")
#: What a fusion bundle's image score can be; the node feeds a bundle only the score it was trained on.
IMAGE_INPUTS: dict[str, str] = {
    "knee-probability": "probability of osteoporosis from a knee-radiograph bundle (the knee-xray pipeline)",
    "ct-vbmd": "minus the L1-L2 mean vBMD (mg/cm3) of the calibrated trabecular ROI the CT analysis measures "
    "(bmd_estimator roi or both:PATH)",
    "ct-model-vbmd": "minus the L1-L2 mean vBMD (mg/cm3) of the configured CT bmd bundle (the DenseNet-121 "
    "per-vertebra model, or the sagittal one; bmd_estimator bundle:PATH or both:PATH)",
    "other": "another image model's output (used by train/evaluate only, never applied by the node)",
}
#: The image inputs a CT analysis provides (read from its ``result.json``: :func:`ct_image_score`).
CT_IMAGE_INPUTS = ("ct-vbmd", "ct-model-vbmd")
POSITIVE = ("osteoporosis", "1", "yes", "true", "positive")
NEGATIVE = ("normal", "0", "no", "false", "negative", "osteopenia", "bone loss")


@dataclass(frozen=True)
class FusionRow:
    patient_id: str
    day: date
    label: int
    image_score: float


@dataclass
class FusionConfig:
    data: Path
    labs: Path
    out: Path
    external: Path | None = None
    folds: int = 5
    seed: int = 0
    window_days: int = 90
    missing: str = "decline"
    analytes: tuple[str, ...] = tuple(ANALYTES)
    name: str = "dicomnode-fusion"
    version: str = "0.1.0"
    #: What ``image_score`` is (one of :data:`IMAGE_INPUTS`); the node applies the bundle only to that.
    image_input: str = "knee-probability"
    #: A folder of CT ``result.json`` files the image scores are read from (``--image-results``).
    image_results: Path | None = None
    notes: list[str] = field(default_factory=list)


def read_fusion_csv(path: Path) -> list[FusionRow]:
    """Rows ``patient_id,date,label,image_score`` (checked; one line per problem).

    Raises
    ------
    InputError
        Missing file or column, a bad date, label or score (line number).
    """
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = ("patient_id", "date", "label", "image_score")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (need {','.join(need)})")
        rows: list[FusionRow] = []
        for n, r in enumerate(reader, start=2):
            rows.extend(_checked_row(path, n, r))
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def ct_image_score(doc: Mapping[str, Any], image_input: str) -> tuple[float | None, str]:
    """The image score of a CT analysis (a ``result.json`` document) for a bundle of ``image_input``.

    ``ct-vbmd``: minus the calibrated-ROI L1-L2 vBMD (the summary's, when the ROI estimated it);
    ``ct-model-vbmd``: minus the bmd bundle's L1-L2 vBMD (the summary's with ``bundle:PATH``, the one its
    algorithm line states with ``both:PATH``). Minus, so that larger means osteoporosis more likely.

    Returns
    -------
    (score, why)
        The score, or None and one line saying why there is none.
    """
    if image_input not in CT_IMAGE_INPUTS:
        return None, f"the fusion bundle takes {image_input} scores, not a CT's"
    if str(doc.get("status", "")) != "ok":
        return None, f"the CT analysis did not succeed (status {doc.get('status')})"
    summary = doc.get("summary") or {}
    value = summary.get("vbmd_l1_l2_mg_cm3") if isinstance(summary, Mapping) else None
    components = [str(x) for x in doc.get("algorithm_components") or ()]
    model = next((x for x in components if x.startswith("vBMD: model bundle")), None)
    roi = any(x.startswith("vBMD: calibrated trabecular ROI") for x in components) or not components
    if image_input == "ct-vbmd":
        if not roi:
            return None, "the CT's vBMD is a model bundle's, not the calibrated ROI's the bundle takes"
    elif model is None:
        return None, "no CT bmd bundle configured (analysis.bmd_estimator bundle:PATH or both:PATH)"
    elif ", beside the ROI" in model:
        found = re.search(r"\bvBMD (-?\d+(?:\.\d+)?) mg/cm3", model)
        value = float(found.group(1)) if found else None
    if value is None or not math.isfinite(float(value)):
        return None, "no L1-L2 vBMD in the CT analysis"
    return -float(value), ""


def read_result_scores(folder: Path, image_input: str) -> dict[str, tuple[float | None, str]]:
    """The image score of every ``result.json`` under ``folder``, keyed by Study Instance UID and by
    Accession Number (the first file in path order wins when a study has several).

    Raises
    ------
    InputError
        No such folder, no ``result.json`` in it, an unreadable one (named).
    """
    if not folder.is_dir():
        raise InputError(f"--image-results {folder}: no such folder")
    out: dict[str, tuple[float | None, str]] = {}
    paths = sorted(folder.rglob("result.json"))
    if not paths:
        raise InputError(f"--image-results {folder}: no result.json in it (dicomnode analyze writes them)")
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable result.json ({exc})") from None
        if not isinstance(doc, dict):
            raise InputError(f"{path}: not a result.json document")
        score = ct_image_score(doc, image_input)
        for key in (doc.get("study_instance_uid"), doc.get("accession_number")):
            if key:
                out.setdefault(str(key).strip(), score)
    return out


def read_fusion_rows(
    path: Path, image_results: Path | None = None, image_input: str = "other"
) -> tuple[list[FusionRow], list[str]]:
    """The rows of a fusion CSV, their image scores from its ``image_score`` column or, with
    ``image_results``, from the CT ``result.json`` files there; and why rows were left out (no result, or
    no score in it).

    Raises
    ------
    InputError
        As :func:`read_fusion_csv`; no key column; no row with an image score.
    """
    if image_results is None:
        return read_fusion_csv(path), []
    if image_input not in CT_IMAGE_INPUTS:
        raise InputError(f"--image-results needs --image-input {' or '.join(CT_IMAGE_INPUTS)}")
    scores = read_result_scores(image_results, image_input)
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        names = reader.fieldnames or []
        keys = [k for k in ("study_instance_uid", "accession_number") if k in names]
        if not keys or any(c not in names for c in ("patient_id", "date", "label")):
            raise InputError(
                f"{path}: with --image-results the columns are patient_id,date,label and "
                "study_instance_uid or accession_number"
            )
        lines = list(reader)
    rows: list[FusionRow] = []
    left_out: list[str] = []
    for n, r in enumerate(lines, start=2):
        key = next((str(r[k]).strip() for k in keys if str(r.get(k) or "").strip()), "")
        # the line number only: a study key is patient data and this list goes into the training report
        score, why = scores.get(key, (None, "no result.json for its study" if key else "no study key"))
        if score is None:
            left_out.append(f"line {n}: {why}")
            continue
        rows.extend(_checked_row(path, n, {**r, "image_score": str(score)}))
    if not rows:
        first = left_out[0] if left_out else "no rows"
        raise InputError(f"{path}: no row has an image score from {image_results} ({first})")
    return rows, left_out


def _checked_row(path: Path, n: int, r: Mapping[str, str]) -> list[FusionRow]:
    label = str(r["label"]).strip().lower()
    if label not in POSITIVE + NEGATIVE:
        raise InputError(f"{path} line {n}: label {r['label']!r} (use normal/osteoporosis or 0/1)")
    try:
        day = date.fromisoformat(str(r["date"]).strip()[:10])
        score = float(str(r["image_score"]))
    except ValueError as exc:
        raise InputError(f"{path} line {n}: {exc}") from None
    if not math.isfinite(score):
        raise InputError(f"{path} line {n}: image_score is not a number")
    return [FusionRow(str(r["patient_id"]).strip(), day, int(label in POSITIVE), score)]


def lab_features(
    labs: Sequence[LabValue], day: date, analytes: Sequence[str], window_days: int
) -> tuple[FloatArray, list[str]]:
    """Per analyte the value nearest to ``day`` within the window (NaN when none), and what was used."""
    out = np.full(len(analytes), np.nan)
    used: list[str] = []
    for k, key in enumerate(analytes):
        cands = [v for v in labs if v.analyte == key and abs((v.effective - day).days) <= window_days]
        if cands:
            best = min(cands, key=lambda v: (abs((v.effective - day).days), v.effective))
            out[k] = best.value
            used.append(f"{ANALYTES[key].name} {best.value:.3g} {best.unit} ({best.effective.isoformat()})")
    return out, used


# ------------------------------------------------------------------------------------- the models (numpy)


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))
    return out


def _logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    out: FloatArray = np.log(q / (1 - q))
    return out


def _fit_logistic(x: FloatArray, y: npt.NDArray[np.int64]) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    m = LogisticRegression(C=1.0).fit((x - mean) / scale, y)
    return {
        "kind": "logistic",
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "coef": m.coef_[0].tolist(),
        "intercept": float(m.intercept_[0]),
    }


def _apply_logistic(p: Mapping[str, Any], x: FloatArray) -> FloatArray:
    z = ((x - np.asarray(p["mean"])) / np.asarray(p["scale"])) @ np.asarray(p["coef"]) + float(p["intercept"])
    return _sigmoid(z)


def _fit_svm(x: FloatArray, y: npt.NDArray[np.int64], seed: int) -> dict[str, Any]:
    from sklearn.svm import SVC

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    xs = (x - mean) / scale
    svc = SVC(kernel="rbf", gamma="scale", C=1.0, random_state=seed).fit(xs, y)
    p = {
        "kind": "svm",
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "gamma": float(svc._gamma),
        "support": svc.support_vectors_.tolist(),
        "dual": svc.dual_coef_[0].tolist(),
        "intercept": float(svc.intercept_[0]),
    }
    p["calibration"] = _fit_logistic(_svm_decision(p, x)[:, None], y)
    return p


def _svm_decision(p: Mapping[str, Any], x: FloatArray) -> FloatArray:
    xs = (x - np.asarray(p["mean"])) / np.asarray(p["scale"])
    sv = np.asarray(p["support"])
    k = np.exp(-float(p["gamma"]) * ((xs[:, None, :] - sv[None]) ** 2).sum(-1))
    out: FloatArray = k @ np.asarray(p["dual"]) + float(p["intercept"])
    return out


def _apply_svm(p: Mapping[str, Any], x: FloatArray) -> FloatArray:
    return _apply_logistic(p["calibration"], _svm_decision(p, x)[:, None])


def _fit_mlp(x: FloatArray, y: npt.NDArray[np.int64], seed: int) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    m = MLPClassifier(hidden_layer_sizes=(8,), alpha=1e-2, max_iter=800, random_state=seed)
    with warnings.catch_warnings():
        # labs without signal never converge to anything; the held-out figures say so, not a warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit((x - mean) / scale, y)
    return {
        "kind": "mlp",
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "weights": [w.tolist() for w in m.coefs_],
        "biases": [b.tolist() for b in m.intercepts_],
    }


def _apply_mlp(p: Mapping[str, Any], x: FloatArray) -> FloatArray:
    h = (x - np.asarray(p["mean"])) / np.asarray(p["scale"])
    layers = list(zip(p["weights"], p["biases"], strict=True))
    for n, (w, b) in enumerate(layers):
        h = h @ np.asarray(w) + np.asarray(b)
        if n < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return _sigmoid(h[:, 0])


# --------------------------------------------------------------------------------------------- fitting


def _impute(x: FloatArray, medians: FloatArray) -> FloatArray:
    out = x.copy()
    rows, cols = np.nonzero(np.isnan(out))
    out[rows, cols] = medians[cols]
    return out


def fit_fusion(
    img: FloatArray, labs: FloatArray, y: npt.NDArray[np.int64], *, seed: int, missing: str
) -> dict[str, Any]:
    """Fit image-only, SVM, MLP and the stacked fused model on one training set (see module docstring)."""
    from sklearn.model_selection import StratifiedKFold

    medians = np.nanmedian(labs, axis=0) if labs.size else np.zeros(labs.shape[1])
    medians = np.where(np.isfinite(medians), medians, 0.0)
    complete = ~np.isnan(labs).any(axis=1)
    use = np.ones(len(y), bool) if missing == "impute" else complete
    xl = _impute(labs, medians)
    if use.sum() < 6 or len(set(y[use].tolist())) < 2:
        raise InputError(f"only {int(use.sum())} training patients with complete lab values: too few to fit")
    params: dict[str, Any] = {"medians": medians.tolist(), "image": _fit_logistic(img[:, None], y)}
    params["svm"] = _fit_svm(xl[use], y[use], seed)
    params["mlp"] = _fit_mlp(xl[use], y[use], seed)
    # the stacker learns from inner out-of-fold outputs of the base models
    idx = np.flatnonzero(use)
    k = int(min(3, np.bincount(y[idx]).min()))
    stack = np.zeros((len(idx), 3))
    if k >= 2:
        for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(idx, y[idx]):
            a, b = idx[tr], idx[te]
            stack[te, 0] = _logit(_apply_logistic(_fit_logistic(img[a, None], y[a]), img[b, None]))
            stack[te, 1] = _logit(_apply_svm(_fit_svm(xl[a], y[a], seed), xl[b]))
            stack[te, 2] = _logit(_apply_mlp(_fit_mlp(xl[a], y[a], seed), xl[b]))
    else:
        stack = np.column_stack([_logit(f) for f in _base(params, img[idx], xl[idx])])
    params["fused"] = _fit_logistic(stack, y[idx])
    return params


def _base(
    params: Mapping[str, Any], img: FloatArray, xl: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    return (
        _apply_logistic(params["image"], img[:, None]),
        _apply_svm(params["svm"], xl),
        _apply_mlp(params["mlp"], xl),
    )


def predict_fusion(
    params: Mapping[str, Any], img: FloatArray, labs: FloatArray, missing: str
) -> dict[str, FloatArray]:
    """Probabilities of osteoporosis: ``image``, ``svm``, ``mlp``, ``fused`` (NaN where labs are missing
    and the policy is ``decline``), ``fused_or_image`` (the fused one, else the image model's)."""
    complete = ~np.isnan(labs).any(axis=1)
    xl = _impute(labs, np.asarray(params["medians"]))
    p_img, p_svm, p_mlp = _base(params, img, xl)
    fused = _apply_logistic(params["fused"], np.column_stack([_logit(p_img), _logit(p_svm), _logit(p_mlp)]))
    if missing != "impute":
        p_svm = np.where(complete, p_svm, np.nan)
        p_mlp = np.where(complete, p_mlp, np.nan)
        fused = np.where(complete, fused, np.nan)
    return {
        "image": p_img,
        "image_same": np.where(np.isnan(fused), np.nan, p_img),
        "svm": p_svm,
        "mlp": p_mlp,
        "fused": fused,
        "fused_or_image": np.where(np.isnan(fused), p_img, fused),
    }


# ------------------------------------------------------------------------------------- data and training


def _features(
    rows: Sequence[FusionRow], labs_path: Path, cfg: FusionConfig
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    labs_by_patient: dict[str, list[LabValue]] = defaultdict(list)
    for v in read_lab_csv(labs_path):
        labs_by_patient[v.patient_id].append(v)
    feats = [
        lab_features(labs_by_patient.get(r.patient_id, []), r.day, cfg.analytes, cfg.window_days)[0]
        for r in rows
    ]
    img = np.array([r.image_score for r in rows], dtype=np.float64)
    y = np.array([r.label for r in rows], dtype=np.int64)
    return img, np.array(feats, dtype=np.float64).reshape(len(rows), len(cfg.analytes)), y


def three_way(y: npt.NDArray[np.int64], probs: Mapping[str, FloatArray]) -> dict[str, dict[str, float]]:
    """Accuracy, recall, precision, F1, AUC of each model on the cases it answered (``n`` says how many)."""
    from dicomnode.ml.knee_train import classification_metrics

    out: dict[str, dict[str, float]] = {}
    for name, p in probs.items():
        ok = ~np.isnan(p)
        if ok.sum() == 0:
            out[name] = {"n": 0.0}
            continue
        two = np.column_stack([1 - p[ok], p[ok]]).astype(np.float32)
        out[name] = classification_metrics(y[ok], two, 2)
    return out


MODEL_LABELS = {
    "image": "image only",
    "image_same": "image only, patients with labs",
    "svm": "labs only (SVM)",
    "mlp": "labs only (neural network)",
    "fused": "image + labs (fused)",
    "fused_or_image": "fused, image where labs missing",
}


def format_three_way(metrics: Mapping[str, Mapping[str, float]], title: str) -> str:
    """The side-by-side table ``dicomnode evaluate`` and ``train fusion`` print."""
    cols = ("n", "accuracy", "recall", "precision", "f1", "auc")
    lines = [title, f"{'model':34s}" + "".join(f"{c:>10s}" for c in cols)]
    for key, label in MODEL_LABELS.items():
        m = metrics.get(key, {})
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(
                f"{'-':>10s}"
                if v is None or (isinstance(v, float) and math.isnan(v))
                else f"{int(v):>10d}"
                if c == "n"
                else f"{v:>10.3f}"
            )
        lines.append(f"{label:34s}" + "".join(cells))
    return "\n".join(lines)


def train_fusion(cfg: FusionConfig) -> dict[str, Any]:
    """Cross-validate the three-way comparison on the same patient folds, fit the final models, write the
    bundle (and ``training/report.json``, ``training/three_way.csv``).

    Raises
    ------
    InputError
        Bad CSVs, an unknown missing-value policy, too few patients.
    """
    from dicomnode.ml.train import patient_folds

    if cfg.image_input not in IMAGE_INPUTS:
        raise InputError(f"--image-input {cfg.image_input!r}: use {', '.join(IMAGE_INPUTS)}")
    if cfg.missing not in ("decline", "impute"):
        raise InputError(f"--missing {cfg.missing!r}: use decline or impute")
    unknown = [a for a in cfg.analytes if a not in ANALYTES]
    if unknown:
        raise InputError(f"unknown analyte(s) {', '.join(unknown)} (known: {', '.join(ANALYTES)})")
    rows, left_out = read_fusion_rows(cfg.data, cfg.image_results, cfg.image_input)
    img, labs, y = _features(rows, cfg.labs, cfg)
    if len(set(y.tolist())) < 2:
        raise InputError(f"{cfg.data}: both classes are needed")
    report: dict[str, Any] = {
        "n": len(rows),
        "image_input": cfg.image_input,
        "image_scores_from": str(cfg.image_results.name) if cfg.image_results else "image_score column",
        "rows_left_out": len(left_out),
        "rows_left_out_first": left_out[:5],
        "missing_policy": cfg.missing,
        "window_days": cfg.window_days,
        "analytes": list(cfg.analytes),
        "patients_with_missing_labs": int(np.isnan(labs).any(axis=1).sum()),
    }
    if cfg.folds:
        oof: dict[str, FloatArray] = {k: np.full(len(rows), np.nan) for k in MODEL_LABELS}
        pids = [r.patient_id for r in rows]
        for f in patient_folds(pids, cfg.folds, cfg.seed):
            held = np.isin(np.array(pids), f)
            params = fit_fusion(img[~held], labs[~held], y[~held], seed=cfg.seed, missing=cfg.missing)
            for k, p in predict_fusion(params, img[held], labs[held], cfg.missing).items():
                oof[k][held] = p
        report["cross_validation"] = three_way(y, oof)
    params = fit_fusion(img, labs, y, seed=cfg.seed, missing=cfg.missing)
    if cfg.external is not None:
        rows_e, _ = read_fusion_rows(cfg.external, cfg.image_results, cfg.image_input)
        img_e, labs_e, y_e = _features(rows_e, cfg.labs, cfg)
        report["external"] = three_way(y_e, predict_fusion(params, img_e, labs_e, cfg.missing))
    tables = []
    if "cross_validation" in report:
        tables.append(format_three_way(report["cross_validation"], f"{cfg.folds}-fold cross-validation"))
    if "external" in report:
        tables.append(format_three_way(report["external"], "external test set"))
    report["table"] = "\n\n".join(tables)
    report["bundle"] = write_fusion_bundle(cfg, params, report)
    train_dir = cfg.out / "training"
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report


# ----------------------------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class FusionBundle:
    name: str
    version: str
    sha256: str
    analytes: tuple[str, ...]
    window_days: int
    missing: str
    params: Mapping[str, Any]
    image_input: str = "other"

    @property
    def identification(self) -> str:
        return f"{self.name} {self.version} (sha256:{self.sha256[:12]})"


def write_fusion_bundle(cfg: FusionConfig, params: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """Write ``models/fusion.json`` and the manifest with its SHA-256; returns the identification."""
    (cfg.out / METADATA.parent).mkdir(parents=True, exist_ok=True)
    (cfg.out / PARAMS.parent).mkdir(parents=True, exist_ok=True)
    data = json.dumps(params, indent=1).encode()
    (cfg.out / PARAMS).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    meta = {
        "schema": SCHEMA,
        "name": cfg.name,
        "version": cfg.version,
        "task": "fusion",
        "weights": {"path": str(PARAMS), "sha256": digest},
        "input": {
            "image_score": "the image model's output, larger = osteoporosis more likely",
            "image_input": cfg.image_input,
            "image_scores_from": report.get("image_scores_from", "image_score column"),
            "analytes": {
                a: {"loinc": list(ANALYTES[a].loinc), "unit": ANALYTES[a].unit} for a in cfg.analytes
            },
            "window_days": cfg.window_days,
            "missing": cfg.missing,
        },
        "output": {"units": "probability", "classes": ["normal", "osteoporosis"]},
        "cross_validation": report.get("cross_validation"),
        "external_test": report.get("external"),
        "intended_use": "Research: does adding laboratory values to an image model help (founding study a)? "
        "Not a diagnosis.",
        "training_data": f"{report['n']} patients from {cfg.data.name}, labs from {cfg.labs.name}",
    }
    (cfg.out / METADATA).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return f"{cfg.name} {cfg.version} (sha256:{digest[:12]})"


def load_fusion_bundle(path: Path | str) -> FusionBundle:
    """Read a fusion bundle after its SHA-256 matched.

    Raises
    ------
    BundleError
        Missing files, another schema, a checksum mismatch (one line).
    """
    p = Path(path)
    try:
        meta = json.loads((p / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"fusion bundle {p}: cannot read {METADATA} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise BundleError(f"fusion bundle {p}: not a {SCHEMA} manifest")
    try:
        data = (p / PARAMS).read_bytes()
    except OSError:
        raise BundleError(f"fusion bundle {p}: missing {PARAMS}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("weights", {}).get("sha256"):
        raise BundleError(
            f"fusion bundle {p}: sha256 mismatch for {PARAMS}: refusing tampered or corrupt models"
        )
    inp = meta.get("input", {})
    return FusionBundle(
        str(meta.get("name")),
        str(meta.get("version")),
        digest,
        tuple(inp.get("analytes", {})),
        int(inp.get("window_days", 90)),
        str(inp.get("missing", "decline")),
        json.loads(data),
        str(inp.get("image_input", "other")),
    )


def apply_fusion(
    bundle: FusionBundle, image_score: float, labs: Sequence[LabValue], day: date
) -> tuple[float | None, list[str], str]:
    """The fused probability of osteoporosis for one study (None when the bundle declines), the lab values
    used (name, value, unit, date) and a sentence saying what was done."""
    feats, used = lab_features(labs, day, bundle.analytes, bundle.window_days)
    missing = [ANALYTES[a].name for a, v in zip(bundle.analytes, feats, strict=True) if np.isnan(v)]
    if missing and bundle.missing == "decline":
        why = f"no {', '.join(missing)} within {bundle.window_days} days of the study"
        return None, used, f"fused model declined ({why}): image model only"
    probs = predict_fusion(bundle.params, np.array([image_score]), feats[None, :], bundle.missing)
    note = "fused with laboratory values: " + "; ".join(used)
    if missing:
        note += f" (imputed: {', '.join(missing)})"
    return float(probs["fused"][0]), used, note


# ------------------------------------------------------------------------------------ generated dataset


def write_fusion_dataset(
    root: Path,
    n: int,
    seed: int,
    *,
    lab_signal: bool,
    image_auc_noise: float = 1.2,
    missing_fraction: float = 0.1,
    ct_results: bool = False,
) -> tuple[Path, Path]:
    """A generated cohort (CSV of image scores and labels, lab CSV) for tests and trials.

    Each patient has a latent bone status; the label is osteoporosis for the lower half. The image score
    sees the status through noise (``image_auc_noise``); the lab values carry the status (lower vitamin D
    and calcium, higher PTH and alkaline phosphatase) when ``lab_signal``, else they are drawn independently
    of it. ``missing_fraction`` of the patients have no lab values at all.

    ``ct_results``: the image side is a CT analysis instead, as ``train fusion --image-results`` reads it:
    ``results/<patient>/result.json`` with an L1-L2 calibrated-ROI vBMD of ``120 - 35 * score`` mg/cm3,
    and the CSV names each study by ``accession_number`` (no ``image_score`` column).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    status = rng.normal(size=n)
    label = (status < 0).astype(int)
    image = -status + rng.normal(scale=image_auc_noise, size=n)
    drive = -status if lab_signal else rng.normal(size=n)
    data = root / "cohort.csv"
    labs = root / "labs.csv"
    with (
        data.open("w", newline="", encoding="utf-8") as fh,
        labs.open("w", newline="", encoding="utf-8") as lf,
    ):
        w = csv.writer(fh)
        lw = csv.writer(lf)
        w.writerow(["patient_id", "date", "label", "accession_number" if ct_results else "image_score"])
        lw.writerow(["patient_id", "date", "loinc", "value", "unit"])
        for i in range(n):
            pid, day = f"P{seed:03d}{i:04d}", date(2026, 1 + i % 12, 1 + i % 28)
            key = f"A{seed:03d}{i:04d}" if ct_results else f"{image[i]:.4f}"
            w.writerow([pid, day.isoformat(), "osteoporosis" if label[i] else "normal", key])
            if ct_results:
                _write_ct_result(root / "results" / pid, key, 120.0 - 35.0 * float(image[i]))
            if rng.random() < missing_fraction:
                continue
            lab_day = date.fromordinal(day.toordinal() - int(rng.integers(0, 30)))
            d, e = drive[i], rng.normal(size=6) * 0.6
            values = [
                ("17861-6", 9.4 - 0.35 * d + 0.3 * e[0], "mg/dL"),
                ("2777-1", 3.6 + 0.3 * e[1], "mg/dL"),
                ("6768-6", 80 + 18 * d + 12 * e[2], "U/L"),
                ("62292-8", 28 - 7 * d + 5 * e[3], "ng/mL"),
                ("2731-8", 45 + 14 * d + 8 * e[4], "pg/mL"),
                ("2160-0", 0.9 + 0.12 * e[5], "mg/dL"),
            ]
            for loinc, value, unit in values:
                lw.writerow([pid, lab_day.isoformat(), loinc, f"{max(value, 0.6):.3f}", unit])
    return data, labs


def _write_ct_result(folder: Path, accession: str, vbmd: float) -> None:
    """A ``result.json`` as a CT analysis with the calibrated ROI writes it (the fields the scores use)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "status": "ok",
        "study_instance_uid": f"2.25.{int(hashlib.sha256(accession.encode()).hexdigest()[:24], 16)}",
        "accession_number": accession,
        "summary": {"vbmd_l1_l2_mg_cm3": round(vbmd, 2), "levels_used": ["L1", "L2"]},
        "algorithm_components": ["vBMD: calibrated trabecular ROI (internal calibration), erosion 2 mm"],
    }
    (folder / "result.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
