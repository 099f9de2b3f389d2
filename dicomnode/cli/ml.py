"""``dicomnode evaluate`` and ``dicomnode train``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomnodeError


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` and ``train`` sub-commands."""
    ev = subparsers.add_parser(
        "evaluate",
        help="compare predicted vBMD with a reference standard (metrics.json, plots, report.html)",
        description="Compare predicted vBMD (CSV id,bmd_mg_cm3 or a folder of result.json) with a reference "
        "CSV id,bmd_mg_cm3,osteoporosis.",
    )
    ev.add_argument("--reference", required=True, type=Path, help="CSV id,bmd_mg_cm3,osteoporosis")
    ev.add_argument(
        "--predictions", type=Path, default=None, help="CSV id,bmd_mg_cm3 or folder of result.json"
    )
    ev.add_argument("--out", required=True, type=Path, help="output folder")
    ev.add_argument(
        "--threshold", type=float, default=80.0, help="predicted vBMD below this = positive (mg/cm3)"
    )
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95 %% CIs")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    from dicomnode.cli import fusion as fusion_cli

    fusion_cli.add_evaluate_arguments(ev)
    ev.set_defaults(handler=run_evaluate)

    tr = subparsers.add_parser(
        "train",
        help="train a network on local data and write a model bundle",
        description="Train TASK (segmentation, bmd, or sagittal-bmd: a 2D ResNet-50 on mid-sagittal "
        "reformats regressing the L1-L2 vBMD of a series, plus TBS when the CSV has a tbs column) with "
        "k-fold cross-validation by patient and write a MONAI-layout bundle with a checksummed manifest. "
        "Defaults below are given as segmentation / bmd / sagittal-bmd.",
    )
    tr.add_argument("task", choices=("segmentation", "bmd", "sagittal-bmd", "knee-xray", "fusion"))
    tr.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset folder (images/, labels/) or CSV (bmd, sagittal-bmd)",
    )
    tr.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    tr.add_argument("--external", type=Path, default=None, help="optional external test set (same layout)")
    tr.add_argument("--folds", type=int, default=5, help="k of k-fold cross-validation by patient (0 = none)")
    tr.add_argument("--epochs", type=int, default=None, help="epochs per run (default 150 / 40 / 40)")
    tr.add_argument("--batch-size", type=int, default=None, help="default 4 / 16 / 16")
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument(
        "--width",
        type=int,
        default=None,
        help="network width, first-layer channels (default 16 / 8 / 16; 64 = DenseNet-121 / ResNet-50)",
    )
    tr.add_argument(
        "--patch",
        type=_patch,
        default=None,
        help="patch / crop size in voxels: N or DxHxW (default 48 / 32); sagittal-bmd: reformat ROWSxCOLS "
        "(S-I x A-P) or N for 2N x N (default 128x64)",
    )
    tr.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="resample to this isotropic spacing in mm (default 3 / 2); sagittal-bmd: reformat pixel "
        "size (default 2)",
    )
    tr.add_argument(
        "--slab",
        type=float,
        default=5.0,
        help="sagittal-bmd: left-right slab averaged into the reformat (mm)",
    )
    tr.add_argument(
        "--reference-levels",
        type=_levels,
        default=("L1", "L2"),
        help="sagittal-bmd: levels whose reference vBMD (and TBS) rows are averaged per series and whose "
        "centroids centre the reformat (default L1,L2)",
    )
    tr.add_argument("--arch", choices=("unet", "segresnet"), default="unet", help="segmentation network")
    tr.add_argument(
        "--samples-per-case", type=int, default=None, help="crops per case per epoch (default 4 / 2 / 8)"
    )
    tr.add_argument(
        "--label-scheme",
        choices=("auto", "totalseg", "verse", "dicomnode"),
        default="auto",
        help="label ids of the masks (TotalSegmentator v2 L1=31, VerSe L1=20, dicomnode 1..7 = T11..L5)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    tr.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    tr.add_argument("--name", default=None, help="bundle name (default: dicomnode-TASK)")
    tr.add_argument("--version-tag", dest="bundle_version", default="0.1.0", help="bundle version")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    from dicomnode.cli import fusion, knee

    knee.add_arguments(tr)
    fusion.add_train_arguments(tr)
    tr.set_defaults(handler=run_train)


def _patch(text: str) -> int | tuple[int, ...]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"patch must be N, ROWSxCOLS or DxHxW, got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) not in (2, 3) or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"patch must be N, ROWSxCOLS or DxHxW, got {text!r}")
    return tuple(sizes)


def _levels(text: str) -> tuple[str, ...]:
    from dicomnode.domain import REPORTED_LEVELS

    levels = tuple(p.strip().upper() for p in text.split(",") if p.strip())
    bad = [lvl for lvl in levels if lvl not in REPORTED_LEVELS]
    if not levels or bad:
        raise argparse.ArgumentTypeError(
            f"levels must be a comma-separated list of {', '.join(REPORTED_LEVELS)}, got {text!r}"
        )
    return levels


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode evaluate``."""
    if args.fusion is not None:
        from dicomnode.cli.fusion import run_evaluate_fusion

        return run_evaluate_fusion(args)
    if args.predictions is None:
        print(
            "dicomnode evaluate: --predictions is required (or --fusion BUNDLE --labs CSV)", file=sys.stderr
        )
        return 1
    from dicomnode.ml.evaluate import evaluate

    try:
        doc = evaluate(args.reference, args.predictions, args.out, args.threshold, args.bootstrap, args.seed)
    except DicomnodeError as exc:
        print(f"dicomnode evaluate: {exc}", file=sys.stderr)
        return 1
    summary = {k: doc[k] for k in ("n", "mae", "rmse", "r2", "auc", "sensitivity", "specificity")}
    print(json.dumps(summary))
    for key in ("missing_predictions", "unmatched_predictions", "predictions_without_value"):
        if doc[key]:
            print(
                f"{key}: {len(doc[key])} ({', '.join(map(str, doc[key][:10]))}"
                f"{' ...' if len(doc[key]) > 10 else ''})"
            )
    print(f"report: {args.out / 'report.html'}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode train``."""
    if args.task == "knee-xray":
        from dicomnode.cli.knee import run_train_knee

        return run_train_knee(args)
    if args.task == "fusion":
        from dicomnode.cli.fusion import run_train_fusion

        return run_train_fusion(args)
    from dicomnode.ml.train import TrainConfig, train

    seg = args.task == "segmentation"
    sag = args.task == "sagittal-bmd"
    patch = args.patch if args.patch is not None else (48 if seg else (128, 64) if sag else 32)
    if isinstance(patch, tuple) and len(patch) != (2 if sag else 3):
        want = "N or ROWSxCOLS" if sag else "N or DxHxW"
        print(f"dicomnode train: --patch for {args.task} must be {want}", file=sys.stderr)
        return 1
    cfg = TrainConfig(
        task=args.task,
        data=args.data,
        out=args.out,
        external=args.external,
        folds=args.folds,
        epochs=args.epochs if args.epochs is not None else (150 if seg else 40),
        batch_size=args.batch_size if args.batch_size is not None else (4 if seg else 16),
        lr=args.lr,
        width=args.width if args.width is not None else (8 if not (seg or sag) else 16),
        patch=patch,
        arch=args.arch,
        samples_per_case=args.samples_per_case
        if args.samples_per_case is not None
        else (4 if seg else 8 if sag else 2),
        spacing_mm=args.spacing,
        label_scheme=args.label_scheme,
        reference_levels=args.reference_levels,
        slab_mm=args.slab,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        resume=args.resume,
        name=args.name,
        version=args.bundle_version,
        progress=not args.no_progress,
    )
    try:
        summary = train(cfg)
    except DicomnodeError as exc:
        print(f"dicomnode train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
