"""``dicomnode evaluate``: compare predicted vBMD with a reference, write metrics, plots and a report.

Inputs are read at the edge (:func:`read_reference`, :func:`read_predictions`), matched by id
(:func:`match`) and scored by the pure functions of :mod:`dicomnode.ml.agreement`. Nothing is dropped
silently: ids without a partner, without a value or seen twice are listed in ``metrics.json`` and the report.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import InputError
from dicomnode.ml import agreement as m

log = logging.getLogger(__name__)

#: Keys under which a result.json may carry the accession number (first found wins).
ACCESSION_KEYS: tuple[str, ...] = ("accession_number", "AccessionNumber")


@dataclass(frozen=True)
class ReferenceRow:
    id: str
    bmd_mg_cm3: float
    osteoporosis: int


@dataclass
class Predictions:
    """Predicted vBMD by id, plus what could not be used and why."""

    values: dict[str, float] = field(default_factory=dict)
    #: id -> other ids the same prediction answers to (e.g. study UID when matched by accession).
    aliases: dict[str, str] = field(default_factory=dict)
    without_value: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Matched:
    ids: tuple[str, ...]
    reference: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    missing_predictions: tuple[str, ...]  # reference ids with no usable prediction
    unmatched_predictions: tuple[str, ...]  # prediction ids absent from the reference


def _float(value: str, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise InputError(f"{what}: not a number: {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{what}: not a finite number: {value!r}")
    return v


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(fields)})"
                )
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read CSV: {exc}") from None


def read_reference(path: Path) -> list[ReferenceRow]:
    """Read ``id,bmd_mg_cm3,osteoporosis`` (osteoporosis 0/1).

    Parameters
    ----------
    path : Path
        CSV file.

    Returns
    -------
    list of ReferenceRow
        In file order.

    Raises
    ------
    InputError
        Missing file/column, bad number, duplicate id or class not 0/1 (one line, with the row number).
    """
    rows = _read_csv(path, ("id", "bmd_mg_cm3", "osteoporosis"))
    out: list[ReferenceRow] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        rid = row["id"]
        if not rid:
            raise InputError(f"{path}:{i}: empty id")
        if rid in seen:
            raise InputError(f"{path}:{i}: duplicate id {rid!r}")
        seen.add(rid)
        bmd = _float(row["bmd_mg_cm3"], f"{path}:{i} bmd_mg_cm3")
        cls = row["osteoporosis"].lower()
        if cls in ("1", "true", "yes", "1.0"):
            y = 1
        elif cls in ("0", "false", "no", "0.0"):
            y = 0
        else:
            raise InputError(f"{path}:{i}: osteoporosis must be 0 or 1, got {row['osteoporosis']!r}")
        out.append(ReferenceRow(rid, bmd, y))
    return out


def _prediction_from_result(doc: dict[str, Any]) -> tuple[list[str], float | None]:
    """Ids (accession first, then study UID) and the L1-L2 vBMD of one ``result.json`` document."""
    ids: list[str] = []
    for key in ACCESSION_KEYS:
        acc = doc.get(key)
        if acc:
            ids.append(str(acc))
            break
    uid = doc.get("study_instance_uid")
    if uid:
        ids.append(str(uid))
    summary = doc.get("summary") or {}
    value = summary.get("vbmd_l1_l2_mg_cm3") if isinstance(summary, dict) else None
    if value is None or not isinstance(value, int | float) or not math.isfinite(float(value)):
        return ids, None
    return ids, float(value)


def read_predictions(path: Path) -> Predictions:
    """Read predictions from a CSV ``id,bmd_mg_cm3`` or a folder of ``result.json`` files.

    In a folder every ``*.json`` below it that has a ``study_instance_uid`` is a result; it answers to its
    accession number when it carries one (key ``accession_number``), else to its study UID (both are kept so
    the reference may use either).

    Parameters
    ----------
    path : Path
        CSV file or folder.

    Returns
    -------
    Predictions
        Values by id and the ids that could not be used.
    """
    preds = Predictions()
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise InputError(f"{path}: no result.json files found")
        for f in files:
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s: %s", f, exc)
                preds.unreadable.append(str(f.relative_to(path)))
                continue
            if not isinstance(doc, dict) or "study_instance_uid" not in doc:
                continue  # not a result document (e.g. a metrics.json lying in the same tree)
            ids, value = _prediction_from_result(doc)
            if not ids:
                preds.unreadable.append(str(f.relative_to(path)))
                continue
            primary = ids[0]
            if value is None:
                preds.without_value.append(primary)
                continue
            if primary in preds.values:
                preds.duplicates.append(primary)
                continue
            preds.values[primary] = value
            for alias in ids[1:]:
                preds.aliases[alias] = primary
        return preds
    rows = _read_csv(path, ("id", "bmd_mg_cm3"))
    for i, row in enumerate(rows, start=2):
        pid = row["id"]
        if not pid:
            raise InputError(f"{path}:{i}: empty id")
        if row["bmd_mg_cm3"] == "" or row["bmd_mg_cm3"].lower() in ("nan", "null", "none"):
            preds.without_value.append(pid)
            continue
        value = _float(row["bmd_mg_cm3"], f"{path}:{i} bmd_mg_cm3")
        if pid in preds.values:
            preds.duplicates.append(pid)
            continue
        preds.values[pid] = value
    return preds


def match(reference: list[ReferenceRow], preds: Predictions) -> Matched:
    """Pair reference rows with predictions by id (directly or through an alias such as the study UID).

    Parameters
    ----------
    reference : list of ReferenceRow
        The reference standard.
    preds : Predictions
        What :func:`read_predictions` returned.

    Returns
    -------
    Matched
        Arrays in reference order plus the ids on either side that found no partner.
    """
    ids: list[str] = []
    ref: list[float] = []
    pred: list[float] = []
    truth: list[int] = []
    used: set[str] = set()
    missing: list[str] = []
    for row in reference:
        key = row.id if row.id in preds.values else preds.aliases.get(row.id)
        if key is None or key in used:
            missing.append(row.id)
            continue
        used.add(key)
        ids.append(row.id)
        ref.append(row.bmd_mg_cm3)
        pred.append(preds.values[key])
        truth.append(row.osteoporosis)
    unmatched = [k for k in preds.values if k not in used]
    return Matched(
        tuple(ids),
        np.asarray(ref, dtype=np.float64),
        np.asarray(pred, dtype=np.float64),
        np.asarray(truth, dtype=np.int64),
        tuple(missing),
        tuple(unmatched),
    )


def _clean(v: float) -> float | None:
    return None if math.isnan(v) or math.isinf(v) else v


def compute_report(
    matched: Matched,
    preds: Predictions,
    threshold: float = 80.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``metrics.json`` document (NaN written as null).

    Parameters
    ----------
    matched : Matched
        Paired values.
    preds : Predictions
        For the lists of unusable predictions.
    threshold : float
        Predicted vBMD below it = positive (mg/cm3).
    n_boot : int
        Bootstrap resamples for the 95 % CIs.
    seed : int
        Bootstrap seed.

    Returns
    -------
    dict
        Metrics, ``<name>_ci95`` beside each, the confusion matrix and every unmatched id.
    """
    point = m.point_metrics(matched.reference, matched.predicted, matched.truth, threshold)
    cis = m.bootstrap_ci(
        matched.reference, matched.predicted, matched.truth, threshold, n_boot=n_boot, seed=seed
    )
    doc: dict[str, Any] = {}
    for name in m.METRIC_NAMES:
        if name == "n":
            doc["n"] = int(point["n"])
            continue
        doc[name] = _clean(point[name])
        ci = cis[name]
        doc[f"{name}_ci95"] = [_clean(ci.low), _clean(ci.high)]
    doc["threshold_mg_cm3"] = threshold
    doc["bootstrap"] = {"n_resamples": n_boot, "seed": seed, "method": "percentile, cases resampled"}
    doc["n_positive_reference"] = int(np.sum(matched.truth == 1))
    doc["n_negative_reference"] = int(np.sum(matched.truth == 0))
    doc["confusion_matrix_acr"] = {
        "labels": [c.value for c in m.CATEGORY_ORDER],
        "rows": "reference",
        "columns": "predicted",
        "matrix": m.category_confusion(matched.reference, matched.predicted),
    }
    doc["missing_predictions"] = list(matched.missing_predictions)
    doc["unmatched_predictions"] = list(matched.unmatched_predictions)
    doc["predictions_without_value"] = list(preds.without_value)
    doc["duplicate_predictions"] = list(preds.duplicates)
    doc["unreadable_predictions"] = list(preds.unreadable)
    doc["matched_ids"] = list(matched.ids)
    return doc


def _plots(matched: Matched, threshold: float, out: Path, doc: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    ref, pred, y = matched.reference, matched.predicted, matched.truth

    fig, ax = plt.subplots(figsize=(5, 5))
    fpr, tpr, _ = m.roc_curve(y, -pred)
    auc = doc.get("auc")
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}" if auc is not None else "AUC undefined")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC: osteoporosis from predicted vBMD")
    ax.legend(loc="lower right")
    paths["roc"] = out / "roc.png"
    fig.savefig(paths["roc"], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ref, pred, s=14, alpha=0.7)
    lo = float(min(ref.min(initial=0.0), pred.min(initial=0.0)))
    hi = float(max(ref.max(initial=200.0), pred.max(initial=200.0)))
    ax.plot([lo, hi], [lo, hi], color="k", lw=1, label="identity")
    for t in (80.0, 120.0):
        ax.axhline(t, color="grey", ls=":", lw=0.8)
        ax.axvline(t, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("reference vBMD (mg/cm3)")
    ax.set_ylabel("predicted vBMD (mg/cm3)")
    ax.set_title("Predicted vs reference")
    ax.legend(loc="upper left")
    paths["scatter"] = out / "scatter.png"
    fig.savefig(paths["scatter"], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    mean = (ref + pred) / 2.0
    diff = pred - ref
    ax.scatter(mean, diff, s=14, alpha=0.7)
    for key, style in (
        ("bland_altman_bias", "-"),
        ("bland_altman_loa_low", "--"),
        ("bland_altman_loa_high", "--"),
    ):
        v = doc.get(key)
        if v is not None:
            ax.axhline(v, color="k", ls=style, lw=1)
    ax.set_xlabel("mean of predicted and reference (mg/cm3)")
    ax.set_ylabel("predicted - reference (mg/cm3)")
    ax.set_title("Bland-Altman")
    paths["bland_altman"] = out / "bland_altman.png"
    fig.savefig(paths["bland_altman"], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render_html(doc: dict[str, Any], plots: dict[str, Path]) -> str:
    """One-page HTML report with the plots embedded (base64), so it can be mailed as one file.

    Parameters
    ----------
    doc : dict
        The metrics document.
    plots : dict
        Plot name -> PNG path.

    Returns
    -------
    str
        The HTML text.
    """
    rows = []
    for name in m.METRIC_NAMES:
        if name == "n":
            continue
        ci = doc.get(f"{name}_ci95") or [None, None]
        rows.append(
            f"<tr><td>{name}</td><td>{_fmt(doc.get(name))}</td><td>{_fmt(ci[0])} - {_fmt(ci[1])}</td></tr>"
        )
    cm = doc["confusion_matrix_acr"]
    head = "".join(f"<th>pred {html.escape(lbl)}</th>" for lbl in cm["labels"])
    cm_rows = "".join(
        f"<tr><th>ref {html.escape(lbl)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        for lbl, row in zip(cm["labels"], cm["matrix"], strict=True)
    )
    imgs = []
    for name, p in plots.items():
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        imgs.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    lists = []
    for key, title in (
        ("missing_predictions", "Reference ids without a prediction"),
        ("unmatched_predictions", "Predictions without a reference"),
        ("predictions_without_value", "Predictions without a vBMD value"),
        ("duplicate_predictions", "Duplicate predictions (first kept)"),
        ("unreadable_predictions", "Unreadable prediction files"),
    ):
        items = doc.get(key) or []
        body = ", ".join(html.escape(str(i)) for i in items) if items else "none"
        lists.append(f"<p><b>{title} ({len(items)}):</b> {body}</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dicomnode evaluation</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} figure{{display:inline-block;margin:0.5em}}
img{{max-width:22em}}</style></head><body>
<h1>vBMD evaluation</h1>
<p>n = {doc["n"]} matched cases ({doc["n_positive_reference"]} osteoporosis by reference);
positive call: predicted vBMD &lt; {doc["threshold_mg_cm3"]} mg/cm3; 95 % CIs by bootstrap
({doc["bootstrap"]["n_resamples"]} resamples, seed {doc["bootstrap"]["seed"]}).</p>
<table><tr><th>metric</th><th>value</th><th>95 % CI</th></tr>{"".join(rows)}</table>
<h2>ACR categories (rows reference, columns predicted)</h2>
<table><tr><th></th>{head}</tr>{cm_rows}</table>
<h2>Plots</h2>{"".join(imgs)}
<h2>Not matched</h2>{"".join(lists)}
</body></html>
"""


def evaluate(
    reference_csv: Path,
    predictions: Path,
    out_dir: Path,
    threshold: float = 80.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the whole evaluation and write ``metrics.json``, three PNG plots and ``report.html``.

    Parameters
    ----------
    reference_csv : Path
        ``id,bmd_mg_cm3,osteoporosis``.
    predictions : Path
        CSV ``id,bmd_mg_cm3`` or a folder of ``result.json``.
    out_dir : Path
        Created if needed.
    threshold : float
        Decision threshold (mg/cm3).
    n_boot, seed : int
        Bootstrap settings.

    Returns
    -------
    dict
        The metrics document as written.

    Raises
    ------
    InputError
        Unreadable input or no case matched.
    """
    reference = read_reference(reference_csv)
    preds = read_predictions(predictions)
    matched = match(reference, preds)
    if len(matched.ids) == 0:
        raise InputError(
            f"no reference id matched a prediction ({len(reference)} reference ids, "
            f"{len(preds.values)} predictions)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = compute_report(matched, preds, threshold, n_boot, seed)
    plots = _plots(matched, threshold, out_dir, doc)
    doc["plots"] = {k: p.name for k, p in plots.items()}
    doc["report"] = "report.html"
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(doc, plots), encoding="utf-8")
    log.info(
        "evaluated %d cases (%d missing, %d unmatched) -> %s",
        doc["n"],
        len(matched.missing_predictions),
        len(matched.unmatched_predictions),
        out_dir,
    )
    return doc
