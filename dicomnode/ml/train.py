"""``dicomnode train``: k-fold cross-validation by patient, a final model, an external test, a bundle.

Runs, in order: ``fold1`` ... ``foldK`` (each trained on the other folds' patients, scored on its own), then
``final`` (all development data; it becomes the bundle), then the external test set (scored with ``final``).
Folds are split by patient id, never by vertebra or image, so no patient is on both sides. Each run keeps a
checkpoint after every epoch under ``OUT/training/checkpoints``; ``--resume`` continues a killed run from
its last epoch and skips finished runs. Seeds derive from ``--seed`` and the run index.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm

from dicomnode.domain import BoneCategory
from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume
from dicomnode.ml import bundle as bdl
from dicomnode.ml.datasets import (
    LEVEL_CLASSES,
    N_SEG_CLASSES,
    load_image,
    map_labels,
    map_seg_targets,
    read_nifti,
)
from dicomnode.ml.inference import dice_per_level, segment_levels_prepared
from dicomnode.ml.preprocess import Prepared, crop, prepare, resample_to
from dicomnode.vocab import acr_category

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    task: str  # "segmentation", "bmd" or "sagittal-bmd"
    data: Path
    out: Path
    external: Path | None = None
    folds: int = 5
    epochs: int = 20
    batch_size: int = 4
    lr: float = 1e-3
    width: int = 8
    #: crop / patch in voxels: N or (D, H, W); sagittal-bmd: N (rows 2N x columns N) or (rows, columns)
    patch: int | tuple[int, ...] = 64
    spacing_mm: float | None = None
    label_scheme: str = "auto"
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    name: str | None = None
    version: str = "0.1.0"
    progress: bool = True
    #: segmentation: "unet" or "segresnet"
    arch: str = "unet"
    #: crops drawn per case per epoch (segmentation) / per vertebra per epoch (bmd)
    samples_per_case: int = 2
    intensity_normalisation: str = "fat-soft-tissue"
    #: torch CPU threads (None = torch's default). On a busy machine 1 is often fastest: oversubscribed
    #: OpenMP threads spin and wait on each other.
    threads: int | None = None
    #: sagittal-bmd: levels whose reference vBMD is averaged into a series' target (and whose centroids
    #: centre the reformat)
    reference_levels: tuple[str, ...] = ("L1", "L2")
    #: sagittal-bmd: left-right slab (mm) averaged into the mid-sagittal reformat
    slab_mm: float = 5.0
    extra: dict[str, Any] = field(default_factory=dict)

    def patch_size(self) -> tuple[int, int, int]:
        if isinstance(self.patch, int):
            return (self.patch, self.patch, self.patch)
        p = tuple(int(v) for v in self.patch)
        if len(p) != 3:
            raise InputError(f"patch must be one or three sizes, got {self.patch}")
        return (p[0], p[1], p[2])


# ------------------------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class SegItem:
    case_id: str
    patient_id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class BmdItem:
    row_id: str
    patient_id: str
    image: Path
    level: str
    bmd: float
    label: Path | None
    centroid_lps: tuple[float, float, float] | None
    #: trabecular bone score of the row, when the CSV has a ``tbs`` column (sagittal-bmd only)
    tbs: float | None = None


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read CSV: {exc}") from None


def _strip_nii(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_segmentation_dataset(path: Path) -> list[SegItem]:
    """Cases of a segmentation dataset (folder ``images/`` + ``labels/`` [+ ``cases.csv``], or a CSV).

    Parameters
    ----------
    path : Path
        Folder or CSV ``id,patient_id,image,label``.

    Returns
    -------
    list of SegItem
        Sorted by id.
    """
    items: list[SegItem] = []
    if path.is_file():
        for i, r in enumerate(_read_rows(path), start=2):
            for col in ("id", "image", "label"):
                if not r.get(col):
                    raise InputError(f"{path}:{i}: missing {col}")
            items.append(
                SegItem(
                    r["id"],
                    r.get("patient_id") or r["id"],
                    path.parent / r["image"],
                    path.parent / r["label"],
                )
            )
    elif path.is_dir():
        images = sorted((path / "images").glob("*.nii*"))
        if not images:
            raise InputError(f"{path}: no images/*.nii.gz")
        patients: dict[str, str] = {}
        if (path / "cases.csv").is_file():
            patients = {r["id"]: r.get("patient_id") or r["id"] for r in _read_rows(path / "cases.csv")}
        for img in images:
            cid = _strip_nii(img.name)
            lab = next((p for p in (path / "labels").glob(f"{cid}.nii*")), None)
            if lab is None:
                raise InputError(f"{path}: no label for image {img.name}")
            items.append(SegItem(cid, patients.get(cid, cid), img, lab))
    else:
        raise InputError(f"{path}: no such dataset")
    for it in items:
        for p in (it.image, it.label):
            if not p.exists():
                raise InputError(f"{p}: no such file")
    return sorted(items, key=lambda it: it.case_id)


def read_bmd_dataset(path: Path) -> list[BmdItem]:
    """Rows of a bmd dataset CSV (``id,patient_id,image,level,bmd_mg_cm3`` + ``label`` or ``cx,cy,cz``).

    An optional ``tbs`` column (trabecular bone score) is read into :attr:`BmdItem.tbs`.
    """
    if not path.is_file():
        raise InputError(f"{path}: the bmd dataset must be a CSV file")
    out: list[BmdItem] = []
    for i, r in enumerate(_read_rows(path), start=2):
        for col in ("id", "image", "level", "bmd_mg_cm3"):
            if not r.get(col):
                raise InputError(f"{path}:{i}: missing {col}")
        if r["level"] not in LEVEL_CLASSES:
            raise InputError(f"{path}:{i}: level {r['level']!r} not one of {', '.join(LEVEL_CLASSES)}")
        try:
            bmd = float(r["bmd_mg_cm3"])
            cen = (float(r["cx"]), float(r["cy"]), float(r["cz"])) if r.get("cx") else None
            tbs = float(r["tbs"]) if r.get("tbs") else None
        except ValueError as exc:
            raise InputError(f"{path}:{i}: {exc}") from None
        label = path.parent / r["label"] if r.get("label") else None
        if label is None and cen is None:
            raise InputError(f"{path}:{i}: needs a label mask or cx,cy,cz")
        out.append(
            BmdItem(
                r["id"],
                r.get("patient_id") or r["id"],
                path.parent / r["image"],
                r["level"],
                bmd,
                label,
                cen,
                tbs,
            )
        )
    if not out:
        raise InputError(f"{path}: no rows")
    return out


def patient_folds(patient_ids: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Split patients into ``k`` folds (shuffled with ``seed``, sizes differing by at most one).

    Parameters
    ----------
    patient_ids : sequence of str
        Patient ids (duplicates allowed; each patient lands in exactly one fold).
    k : int
        Number of folds (>= 2).
    seed : int
        Shuffle seed.

    Returns
    -------
    list of list of str
        The patients of each fold.
    """
    unique = sorted(set(patient_ids))
    if k < 2:
        raise InputError("cross-validation needs at least 2 folds")
    if len(unique) < k:
        raise InputError(f"{len(unique)} patients cannot be split into {k} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    folds: list[list[str]] = [[] for _ in range(k)]
    for n, idx in enumerate(order):
        folds[n % k].append(unique[int(idx)])
    return [sorted(f) for f in folds]


# ---------------------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    def __init__(self, root: Path) -> None:
        self.root = root / "training" / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"

    def finished(self) -> dict[str, Any]:
        if self.state_path.is_file():
            data: dict[str, Any] = json.loads(self.state_path.read_text())
            return data
        return {}

    def mark_finished(self, run: str, result: dict[str, Any]) -> None:
        state = self.finished()
        state[run] = result
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def path(self, run: str) -> Path:
        return self.root / f"{run}.pt"

    def save(
        self, run: str, epoch: int, net: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator
    ) -> None:
        tmp = self.path(run).with_suffix(".tmp")
        torch.save(
            {
                "epoch": epoch,
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
            },
            tmp,
        )
        tmp.replace(self.path(run))

    def load(self, run: str, net: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator) -> int:
        """Restore a run; returns the next epoch to train (0 when there is no checkpoint)."""
        p = self.path(run)
        if not p.is_file():
            return 0
        ck = torch.load(p, map_location="cpu", weights_only=True)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        return int(ck["epoch"]) + 1


def _fit(
    run: str,
    net: nn.Module,
    cfg: TrainConfig,
    ckpt: _Checkpoints,
    seed: int,
    batches: Callable[[np.random.Generator], list[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[float]:
    """Generic loop: Adam + cosine decay, one checkpoint per epoch, resumable."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    start = ckpt.load(run, net, opt, rng) if cfg.resume else 0
    history: list[float] = []
    bar = tqdm(range(start, cfg.epochs), desc=f"{cfg.task} {run}", disable=not cfg.progress, unit="epoch")
    for epoch in bar:
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        net.train()
        losses = []
        for x, y in batches(rng):
            opt.zero_grad()
            loss = loss_fn(net(x.to(cfg.device)), y.to(cfg.device))
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)) if losses else math.nan)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        ckpt.save(run, epoch, net, opt, rng)
    net.eval()
    return history


# ------------------------------------------------------------------------------------------ segmentation


@dataclass(frozen=True, eq=False)
class _SegCase:
    item: SegItem
    prep: Prepared
    labels_rs: npt.NDArray[np.int64]  # network targets (0/1/2) on the resampled grid
    labels_canonical: npt.NDArray[np.int16]  # level classes on the canonical grid (for Dice)
    fg_index: npt.NDArray[np.int64]  # voxel indices of foreground on the resampled grid


def _seg_spec(cfg: TrainConfig) -> bdl.InputSpec:
    sp = cfg.spacing_mm or 3.0
    return bdl.InputSpec(
        spacing_mm=(sp, sp, sp),
        intensity_window=(-250.0, 1250.0),
        patch_size=cfg.patch_size(),
        intensity_normalisation=cfg.intensity_normalisation,
    )


def _load_seg_case(item: SegItem, spec: bdl.InputSpec, scheme: str) -> _SegCase:
    data, affine = read_nifti(item.image)
    vol = Volume(data=data.astype(np.float32), affine=affine, source=(str(item.image),))
    lab, lab_aff = read_nifti(item.label)
    if lab.shape != data.shape or not np.allclose(lab_aff, affine, atol=1e-3):
        raise InputError(f"{item.label}: label grid differs from its image {item.image.name}")
    levels = map_labels(lab, scheme).astype(np.float32)
    targets = map_seg_targets(lab, scheme).astype(np.float32)
    lev_can = Volume(data=levels, affine=affine).canonical().data.astype(np.int16)
    tgt_can = Volume(data=targets, affine=affine).canonical().data.astype(np.int16)
    prep = prepare(vol, spec.spacing_mm, spec.intensity_window, spec.intensity_normalisation)
    tgt_rs = resample_to(tgt_can, prep.grid, order=0).astype(np.int64)
    return _SegCase(item, prep, tgt_rs, lev_can, np.argwhere(tgt_rs > 0))


def _seg_batches(
    cases: Sequence[_SegCase], cfg: TrainConfig
) -> Callable[[np.random.Generator], list[tuple[torch.Tensor, torch.Tensor]]]:
    size = cfg.patch_size()

    def make(rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        samples = []
        for idx in rng.permutation(len(cases) * cfg.samples_per_case):
            c = cases[int(idx) % len(cases)]
            if len(c.fg_index) and rng.random() < 0.7:  # mostly centred on bone, sometimes anywhere
                centre = c.fg_index[rng.integers(len(c.fg_index))].astype(float)
            else:
                centre = np.array([rng.uniform(0, n) for n in c.labels_rs.shape])
            centre = centre + rng.integers(-size[0] // 4, size[0] // 4 + 1, 3)
            x = crop(c.prep.array, (centre[0], centre[1], centre[2]), size)
            y = crop(c.labels_rs, (centre[0], centre[1], centre[2]), size)
            if rng.random() < 0.5:  # left-right flip keeps the level order
                x, y = x[:, :, ::-1], y[:, :, ::-1]
            x = x * rng.uniform(0.97, 1.03) + rng.uniform(-0.01, 0.01)
            samples.append((np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y)))
        batches = []
        for s in range(0, len(samples), cfg.batch_size):
            chunk = samples[s : s + cfg.batch_size]
            xb = torch.from_numpy(np.stack([c[0] for c in chunk])[:, None])
            yb = torch.from_numpy(np.stack([c[1] for c in chunk])[:, None])
            batches.append((xb, yb))
        return batches

    return make


def _seg_net_args(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    if cfg.arch == "segresnet":
        return "seg_segresnet", {"n_classes": N_SEG_CLASSES, "width": cfg.width}
    # residual units double the cost; the tiny widths used for local training go without them
    return "seg_unet", {
        "n_classes": N_SEG_CLASSES,
        "width": cfg.width,
        "num_res_units": 0 if cfg.width <= 16 else 2,
    }


def _score_seg(
    net: nn.Module, manifest: bdl.Manifest, cases: Sequence[_SegCase], device: str
) -> dict[str, Any]:
    lb = bdl.LoadedBundle(Path("."), manifest, net, device)
    per_case = {}
    for c in cases:
        pred, _ = segment_levels_prepared(lb, c.prep)
        per_case[c.item.case_id] = dice_per_level(c.labels_canonical, pred)
    means = [float(np.mean(list(d.values()))) for d in per_case.values() if d]
    return {"mean_dice": float(np.mean(means)) if means else math.nan, "dice_per_case": per_case}


def _train_segmentation(cfg: TrainConfig) -> dict[str, Any]:
    items = read_segmentation_dataset(cfg.data)
    spec = _seg_spec(cfg)
    bar = tqdm(items, desc="loading", disable=not cfg.progress, unit="case")
    cases = [_load_seg_case(it, spec, cfg.label_scheme) for it in bar]
    ext_cases = []
    if cfg.external is not None:
        ext_cases = [
            _load_seg_case(it, spec, cfg.label_scheme) for it in read_segmentation_dataset(cfg.external)
        ]
    factory, kwargs = _seg_net_args(cfg)
    from monai.losses.dice import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dice_ce(out, y)  # type: ignore[no-any-return]

    from dicomnode.ml.networks import build

    manifest_stub = _stub_manifest(cfg, "segmentation", factory, kwargs, spec, {"units": "class-index"})
    ckpt = _Checkpoints(cfg.out)
    done = ckpt.finished()
    report: dict[str, Any] = {"folds": {}}
    runs = _runs([c.item.patient_id for c in cases], cfg)
    for ridx, (run, val_patients) in enumerate(runs):
        if run in done:
            if run != "final":
                report["folds"][run] = done[run]
            continue
        train_cases = [c for c in cases if c.item.patient_id not in val_patients]
        val_cases = [c for c in cases if c.item.patient_id in val_patients]
        torch.manual_seed(cfg.seed + 1000 * ridx)  # initial weights from the run seed too
        net = build(factory, kwargs)
        t0 = time.monotonic()
        hist = _fit(run, net, cfg, ckpt, cfg.seed + 1000 * ridx, _seg_batches(train_cases, cfg), loss_fn)
        result: dict[str, Any] = {
            "n_train": len(train_cases),
            "n_val": len(val_cases),
            "loss": hist[-1:] or None,
        }
        result["train_seconds"] = round(time.monotonic() - t0, 1)
        if val_cases:
            result.update(_score_seg(net, manifest_stub, val_cases, cfg.device))
        ckpt.mark_finished(run, result)
        if run == "final":
            torch.save(net.state_dict(), ckpt.root / "final_model.pt")
        else:
            report["folds"][run] = result
    final_net = build(factory, kwargs)
    final_net.load_state_dict(torch.load(ckpt.root / "final_model.pt", weights_only=True))
    final_net.eval()
    fold_dice = [f["mean_dice"] for f in report["folds"].values() if "mean_dice" in f]
    report["cv_mean_dice"] = float(np.mean(fold_dice)) if fold_dice else None
    if ext_cases:
        report["external"] = _score_seg(final_net, manifest_stub, ext_cases, cfg.device)
    perf = {
        "cv_mean_dice": report["cv_mean_dice"],
        "external_mean_dice": report.get("external", {}).get("mean_dice"),
    }
    manifest = bdl.write_bundle(
        cfg.out,
        final_net,
        factory=factory,
        network_kwargs=kwargs,
        name=cfg.name or "dicomnode-vertebra-segmentation",
        version=cfg.version,
        task="segmentation",
        input_spec=spec,
        output={
            "units": "class-index",
            "labels": {"0": "background", "1": "vertebral body", "2": "sacrum"},
            "levels": "T11-L5 named by order above the sacrum (dicomnode.ml.inference.label_levels)",
        },
        intended_use=(
            "Research use: segmentation and T11-L5 labelling of vertebral bodies on adult abdominal CT, "
            "as the "
            "first stage of opportunistic vBMD measurement. Not a medical device."
        ),
        training_data=_training_statement(cfg, len(cases), len({c.item.patient_id for c in cases})),
        extra={"performance": perf, "training": _cfg_dict(cfg)},
        readme_extra=_perf_md(perf),
    )
    report["bundle"] = {"path": str(cfg.out), "sha256": manifest.sha256, "name": manifest.name}
    _write_report(cfg, report)
    return _summary(report, manifest)


# ---------------------------------------------------------------------------------------------------- bmd


def _bmd_spec(cfg: TrainConfig) -> bdl.InputSpec:
    sp = cfg.spacing_mm or 2.0
    return bdl.InputSpec(
        spacing_mm=(sp, sp, sp),
        intensity_window=(-200.0, 600.0),
        patch_size=cfg.patch_size(),
        intensity_normalisation=cfg.intensity_normalisation,
    )


#: Extra voxels kept around each training crop for the placement jitter.
_JITTER = 3


@dataclass(frozen=True, eq=False)
class _BmdImage:
    """Per level, a prepared crop of ``patch + 2 * _JITTER`` voxels around the body centroid.

    Only the crops are kept (not the resampled volume), so a few hundred scans fit in memory.
    """

    crops: dict[str, npt.NDArray[np.float32]]


def _load_bmd_images(
    items: Sequence[BmdItem], spec: bdl.InputSpec, scheme: str, progress: bool
) -> dict[Path, _BmdImage]:
    by_image: dict[Path, list[BmdItem]] = defaultdict(list)
    for it in items:
        by_image[it.image].append(it)
    out: dict[Path, _BmdImage] = {}
    big = tuple(int(s) + 2 * _JITTER for s in spec.patch_size)
    for img, rows in tqdm(sorted(by_image.items()), desc="loading", disable=not progress, unit="image"):
        vol = load_image(img)
        prep = prepare(vol, spec.spacing_mm, spec.intensity_window, spec.intensity_normalisation)
        inv = np.linalg.inv(prep.grid.affine)
        crops: dict[str, npt.NDArray[np.float32]] = {}
        masks: dict[Path, npt.NDArray[np.int16]] = {}
        for r in rows:
            if r.centroid_lps is not None:
                lps = np.asarray(r.centroid_lps, float)
            else:
                assert r.label is not None
                if r.label not in masks:
                    lab, _ = read_nifti(r.label)
                    masks[r.label] = (
                        Volume(data=map_labels(lab, scheme).astype(np.float32), affine=vol.affine)
                        .canonical()
                        .data.astype(np.int16)
                    )
                kji = np.argwhere(masks[r.label] == LEVEL_CLASSES[r.level])
                if len(kji) == 0:
                    raise InputError(f"{r.label}: no {r.level} voxels for row {r.row_id}")
                lps = prep.canonical.index_to_lps(kji.mean(axis=0)[::-1])
            ijk = lps @ inv[:3, :3].T + inv[:3, 3]
            crops[r.level] = crop(
                prep.array, (float(ijk[2]), float(ijk[1]), float(ijk[0])), (big[0], big[1], big[2])
            )
        out[img] = _BmdImage(crops)
    return out


def _bmd_batches(
    items: Sequence[BmdItem], images: dict[Path, _BmdImage], cfg: TrainConfig
) -> Callable[[np.random.Generator], list[tuple[torch.Tensor, torch.Tensor]]]:
    size = cfg.patch_size()

    def make(rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = [], []
        for idx in rng.permutation(len(items) * cfg.samples_per_case):
            it = items[int(idx) % len(items)]
            stored = images[it.image].crops[it.level]
            o = rng.integers(0, 2 * _JITTER + 1, 3)  # placement jitter of up to +/- _JITTER voxels
            x = stored[o[0] : o[0] + size[0], o[1] : o[1] + size[1], o[2] : o[2] + size[2]]
            if rng.random() < 0.5:
                x = x[:, :, ::-1]
            xs.append(np.ascontiguousarray(x, np.float32))
            ys.append(it.bmd)
        out = []
        for s in range(0, len(xs), cfg.batch_size):
            out.append(
                (
                    torch.from_numpy(np.stack(xs[s : s + cfg.batch_size])[:, None]),
                    torch.tensor(ys[s : s + cfg.batch_size], dtype=torch.float32)[:, None],
                )
            )
        return out

    return make


def _bmd_net_args(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    full = cfg.width >= 64
    return "densenet121_3d", {
        "out_channels": 1,
        "width": cfg.width,
        "growth_rate": 32 if full else max(4, cfg.width),
        "block_config": [6, 12, 24, 16] if full else [2, 2, 2, 2],
        "output_scale": [100.0],
        "output_offset": [100.0],
    }


def _predict_items(
    net: nn.Module, items: Sequence[BmdItem], images: dict[Path, _BmdImage], device: str
) -> dict[str, float]:
    """Predict each row from the centre of its stored crop (the same voxels inference would crop)."""
    out: dict[str, float] = {}
    for s in range(0, len(items), 64):
        chunk = items[s : s + 64]
        xs = []
        for it in chunk:
            c = images[it.image].crops[it.level]
            j = _JITTER
            xs.append(c[j : c.shape[0] - j, j : c.shape[1] - j, j : c.shape[2] - j])
        with torch.no_grad():
            pred = net(torch.from_numpy(np.stack(xs)[:, None]).to(device)).cpu().numpy()
        out.update({it.row_id: float(pred[i, 0]) for i, it in enumerate(chunk)})
    return out


def _write_pairs(
    path: Path, truth: Sequence[tuple[str, float]], preds: Mapping[str, float]
) -> tuple[Path, Path]:
    """``reference.csv`` (id, vBMD, osteoporosis) and ``predictions.csv`` (id, vBMD) for the evaluation."""
    path.mkdir(parents=True, exist_ok=True)
    ref, pred = path / "reference.csv", path / "predictions.csv"
    with ref.open("w", newline="") as fr, pred.open("w", newline="") as fp:
        wr, wp = csv.writer(fr), csv.writer(fp)
        wr.writerow(["id", "bmd_mg_cm3", "osteoporosis"])
        wp.writerow(["id", "bmd_mg_cm3"])
        for row_id, bmd in truth:
            wr.writerow([row_id, f"{bmd:.4f}", int(acr_category(bmd) is BoneCategory.OSTEOPOROSIS)])
            if row_id in preds:
                wp.writerow([row_id, f"{preds[row_id]:.4f}"])
    return ref, pred


#: The figures of an evaluation kept in the report and the bundle's manifest.
_EVAL_KEYS = ("n", "mae", "rmse", "r2", "auc", "accuracy")


def _evaluate_split(
    cfg: TrainConfig, split: str, truth: Sequence[tuple[str, float]], preds: Mapping[str, float]
) -> tuple[dict[str, Any], str]:
    """Evaluate one split (``cv`` or ``external``) into ``training/evaluation/<split>``: its figures and the
    path of its HTML report."""
    from dicomnode.ml.evaluate import evaluate

    out = cfg.out / "training" / "evaluation" / split
    ref, pred = _write_pairs(out / "inputs", truth, preds)
    doc = evaluate(ref, pred, out, n_boot=200, seed=cfg.seed)
    return {k: doc[k] for k in _EVAL_KEYS}, str(out / "report.html")


def _train_bmd(cfg: TrainConfig) -> dict[str, Any]:
    from dicomnode.ml.networks import build

    items = read_bmd_dataset(cfg.data)
    spec = _bmd_spec(cfg)
    images = _load_bmd_images(items, spec, cfg.label_scheme, cfg.progress)
    ext_items: list[BmdItem] = []
    if cfg.external is not None:
        ext_items = read_bmd_dataset(cfg.external)
        images.update(_load_bmd_images(ext_items, spec, cfg.label_scheme, cfg.progress))
    factory, kwargs = _bmd_net_args(cfg)
    l1 = nn.SmoothL1Loss(beta=5.0)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return l1(out, y)  # type: ignore[no-any-return]

    final_net, folds, oof = _cross_validate(
        cfg,
        items,
        build_net=lambda: build(factory, kwargs),
        batches=lambda train: _bmd_batches(train, images, cfg),
        loss_fn=loss_fn,
        predict=lambda net, val: _predict_items(net, val, images, cfg.device),
        error=lambda preds, it: abs(preds[it.row_id] - it.bmd),
    )
    report: dict[str, Any] = {"folds": folds}
    perf: dict[str, Any] = {}
    if oof:
        perf["cv"], report["cv_evaluation"] = _evaluate_split(
            cfg, "cv", [(i.row_id, i.bmd) for i in items], oof
        )
    if ext_items:
        preds = _predict_items(final_net, ext_items, images, cfg.device)
        truth = [(i.row_id, i.bmd) for i in ext_items]
        perf["external"], report["external_evaluation"] = _evaluate_split(cfg, "external", truth, preds)
        report["external_predictions"] = preds
    report["performance"] = perf
    manifest = bdl.write_bundle(
        cfg.out,
        final_net,
        factory=factory,
        network_kwargs=kwargs,
        name=cfg.name or "dicomnode-vertebra-vbmd",
        version=cfg.version,
        task="bmd",
        input_spec=spec,
        output={
            "units": "mg/cm3",
            "quantity": "trabecular vBMD (CHA-equivalent) of the vertebral body in the crop",
        },
        intended_use=(
            "Research use: per-vertebra trabecular vBMD regression from a crop centred on a segmented "
            "vertebral "
            "body of adult abdominal CT (opportunistic screening). Not a medical device."
        ),
        training_data=_training_statement(cfg, len(items), len({it.patient_id for it in items})),
        extra={"performance": perf, "training": _cfg_dict(cfg)},
        readme_extra=_perf_md(perf),
    )
    report["bundle"] = {"path": str(cfg.out), "sha256": manifest.sha256, "name": manifest.name}
    _write_report(cfg, report)
    return _summary(report, manifest)


# ------------------------------------------------------------------------------------------ sagittal bmd

#: Output channels of a sagittal bundle, in order (``tbs`` only when the training data had it).
SAGITTAL_OUTPUTS = ("vbmd_mg_cm3", "tbs")
#: Affine maps of the outputs into their units (vBMD tens to hundreds of mg/cm3; TBS about 1.0-1.5).
_SAG_SCALE, _SAG_OFFSET = (100.0, 0.1), (100.0, 1.3)
#: Extra pixels kept around each stored reformat for the placement jitter.
_SAG_JITTER = 4
#: Left-right shifts (mm) of the stored planes: a plane a little off the midline still crosses the bodies,
#: and the node's midline (a centroid) is never exact either.
_SAG_LR_OFFSETS = (-2.0, 0.0, 2.0)


@dataclass(frozen=True)
class SagittalItem:
    """One series of a sagittal-bmd dataset: the mean reference vBMD (and TBS) of its reference levels."""

    series_id: str
    patient_id: str
    image: Path
    bmd: float
    tbs: float | None
    rows: tuple[BmdItem, ...]  # the reference-level rows (their masks or centroids centre the reformat)


def sagittal_size(cfg: TrainConfig) -> tuple[int, int]:
    """Reformat size (rows S-I, columns A-P) of ``cfg.patch``: N means 2N x N."""
    if isinstance(cfg.patch, int):
        return (2 * cfg.patch, cfg.patch)
    p = tuple(int(v) for v in cfg.patch)
    if len(p) != 2 or min(p) <= 0:
        raise InputError(f"sagittal-bmd: patch must be N or ROWSxCOLS, got {cfg.patch}")
    return (p[0], p[1])


def read_sagittal_dataset(path: Path, levels: Sequence[str]) -> list[SagittalItem]:
    """Series of a bmd dataset CSV, each with the mean vBMD (and TBS) of its ``levels`` rows.

    A per-series reference (for example a DXA L1-L4 value) is given by repeating it on each of the series'
    reference-level rows.

    Parameters
    ----------
    path : Path
        The bmd dataset CSV (see :func:`read_bmd_dataset`; an optional ``tbs`` column).
    levels : sequence of str
        Reference levels (e.g. L1, L2).

    Returns
    -------
    list of SagittalItem
        One per image, sorted by series id.

    Raises
    ------
    InputError
        Unknown level, a series without a reference-level row, one series under two patient ids.
    """
    bad = [lvl for lvl in levels if lvl not in LEVEL_CLASSES]
    if bad or not levels:
        known = ", ".join(LEVEL_CLASSES)
        raise InputError(f"reference levels {', '.join(bad) or '(none)'} not among {known}")
    by_image: dict[Path, list[BmdItem]] = defaultdict(list)
    for it in read_bmd_dataset(path):
        by_image[it.image].append(it)
    stems = [_strip_nii(img.name) for img in by_image]
    unique = len(set(stems)) == len(stems)
    out: list[SagittalItem] = []
    for img, rows in by_image.items():
        ref = tuple(r for r in rows if r.level in levels)
        if not ref:
            raise InputError(f"{path}: series {img.name} has no row for {', '.join(levels)}")
        patients = {r.patient_id for r in rows}
        if len(patients) != 1:
            raise InputError(f"{path}: series {img.name} appears under {len(patients)} patient ids")
        tbs = [r.tbs for r in ref if r.tbs is not None]
        sid = _strip_nii(img.name) if unique else str(img.relative_to(path.parent))
        out.append(
            SagittalItem(
                sid,
                ref[0].patient_id,
                img,
                float(np.mean([r.bmd for r in ref])),
                float(np.mean(tbs)) if tbs else None,
                ref,
            )
        )
    return sorted(out, key=lambda it: it.series_id)


def _sag_spec(cfg: TrainConfig) -> bdl.InputSpec:
    sp = cfg.spacing_mm or 2.0
    if not cfg.slab_mm > 0:
        raise InputError("sagittal-bmd: --slab must be a positive thickness in mm")
    return bdl.InputSpec(
        spacing_mm=(cfg.slab_mm, sp, sp),
        intensity_window=(-200.0, 600.0),
        patch_size=sagittal_size(cfg),
        intensity_normalisation=cfg.intensity_normalisation,
    )


def _sag_centre(item: SagittalItem, vol: Volume, scheme: str) -> tuple[float, float, float]:
    """Mean vertebral-body centroid (LPS mm) of the reference-level rows: the reformat's centre."""
    points: list[npt.NDArray[np.float64]] = []
    masks: dict[Path, Volume] = {}
    for r in item.rows:
        if r.centroid_lps is not None:
            points.append(np.asarray(r.centroid_lps, float))
            continue
        assert r.label is not None
        if r.label not in masks:
            lab, _ = read_nifti(r.label)
            if lab.shape != vol.shape:
                raise InputError(f"{r.label}: label grid differs from its image {item.image.name}")
            masks[r.label] = Volume(
                data=map_labels(lab, scheme).astype(np.float32), affine=vol.affine
            ).canonical()
        m = masks[r.label]
        kji = np.argwhere(m.data == LEVEL_CLASSES[r.level])
        if len(kji) == 0:
            raise InputError(f"{r.label}: no {r.level} voxels for row {r.row_id}")
        points.append(m.index_to_lps(kji.mean(axis=0)[::-1]))
    c = np.mean(points, axis=0)
    return (float(c[0]), float(c[1]), float(c[2]))


def _load_sagittal(
    items: Sequence[SagittalItem], spec: bdl.InputSpec, scheme: str, progress: bool
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, tuple[float, float, float]]]:
    """Stored reformats (one per left-right offset, ``_SAG_JITTER`` pixels larger) and centres, by series."""
    from dicomnode.ml.preprocess import sagittal_planes

    planes: dict[str, npt.NDArray[np.float32]] = {}
    centres: dict[str, tuple[float, float, float]] = {}
    rows, cols = (int(s) for s in spec.patch_size)
    for it in tqdm(items, desc="reformatting", disable=not progress, unit="series"):
        vol = load_image(it.image)
        centre = _sag_centre(it, vol, scheme)
        planes[it.series_id], _ = sagittal_planes(
            vol,
            centre,
            (rows + 2 * _SAG_JITTER, cols + 2 * _SAG_JITTER),
            spec.spacing_mm[1],
            spec.spacing_mm[0],
            (spec.intensity_window[0], spec.intensity_window[1]),
            spec.intensity_normalisation,
            _SAG_LR_OFFSETS,
        )
        centres[it.series_id] = centre
    return planes, centres


def _sag_targets(it: SagittalItem, with_tbs: bool) -> list[float]:
    return [it.bmd, it.tbs if it.tbs is not None else math.nan] if with_tbs else [it.bmd]


def _sag_batches(
    items: Sequence[SagittalItem],
    planes: dict[str, npt.NDArray[np.float32]],
    cfg: TrainConfig,
    with_tbs: bool,
) -> Callable[[np.random.Generator], list[tuple[torch.Tensor, torch.Tensor]]]:
    rows, cols = sagittal_size(cfg)

    def make(rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = [], []
        for idx in rng.permutation(len(items) * cfg.samples_per_case):
            it = items[int(idx) % len(items)]
            stored = planes[it.series_id]
            k = int(rng.integers(stored.shape[0]))
            o = rng.integers(0, 2 * _SAG_JITTER + 1, 2)  # placement jitter of up to +/- _SAG_JITTER pixels
            xs.append(np.ascontiguousarray(stored[k, o[0] : o[0] + rows, o[1] : o[1] + cols], np.float32))
            ys.append(_sag_targets(it, with_tbs))
        out = []
        for s in range(0, len(xs), cfg.batch_size):
            out.append(
                (
                    torch.from_numpy(np.stack(xs[s : s + cfg.batch_size])[:, None]),
                    torch.tensor(ys[s : s + cfg.batch_size], dtype=torch.float32),
                )
            )
        return out

    return make


def _sag_net_args(cfg: TrainConfig, with_tbs: bool) -> tuple[str, dict[str, Any]]:
    n = 2 if with_tbs else 1
    return "resnet50_2d", {
        "out_channels": n,
        "width": cfg.width,
        "layers": [3, 4, 6, 3],
        "output_scale": list(_SAG_SCALE[:n]),
        "output_offset": list(_SAG_OFFSET[:n]),
    }


def _predict_series(
    net: nn.Module, items: Sequence[SagittalItem], planes: dict[str, npt.NDArray[np.float32]], device: str
) -> dict[str, list[float]]:
    """Predict each series from the centre of its midline plane (the pixels inference reformats)."""
    mid = _SAG_LR_OFFSETS.index(0.0)
    j = _SAG_JITTER
    out: dict[str, list[float]] = {}
    for s in range(0, len(items), 64):
        chunk = items[s : s + 64]
        xs = [planes[it.series_id][mid, j:-j, j:-j] for it in chunk]
        with torch.no_grad():
            pred = net(torch.from_numpy(np.stack(xs)[:, None]).to(device)).cpu().numpy()
        out.update({it.series_id: [float(v) for v in pred[i]] for i, it in enumerate(chunk)})
    return out


def _tbs_metrics(items: Sequence[SagittalItem], preds: dict[str, list[float]]) -> dict[str, Any]:
    pairs = [(it.tbs, preds[it.series_id][1]) for it in items if it.tbs is not None and it.series_id in preds]
    if not pairs:
        return {"n": 0}
    t, p = np.asarray(pairs, float).T
    r = float(np.corrcoef(t, p)[0, 1]) if len(t) > 2 and t.std() > 0 and p.std() > 0 else None
    return {
        "n": len(t),
        "mae": float(np.mean(np.abs(p - t))),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "r": r,
    }


def _train_sagittal(cfg: TrainConfig) -> dict[str, Any]:
    from dicomnode.ml.networks import build

    levels = tuple(cfg.reference_levels)
    items = read_sagittal_dataset(cfg.data, levels)
    ext_items = read_sagittal_dataset(cfg.external, levels) if cfg.external is not None else []
    n_tbs = sum(it.tbs is not None for it in items)
    if 0 < n_tbs < len(items):
        raise InputError(
            f"{cfg.data}: {len(items) - n_tbs} of {len(items)} series have no tbs value; give it for every "
            "series or for none"
        )
    with_tbs = n_tbs == len(items)
    spec = _sag_spec(cfg)
    planes, centres = _load_sagittal(items, spec, cfg.label_scheme, cfg.progress)
    if ext_items:
        if {it.series_id for it in ext_items} & set(planes):
            raise InputError("the external test set repeats series ids of the development set")
        more, ext_centres = _load_sagittal(ext_items, spec, cfg.label_scheme, cfg.progress)
        planes.update(more)
        centres.update(ext_centres)
    factory, kwargs = _sag_net_args(cfg, with_tbs)
    scale = torch.tensor(kwargs["output_scale"], dtype=torch.float32, device=cfg.device)
    l1 = nn.SmoothL1Loss(beta=0.05)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # in output units / scale, so mg/cm3 and TBS weigh alike; series without a TBS value do not count
        ok = torch.isfinite(y)
        return l1((out / scale)[ok], (torch.nan_to_num(y) / scale)[ok])  # type: ignore[no-any-return]

    final_net, folds, oof = _cross_validate(
        cfg,
        items,
        build_net=lambda: build(factory, kwargs),
        batches=lambda train: _sag_batches(train, planes, cfg, with_tbs),
        loss_fn=loss_fn,
        predict=lambda net, val: _predict_series(net, val, planes, cfg.device),
        error=lambda preds, it: abs(preds[it.series_id][0] - it.bmd),
    )
    report: dict[str, Any] = {"folds": folds, "reference_levels": list(levels), "tbs": with_tbs}
    train_mean = float(np.mean([it.bmd for it in items]))
    perf: dict[str, Any] = {}
    if oof:
        vbmd = {sid: v[0] for sid, v in oof.items()}
        truth = [(i.series_id, i.bmd) for i in items]
        perf["cv"], report["cv_evaluation"] = _evaluate_split(cfg, "cv", truth, vbmd)
        if with_tbs:
            perf["cv"]["tbs"] = _tbs_metrics(items, oof)
    if ext_items:
        preds = _predict_series(final_net, ext_items, planes, cfg.device)
        truth = [(i.series_id, i.bmd) for i in ext_items]
        vbmd = {sid: v[0] for sid, v in preds.items()}
        perf["external"], report["external_evaluation"] = _evaluate_split(cfg, "external", truth, vbmd)
        # the figure to beat: what predicting the development set's mean vBMD would score
        perf["external"]["mae_training_mean"] = float(np.mean([abs(train_mean - it.bmd) for it in ext_items]))
        if with_tbs:
            perf["external"]["tbs"] = _tbs_metrics(ext_items, preds)
        report["external_predictions"] = preds
        report["external_centres_lps"] = {it.series_id: centres[it.series_id] for it in ext_items}
    report["performance"] = perf
    outputs = list(SAGITTAL_OUTPUTS[: 2 if with_tbs else 1])
    span = "-".join((levels[0], levels[-1])) if len(levels) > 1 else levels[0]
    manifest = bdl.write_bundle(
        cfg.out,
        final_net,
        factory=factory,
        network_kwargs=kwargs,
        name=cfg.name or "dicomnode-sagittal-vbmd",
        version=cfg.version,
        task="sagittal_bmd_tbs",
        input_spec=spec,
        output={
            "units": "mg/cm3",
            "outputs": outputs,
            "quantity": f"mean trabecular vBMD (CHA-equivalent) of {', '.join(levels)} (output 0)",
            "reference_levels": list(levels),
            "tbs": (
                "output 1: trabecular bone score (unitless), learnt from the dataset's tbs column"
                if with_tbs
                else "not provided: the training data had no TBS reference"
            ),
            "reformat": (
                "mid-sagittal plane through the mean vertebral-body centroid of the reference levels; rows "
                "superior to inferior, columns anterior to posterior; input_spec.spacing_mm = (left-right "
                "slab averaged, row, column) mm; patch_size = (rows, columns)"
            ),
        },
        intended_use=(
            f"Research use: {span} trabecular vBMD regression"
            + (" and trabecular bone score" if with_tbs else "")
            + " from a mid-sagittal reformat of the lumbar spine of adult CT, centred on the vertebral "
            "bodies the node's segmentation found (method of founding study d). Not a medical device."
        ),
        training_data=_training_statement(cfg, len(items), len({it.patient_id for it in items}))
        + f" One target per series: mean reference vBMD of {', '.join(levels)}"
        + ("; TBS from the tbs column." if with_tbs else "; no TBS reference, so no TBS output."),
        extra={"performance": perf, "training": _cfg_dict(cfg)},
        readme_extra=_perf_md(perf),
    )
    report["bundle"] = {"path": str(cfg.out), "sha256": manifest.sha256, "name": manifest.name}
    _write_report(cfg, report)
    return _summary(report, manifest)


# ------------------------------------------------------------------------------------------------ common


_Item = TypeVar("_Item", BmdItem, "SagittalItem")
_Pred = TypeVar("_Pred")
#: Draws one epoch of (input, target) batches with the given random generator.
_Batches = Callable[[np.random.Generator], list[tuple[torch.Tensor, torch.Tensor]]]


def _cross_validate(
    cfg: TrainConfig,
    items: Sequence[_Item],
    *,
    build_net: Callable[[], nn.Module],
    batches: Callable[
        [Sequence[_Item]], Callable[[np.random.Generator], list[tuple[torch.Tensor, torch.Tensor]]]
    ],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    predict: Callable[[nn.Module, Sequence[_Item]], dict[str, _Pred]],
    error: Callable[[dict[str, _Pred], _Item], float],
) -> tuple[nn.Module, dict[str, Any], dict[str, _Pred]]:
    """The k folds (split by patient) and the final run on all items, resumable from the checkpoints.

    Each run is seeded from ``cfg.seed`` and its index; a finished run is taken from its checkpoint record
    instead of being trained again. Returns the final network (loaded, on ``cfg.device``, in eval mode), the
    per-fold records (sizes, last loss, time, validation MAE and predictions) and the out-of-fold predictions.
    """
    ckpt = _Checkpoints(cfg.out)
    done = ckpt.finished()
    folds: dict[str, Any] = {}
    oof: dict[str, _Pred] = {}
    for ridx, (run, val_patients) in enumerate(_runs([it.patient_id for it in items], cfg)):
        val_items = [it for it in items if it.patient_id in val_patients]
        if run in done:
            if run != "final":
                folds[run] = done[run]
                oof.update(done[run].get("predictions", {}))
            continue
        train_items = [it for it in items if it.patient_id not in val_patients]
        torch.manual_seed(cfg.seed + 1000 * ridx)  # initial weights from the run seed too
        net = build_net()
        t0 = time.monotonic()
        hist = _fit(run, net, cfg, ckpt, cfg.seed + 1000 * ridx, batches(train_items), loss_fn)
        result: dict[str, Any] = {
            "n_train": len(train_items),
            "n_val": len(val_items),
            "loss": hist[-1:] or None,
            "train_seconds": round(time.monotonic() - t0, 1),
        }
        if val_items:
            preds = predict(net, val_items)
            result["mae"] = float(np.mean([error(preds, it) for it in val_items]))
            result["predictions"] = preds
            oof.update(preds)
        ckpt.mark_finished(run, result)
        if run == "final":
            torch.save(net.state_dict(), ckpt.root / "final_model.pt")
        else:
            folds[run] = result
    final_net = build_net()
    final_net.load_state_dict(torch.load(ckpt.root / "final_model.pt", weights_only=True))
    final_net.to(cfg.device)
    final_net.eval()
    return final_net, folds, oof


def _runs(patient_ids: Sequence[str], cfg: TrainConfig) -> list[tuple[str, set[str]]]:
    runs: list[tuple[str, set[str]]] = []
    if cfg.folds and cfg.folds >= 2:
        for i, fold in enumerate(patient_folds(patient_ids, cfg.folds, cfg.seed), start=1):
            runs.append((f"fold{i}", set(fold)))
    runs.append(("final", set()))
    return runs


def _stub_manifest(
    cfg: TrainConfig,
    task: str,
    factory: str,
    kwargs: dict[str, Any],
    spec: bdl.InputSpec,
    output: dict[str, Any],
) -> bdl.Manifest:
    return bdl.Manifest(
        cfg.name or task, cfg.version, task, factory, kwargs, "", "0" * 64, spec, output, "", ""
    )


def _training_statement(cfg: TrainConfig, n_items: int, n_patients: int) -> str:
    ext = f"; external test set {cfg.external.name}" if cfg.external else ""
    return (
        f"Trained locally with dicomnode train on {n_items} items from {n_patients} patients "
        f"(dataset {cfg.data.name}{ext}); {cfg.folds}-fold cross-validation split by patient; "
        f"seed {cfg.seed}."
    )


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k in ("data", "out", "external"):
        d[k] = Path(d[k]).name if d[k] is not None else None  # no paths of this machine in the bundle
    return d


def _perf_md(perf: dict[str, Any]) -> str:
    return "## Performance (from training)\n\n```json\n" + json.dumps(perf, indent=2) + "\n```"


def _write_report(cfg: TrainConfig, report: dict[str, Any]) -> None:
    p = cfg.out / "training" / "report.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _summary(report: dict[str, Any], manifest: bdl.Manifest) -> dict[str, Any]:
    keep = {k: v for k, v in report.items() if k not in ("folds", "external_predictions")}
    keep["folds"] = {
        k: {kk: vv for kk, vv in v.items() if kk not in ("predictions", "dice_per_case")}
        for k, v in report.get("folds", {}).items()
    }
    if isinstance(keep.get("external"), dict):
        keep["external"] = {k: v for k, v in keep["external"].items() if k != "dice_per_case"}
    keep["identification"] = manifest.identification
    return keep


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.task`` and write the bundle (plus ``training/`` with checkpoints, report, evaluation).

    Parameters
    ----------
    cfg : TrainConfig
        Settings (see ``dicomnode train --help``).

    Returns
    -------
    dict
        Summary: per-fold figures, cross-validation and external results, bundle identification.

    Raises
    ------
    InputError
        Unreadable dataset, too few patients for the folds, CUDA requested but absent.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available")
    if cfg.task not in ("segmentation", "bmd", "sagittal-bmd"):
        raise InputError(f"unknown task {cfg.task!r}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and (cfg.out / "training" / "checkpoints" / "state.json").exists():
        raise InputError(f"{cfg.out}: holds an earlier training run; use --resume or a new --out")
    with _deterministic(cfg.threads):
        if cfg.task == "segmentation":
            return _train_segmentation(cfg)
        if cfg.task == "sagittal-bmd":
            return _train_sagittal(cfg)
        return _train_bmd(cfg)


@contextlib.contextmanager
def _deterministic(threads: int | None) -> Iterator[None]:
    """Run training with deterministic kernels and a fixed thread count, then restore torch's settings.

    Seeds (weights, batch order, augmentation) already derive from ``cfg.seed``; what is left to chance on
    the CPU is the order of floating-point reductions, which depends on the kernel chosen and on how the
    work is split over threads. ``torch.use_deterministic_algorithms`` picks deterministic kernels (with a
    warning where an operation has none) and a fixed ``threads`` fixes the split, so the same data, seed and
    thread count give the same weights on the same software. Another CPU (other vector instructions) may
    still round differently: tests must not rely on one case's value (see ``tests/integration/test_ml_*``).
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)
