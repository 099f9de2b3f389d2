"""``dicomnode train knee-xray``: founding study (e) on a site's own knee radiographs.

Input: a CSV with ``path`` (a CR/DX DICOM file, relative to the CSV's folder or absolute) and ``label``
(2 or 3 classes: ``normal``/``osteoporosis`` or ``normal``/``osteopenia``/``osteoporosis``, or any 2-3
names or integers), optionally ``patient_id`` (folds are split by patient; default: one patient per row).

Runs, for every model of the study's comparison (ResNet-50 fine-tuned, ResNet-50 with frozen features,
ResNet-18, VGG-16, a 3-layer CNN), ``fold1`` ... ``foldK`` on the same patient folds (each trained on the
other folds, scored on its own) and a ``final`` model on all development data, scored on the external test
set when one is given. The fine-tuned ResNet-50's final model becomes the bundle (task ``radiograph``).

Transfer learning: ``--weights FILE --weights-sha256 HEX`` starts both ResNet-50 variants from a
``state_dict`` the site supplies (for ``resnet50_2d`` of the same width; the classification layer is left
out when its shape differs). The file's SHA-256 must match before it is read; file name and checksum are
written into the manifest. Nothing is ever downloaded. Without weights both start from random weights,
and "frozen" then means random features with a trained classifier (the study's "without fine-tuning" run
started from ImageNet weights; the table says which applies).

Outputs under ``OUT/training``: ``comparison.csv`` and ``comparison.png`` (the table), ``oof.csv``
(out-of-fold probabilities of every model), ``report.json``. Every figure has the majority-class baseline
beside it (the accuracy of always answering the most frequent training class).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm

from dicomnode.errors import InputError
from dicomnode.ml import bundle as bdl
from dicomnode.ml.knee import FloatArray, load_training_image, predict_crops, prepare_knee
from dicomnode.ml.networks import build
from dicomnode.ml.train import _deterministic, patient_folds

log = logging.getLogger(__name__)

CANONICAL_CLASSES = ("normal", "osteopenia", "osteoporosis")
#: The models of the study's comparison: name -> (factory, frozen features, takes the site's weights).
MODELS: dict[str, tuple[str, bool, bool]] = {
    "resnet50-finetuned": ("resnet50_2d", False, True),
    "resnet50-frozen": ("resnet50_2d", True, True),
    "resnet18": ("resnet18_2d", False, False),
    "vgg16": ("vgg16_2d", False, False),
    "cnn3": ("cnn3_2d", False, False),
}
#: What the study reported for each (accuracy; founding-studies.md, study e). Quoted, never ours.
STUDY_ACCURACY = {
    "resnet50-finetuned": 0.90,
    "resnet50-frozen": 0.83,
    "resnet18": 0.79,
    "vgg16": 0.88,
    "cnn3": 0.66,
}
BUNDLE_MODEL = "resnet50-finetuned"


@dataclass
class KneeTrainConfig:
    data: Path
    out: Path
    external: Path | None = None
    folds: int = 5
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    #: First-stage channels of the ResNets and VGG (64 = the published networks); the CNN uses half.
    width: int = 64
    size: tuple[int, int] = (224, 224)
    spacing_mm: float = 0.6
    models: tuple[str, ...] = tuple(MODELS)
    weights: Path | None = None
    weights_sha256: str | None = None
    seed: int = 0
    threads: int | None = None
    name: str | None = None
    version: str = "0.1.0"
    progress: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class KneeItem:
    path: Path
    label: int
    patient_id: str


def _class_order(labels: Sequence[str]) -> tuple[str, ...]:
    found = sorted(set(labels))
    if set(found) <= set(CANONICAL_CLASSES):
        return tuple(c for c in CANONICAL_CLASSES if c in found)
    try:
        return tuple(sorted(found, key=float))
    except ValueError:
        return tuple(found)


def read_knee_csv(path: Path, classes: Sequence[str] | None = None) -> tuple[list[KneeItem], tuple[str, ...]]:
    """Rows of a knee CSV and the class names (in order), checked.

    Raises
    ------
    InputError
        Missing file or columns, a missing image, fewer than 2 or more than 3 classes, an unknown label.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"{path}: no rows")
    missing = [c for c in ("path", "label") if c not in rows[0]]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (need path,label[,patient_id])")
    labels = [str(r["label"]).strip().lower() for r in rows]
    order = tuple(classes) if classes is not None else _class_order(labels)
    if classes is None and not 2 <= len(order) <= 3:
        raise InputError(f"{path}: {len(order)} classes ({', '.join(order)}); 2 or 3 are supported")
    items: list[KneeItem] = []
    for n, (row, label) in enumerate(zip(rows, labels, strict=True), start=2):
        if label not in order:
            raise InputError(f"{path} line {n}: label {label!r} is not one of {', '.join(order)}")
        p = Path(str(row["path"]).strip())
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise InputError(f"{path} line {n}: image {row['path']} not found")
        pid = str(row.get("patient_id") or "").strip() or f"row{n}"
        items.append(KneeItem(p, order.index(label), pid))
    return items, order


def _load_crops(items: Sequence[KneeItem], cfg: KneeTrainConfig) -> FloatArray:
    crops = []
    for it in tqdm(items, desc="loading", disable=not cfg.progress, unit="image"):
        pixels, spacing, side = load_training_image(it.path)
        crops.append(prepare_knee(pixels, spacing, side, cfg.spacing_mm, cfg.size).crop)
    return np.stack(crops).astype(np.float32)


def _load_transfer(cfg: KneeTrainConfig) -> dict[str, torch.Tensor] | None:
    """The site's weights, after their checksum matched (never downloaded)."""
    if cfg.weights is None:
        return None
    if not cfg.weights.is_file():
        raise InputError(f"--weights {cfg.weights}: no such file")
    if not cfg.weights_sha256:
        raise InputError("--weights needs --weights-sha256 (the checksum the site recorded for the file)")
    actual = bdl.sha256_file(cfg.weights)
    if actual != cfg.weights_sha256.strip().lower():
        raise InputError(
            f"--weights {cfg.weights.name}: sha256 {actual[:12]}... does not match --weights-sha256 "
            f"{cfg.weights_sha256[:12]}...: refusing the file"
        )
    try:
        state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        raise InputError(
            f"--weights {cfg.weights.name}: not a torch state_dict ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise InputError(f"--weights {cfg.weights.name}: not a state_dict")
    return state


def _build(
    model: str, n_classes: int, cfg: KneeTrainConfig, transfer: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, dict[str, Any]]:
    factory, frozen, takes_weights = MODELS[model]
    width = max(2, cfg.width // 2) if factory == "cnn3_2d" else cfg.width
    kwargs: dict[str, Any] = {"out_channels": n_classes, "width": width, "in_channels": 1}
    net = build(factory, kwargs)
    if transfer is not None and takes_weights:
        own = net.state_dict()
        fitting = {k: v for k, v in transfer.items() if k in own and own[k].shape == v.shape}
        if len(fitting) < len(own) // 2:
            raise InputError(
                f"--weights: only {len(fitting)} of {len(own)} tensors fit {factory} of width {width}"
            )
        net.load_state_dict(fitting, strict=False)
    if frozen:
        for name, p in net.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return net, {"factory": factory, "kwargs": kwargs}


def _fit(
    net: nn.Module, x: FloatArray, y: npt.NDArray[np.int64], cfg: KneeTrainConfig, seed: int, desc: str
) -> None:
    """Adam with cosine decay on the trainable parameters; shifted copies as augmentation."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    counts = np.bincount(y, minlength=int(y.max()) + 1).astype(np.float64)
    weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    for epoch in tqdm(range(cfg.epochs), desc=desc, disable=not cfg.progress, unit="epoch"):
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        net.train()
        order = rng.permutation(len(x))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            shifts = rng.integers(-3, 4, size=(len(idx), 2))
            batch = np.stack([np.roll(x[j], tuple(s), axis=(0, 1)) for j, s in zip(idx, shifts, strict=True)])
            opt.zero_grad()
            loss = loss_fn(net(torch.from_numpy(batch)[:, None]), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
    net.eval()


def classification_metrics(
    y: Sequence[int] | npt.NDArray[np.int64], probs: FloatArray, n_classes: int
) -> dict[str, float]:
    """Accuracy, macro recall / precision / F1 and AUC (one-vs-rest macro for 3 classes)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    yt = np.asarray(y)
    pred = np.argmax(probs, axis=1)
    out = {
        "n": float(len(yt)),
        "accuracy": float(accuracy_score(yt, pred)),
        "recall": float(recall_score(yt, pred, average="macro", zero_division=0)),
        "precision": float(precision_score(yt, pred, average="macro", zero_division=0)),
        "f1": float(f1_score(yt, pred, average="macro", zero_division=0)),
    }
    try:
        if n_classes == 2:
            out["auc"] = float(roc_auc_score(yt, probs[:, 1]))
        else:
            out["auc"] = float(roc_auc_score(yt, probs, multi_class="ovr", labels=list(range(n_classes))))
    except ValueError:  # one class only among the held-out cases
        out["auc"] = math.nan
    return out


def _baseline(train_y: npt.NDArray[np.int64], test_y: npt.NDArray[np.int64]) -> float:
    majority = int(np.argmax(np.bincount(train_y)))
    return float(np.mean(test_y == majority)) if len(test_y) else math.nan


def _runs(items: Sequence[KneeItem], cfg: KneeTrainConfig) -> list[tuple[str, npt.NDArray[np.bool_]]]:
    """(run name, held-out mask) of every cross-validation fold, by patient."""
    if cfg.folds == 0:
        return []
    pids = np.array([it.patient_id for it in items])
    return [
        (f"fold{k + 1}", np.isin(pids, f))
        for k, f in enumerate(patient_folds(list(pids), cfg.folds, cfg.seed))
    ]


def _comparison_rows(report: dict[str, Any], with_weights: bool) -> list[dict[str, Any]]:
    rows = []
    for model, res in report["models"].items():
        cv, ext = res.get("cross_validation", {}), res.get("external", {})
        rows.append(
            {
                "model": model,
                "start": ("site weights" if with_weights else "random weights")
                if MODELS[model][2]
                else "random weights",
                "cv_accuracy": cv.get("accuracy"),
                "cv_accuracy_sd": res.get("fold_accuracy_sd"),
                "cv_recall": cv.get("recall"),
                "cv_precision": cv.get("precision"),
                "cv_f1": cv.get("f1"),
                "cv_auc": cv.get("auc"),
                "cv_baseline": res.get("cv_baseline"),
                "external_accuracy": ext.get("accuracy"),
                "external_auc": ext.get("auc"),
                "external_baseline": res.get("external_baseline"),
                "study_accuracy": STUDY_ACCURACY.get(model),
            }
        )
    return rows


def _fmt(v: Any) -> str:
    return (
        "-"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else f"{v:.3f}"
        if isinstance(v, float)
        else str(v)
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a fixed-width text table (what ``train knee-xray`` prints)."""
    cols = [
        "model",
        "start",
        "cv_accuracy",
        "cv_accuracy_sd",
        "cv_f1",
        "cv_auc",
        "cv_baseline",
        "external_accuracy",
        "external_baseline",
        "study_accuracy",
    ]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.append("study_accuracy: what founding study (e) reported on its own data, quoted, not ours")
    return "\n".join(lines)


def _write_table(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows]
    xs = np.arange(len(rows))
    for off, key, label in (
        (-0.27, "cv_accuracy", "cross-validation"),
        (0.0, "external_accuracy", "external"),
        (0.27, "study_accuracy", "study (e), reported"),
    ):
        vals = [float(r[key]) if r.get(key) is not None else 0.0 for r in rows]
        ax.bar(xs + off, vals, width=0.26, label=label)
    base = [r.get("cv_baseline") for r in rows]
    if base and base[0] is not None:
        ax.axhline(float(base[0]), color="k", linestyle="--", linewidth=1, label="majority-class baseline")
    ax.set_xticks(xs, names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)


def train_knee(cfg: KneeTrainConfig) -> dict[str, Any]:
    """Cross-validate the comparison models, train the final ones, test externally, write the bundle.

    Returns
    -------
    dict
        ``classes``, ``models`` (per model: fold figures, cross-validation, external), ``comparison``
        (the table rows), ``table`` (as printed), ``bundle`` (identification).

    Raises
    ------
    InputError
        Bad CSV, images, weights, or too few patients for the folds.
    """
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if BUNDLE_MODEL not in cfg.models:
        raise InputError(f"the models must include {BUNDLE_MODEL} (it becomes the bundle)")
    items, classes = read_knee_csv(cfg.data)
    ext_items, _ = read_knee_csv(cfg.external, classes) if cfg.external is not None else ([], classes)
    transfer = _load_transfer(cfg)
    train_dir = cfg.out / "training"
    train_dir.mkdir(parents=True, exist_ok=True)
    with _deterministic(cfg.threads):
        x = _load_crops(items, cfg)
        y = np.array([it.label for it in items], dtype=np.int64)
        xe = _load_crops(ext_items, cfg) if ext_items else np.zeros((0, *cfg.size), np.float32)
        ye = np.array([it.label for it in ext_items], dtype=np.int64)
        runs = _runs(items, cfg)
        report: dict[str, Any] = {
            "classes": list(classes),
            "n_development": len(items),
            "n_external": len(ext_items),
            "models": {},
        }
        oof_rows: list[dict[str, Any]] = []
        final_nets: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
        for m_idx, model in enumerate(cfg.models):
            res: dict[str, Any] = {"folds": {}}
            oof = np.zeros((len(items), len(classes)), np.float32)
            base_hits: list[float] = []
            for r_idx, (run, held) in enumerate(runs):
                torch.manual_seed(cfg.seed + 1000 * r_idx)  # same initial weights for a run across repeats
                net, _ = _build(model, len(classes), cfg, transfer)
                _fit(net, x[~held], y[~held], cfg, cfg.seed + 1000 * r_idx + m_idx, f"{model} {run}")
                oof[held] = predict_crops(net, list(x[held]))
                res["folds"][run] = classification_metrics(y[held], oof[held], len(classes))
                base_hits.append(_baseline(y[~held], y[held]) * int(held.sum()))
            if runs:
                res["cross_validation"] = classification_metrics(y, oof, len(classes))
                res["cv_baseline"] = float(sum(base_hits) / len(items))
                res["fold_accuracy_sd"] = float(np.std([f["accuracy"] for f in res["folds"].values()]))
                for i, it in enumerate(items):
                    oof_rows.append(
                        {
                            "model": model,
                            "path": str(it.path),
                            "label": classes[it.label],
                            **{f"p_{c}": float(oof[i, k]) for k, c in enumerate(classes)},
                        }
                    )
            torch.manual_seed(cfg.seed + 1000 * len(runs))
            net, spec = _build(model, len(classes), cfg, transfer)
            _fit(net, x, y, cfg, cfg.seed + 1000 * len(runs) + m_idx, f"{model} final")
            final_nets[model] = (net, spec)
            if ext_items:
                res["external"] = classification_metrics(ye, predict_crops(net, list(xe)), len(classes))
                res["external_baseline"] = _baseline(y, ye)
            report["models"][model] = res
            log.info("knee model %s trained", model)
    rows = _comparison_rows(report, transfer is not None)
    report["comparison"] = rows
    report["table"] = format_table(rows)
    _write_table(train_dir, rows)
    if oof_rows:
        with (train_dir / "oof.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(oof_rows[0]))
            writer.writeheader()
            writer.writerows(oof_rows)
    net, spec = final_nets[BUNDLE_MODEL]
    manifest = _write_knee_bundle(cfg, net, spec, classes, report, len(items))
    report["bundle"] = manifest.identification
    (train_dir / "report.json").write_text(
        json.dumps({"config": _cfg_dict(cfg), **report}, indent=2, default=str) + "\n", encoding="utf-8"
    )
    return report


def knee_input_spec(cfg: KneeTrainConfig) -> bdl.InputSpec:
    """The input spec of a knee bundle: square pixels of ``spacing_mm``, a ``size`` crop, CR or DX."""
    return bdl.InputSpec(
        spacing_mm=(cfg.spacing_mm, cfg.spacing_mm, 1.0),
        intensity_window=(0.0, 1.0),
        patch_size=cfg.size,
        modalities=("CR", "DX"),
        requires_hu=False,
        min_slices=1,
        max_spacing_mm=5.0,
        max_obliquity_deg=90.0,
    )


def _cfg_dict(cfg: KneeTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k in ("data", "out", "external", "weights"):
        d[k] = Path(d[k]).name if d[k] is not None else None  # no machine paths in the bundle
    return d


def _write_knee_bundle(
    cfg: KneeTrainConfig,
    net: nn.Module,
    spec: dict[str, Any],
    classes: Sequence[str],
    report: dict[str, Any],
    n_items: int,
) -> bdl.Manifest:
    res = report["models"][BUNDLE_MODEL]
    transfer = (
        {"file": cfg.weights.name, "sha256": cfg.weights_sha256.strip().lower()}
        if cfg.weights is not None and cfg.weights_sha256
        else None
    )
    extra = {
        "classes": list(classes),
        "cross_validation": res.get("cross_validation"),
        "external_test": res.get("external"),
        "comparison": report["comparison"],
        "transfer_weights": transfer,
        "preprocessing": "left knees mirrored; resampled to square pixels; knee-centred crop; standardised",
    }
    start = (
        f"site weights {transfer['file']} (sha256 {transfer['sha256'][:12]})"
        if transfer
        else "random weights"
    )
    return bdl.write_bundle(
        cfg.out,
        net,
        factory=spec["factory"],
        network_kwargs=spec["kwargs"],
        name=cfg.name or "dicomnode-knee-xray",
        version=cfg.version,
        task="radiograph",
        input_spec=knee_input_spec(cfg),
        output={"units": "probability", "classes": list(classes)},
        intended_use="Research: osteoporosis class of a knee radiograph (CR/DX, AP or PA), method of "
        "founding study (e). Not a diagnosis; a physician reviews every result.",
        training_data=f"{n_items} radiographs from {cfg.data.name}; {cfg.folds}-fold cross-validation by "
        f"patient; started from {start}.",
        description="ResNet-50 classifier of knee radiographs (founding study e), fine-tuned.",
        extra=extra,
        readme_extra="## Comparison (this site's data)\n\n```\n" + report["table"] + "\n```\n",
    )
