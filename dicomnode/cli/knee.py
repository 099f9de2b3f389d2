"""``dicomnode train knee-xray`` (founding study e): the options only it takes, and its handler."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomnodeError


def add_arguments(tr: Any) -> None:
    """Options of ``train knee-xray`` that the other tasks do not take."""
    tr.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="knee-xray: state_dict the site supplies to start ResNet-50 from (never downloaded)",
    )
    tr.add_argument("--weights-sha256", default=None, help="knee-xray: the expected SHA-256 of --weights")
    tr.add_argument(
        "--models",
        default=None,
        help="knee-xray: comma-separated subset of resnet50-finetuned,resnet50-frozen,resnet18,vgg16,cnn3 "
        "(default: all, the study's comparison)",
    )


def run_train_knee(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode train knee-xray``: prints the comparison table, then a JSON summary."""
    from dicomnode.ml.knee_train import MODELS, KneeTrainConfig, train_knee

    patch = args.patch if args.patch is not None else 224
    size = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if len(size) != 2:
        print("dicomnode train: --patch for knee-xray must be N or ROWSxCOLS", file=sys.stderr)
        return 1
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else tuple(MODELS)
    cfg = KneeTrainConfig(
        data=args.data,
        out=args.out,
        external=args.external,
        folds=args.folds,
        epochs=args.epochs if args.epochs is not None else 30,
        batch_size=args.batch_size if args.batch_size is not None else 16,
        lr=args.lr,
        width=args.width if args.width is not None else 64,
        size=(int(size[0]), int(size[1])),
        spacing_mm=args.spacing if args.spacing is not None else 0.6,
        models=models,
        weights=args.weights,
        weights_sha256=args.weights_sha256,
        seed=args.seed,
        threads=args.threads,
        name=args.name,
        version=args.bundle_version,
        progress=not args.no_progress,
    )
    if args.data.suffix.lower() != ".csv":
        print("dicomnode train: knee-xray --data must be a CSV of path,label[,patient_id]", file=sys.stderr)
        return 1
    try:
        report = train_knee(cfg)
    except DicomnodeError as exc:
        print(f"dicomnode train: {exc}", file=sys.stderr)
        return 1
    print(report["table"])
    print(f"comparison: {args.out / 'training' / 'comparison.csv'} and comparison.png")
    summary = {
        "classes": report["classes"],
        "bundle": report["bundle"],
        "cross_validation": report["models"]["resnet50-finetuned"].get("cross_validation"),
        "external": report["models"]["resnet50-finetuned"].get("external"),
    }
    print(json.dumps(summary, indent=2))
    return 0
