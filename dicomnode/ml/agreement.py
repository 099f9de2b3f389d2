"""Agreement and diagnostic metrics for BMD predictions, written with numpy only (pure functions).

Conventions (fixed, the tests check them against scikit-learn):

* ``difference = predicted - reference``; Bland-Altman limits are ``bias +/- 1.96 * SD`` with the sample
  SD (``ddof=1``).
* ``r2`` is the coefficient of determination of the predictions against the reference
  (``1 - SS_res / SS_tot``, as ``sklearn.metrics.r2_score(reference, predicted)``), not Pearson's r squared.
* Binary decisions: a predicted vBMD below ``threshold`` (default 80 mg/cm3, the ACR osteoporosis cut-off)
  is positive. The AUC ranks by predicted vBMD, lower meaning more likely positive (ties count one half).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.domain import BoneCategory
from dicomnode.vocab import acr_category

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: ACR QCT category order used by the confusion matrix rows/columns.
CATEGORY_ORDER: tuple[BoneCategory, ...] = (
    BoneCategory.NORMAL,
    BoneCategory.OSTEOPENIA,
    BoneCategory.OSTEOPOROSIS,
)

#: Metric names in the order ``metrics.json`` lists them.
METRIC_NAMES: tuple[str, ...] = (
    "n",
    "mae",
    "rmse",
    "pearson_r",
    "r2",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "accuracy",
    "bland_altman_bias",
    "bland_altman_loa_low",
    "bland_altman_loa_high",
)


def _nan_div(num: float, den: float) -> float:
    return float(num / den) if den != 0 else math.nan


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); higher score = more likely positive.

    Parameters
    ----------
    labels : array_like of {0, 1}
        True classes.
    scores : array_like of float
        Scores; ties count one half.

    Returns
    -------
    float
        The AUC, NaN when only one class is present.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(np.sum(y == 1))
    n_neg = int(np.sum(y == 0))
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = float(np.sum(ranks[y == 1])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC operating points at every distinct score (positive when ``score >= threshold``).

    Parameters
    ----------
    labels : array_like of {0, 1}
        True classes.
    scores : array_like of float
        Scores, higher = more likely positive.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        Starting at (0, 0) with threshold +inf and ending at (1, 1).
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    n_pos = max(int(np.sum(y == 1)), 1)
    n_neg = max(int(np.sum(y == 0)), 1)
    tpr = [0.0]
    fpr = [0.0]
    for t in thresholds:
        pred = s >= t
        tpr.append(float(np.sum(pred & (y == 1))) / n_pos)
        fpr.append(float(np.sum(pred & (y == 0))) / n_neg)
    return (
        np.asarray(fpr, dtype=np.float64),
        np.asarray(tpr, dtype=np.float64),
        np.concatenate([[np.inf], thresholds]).astype(np.float64),
    )


def point_metrics(
    reference: npt.ArrayLike,
    predicted: npt.ArrayLike,
    truth: npt.ArrayLike,
    threshold: float = 80.0,
) -> dict[str, float]:
    """Every scalar metric of ``metrics.json`` on one sample.

    Parameters
    ----------
    reference : array_like of float
        Reference vBMD (mg/cm3).
    predicted : array_like of float
        Predicted vBMD (mg/cm3), same length.
    truth : array_like of {0, 1}
        Reference osteoporosis class (1 = osteoporosis).
    threshold : float
        Predicted vBMD below this is a positive call.

    Returns
    -------
    dict
        ``METRIC_NAMES`` -> value (NaN when undefined, e.g. AUC with one class).
    """
    ref = np.asarray(reference, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(truth, dtype=np.int64)
    n = len(ref)
    out: dict[str, float] = {name: math.nan for name in METRIC_NAMES}
    out["n"] = float(n)
    if n == 0:
        return out
    diff = pred - ref
    out["mae"] = float(np.mean(np.abs(diff)))
    out["rmse"] = float(math.sqrt(np.mean(diff**2)))
    if n >= 2:
        rc = ref - ref.mean()
        pc = pred - pred.mean()
        den = math.sqrt(float(np.sum(rc**2)) * float(np.sum(pc**2)))
        out["pearson_r"] = _nan_div(float(np.sum(rc * pc)), den)
        ss_tot = float(np.sum(rc**2))
        out["r2"] = 1.0 - _nan_div(float(np.sum(diff**2)), ss_tot) if ss_tot > 0 else math.nan
        sd = float(np.std(diff, ddof=1))
    else:
        sd = math.nan
    bias = float(np.mean(diff))
    out["bland_altman_bias"] = bias
    out["bland_altman_loa_low"] = bias - 1.96 * sd
    out["bland_altman_loa_high"] = bias + 1.96 * sd
    # lower predicted vBMD = more likely osteoporosis, so rank on the negated value
    out["auc"] = roc_auc(y, -pred)
    called = pred < threshold
    pos = y == 1
    tp = float(np.sum(called & pos))
    fp = float(np.sum(called & ~pos))
    tn = float(np.sum(~called & ~pos))
    fn = float(np.sum(~called & pos))
    out["sensitivity"] = _nan_div(tp, tp + fn)
    out["specificity"] = _nan_div(tn, tn + fp)
    out["precision"] = _nan_div(tp, tp + fp)
    out["f1"] = _nan_div(2 * tp, 2 * tp + fp + fn)
    out["accuracy"] = (tp + tn) / n
    return out


@dataclass(frozen=True)
class ConfidenceInterval:
    low: float
    high: float
    n_valid: int  # bootstrap resamples in which the metric was defined


def bootstrap_ci(
    reference: npt.ArrayLike,
    predicted: npt.ArrayLike,
    truth: npt.ArrayLike,
    threshold: float = 80.0,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metric_fn: Callable[[FloatArray, FloatArray, IntArray, float], Mapping[str, float]] | None = None,
) -> dict[str, ConfidenceInterval]:
    """Percentile bootstrap confidence intervals of every metric (cases resampled with replacement).

    Parameters
    ----------
    reference, predicted, truth : array_like
        As for :func:`point_metrics`.
    threshold : float
        Decision threshold (mg/cm3).
    n_boot : int
        Number of resamples.
    seed : int
        Seed of the numpy generator, so the same input gives the same intervals.
    level : float
        Coverage of the interval.
    metric_fn : callable, optional
        Replaces :func:`point_metrics` (for tests).

    Returns
    -------
    dict
        metric name -> interval; NaN bounds where the metric was never defined (e.g. one class only).
    """
    fn = metric_fn or point_metrics
    ref = np.asarray(reference, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(truth, dtype=np.int64)
    n = len(ref)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in METRIC_NAMES if name != "n"}
    if n > 0:
        for _ in range(n_boot):
            idx = rng.integers(0, n, size=n)
            vals = fn(ref[idx], pred[idx], y[idx], threshold)
            for name in samples:
                v = vals[name]
                if not math.isnan(v):
                    samples[name].append(v)
    alpha = (1.0 - level) / 2.0
    out: dict[str, ConfidenceInterval] = {}
    for name, vals_list in samples.items():
        if vals_list:
            arr = np.asarray(vals_list)
            out[name] = ConfidenceInterval(
                float(np.quantile(arr, alpha)), float(np.quantile(arr, 1.0 - alpha)), len(vals_list)
            )
        else:
            out[name] = ConfidenceInterval(math.nan, math.nan, 0)
    return out


def category_confusion(reference: npt.ArrayLike, predicted: npt.ArrayLike) -> list[list[int]]:
    """Three-class ACR confusion matrix: rows = reference category, columns = predicted category.

    Parameters
    ----------
    reference, predicted : array_like of float
        vBMD in mg/cm3.

    Returns
    -------
    list of list of int
        3 x 3 counts in the order of ``CATEGORY_ORDER`` (normal, osteopenia, osteoporosis).
    """
    index = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    mat = [[0, 0, 0] for _ in CATEGORY_ORDER]
    for r, p in zip(np.asarray(reference, float), np.asarray(predicted, float), strict=True):
        mat[index[acr_category(float(r))]][index[acr_category(float(p))]] += 1
    return mat
