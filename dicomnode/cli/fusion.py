"""``dicomnode train fusion`` and ``dicomnode evaluate --fusion`` (founding study a): image model, lab
models and their late fusion side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomnodeError


def add_train_arguments(tr: Any) -> None:
    """Options of ``train fusion`` that the other tasks do not take."""
    tr.add_argument(
        "--labs", type=Path, default=None, help="fusion: lab CSV patient_id,date,loinc,value,unit"
    )
    tr.add_argument(
        "--labs-window", type=int, default=90, help="fusion: days between study and lab sample (default 90)"
    )
    tr.add_argument(
        "--image-input",
        choices=("knee-probability", "ct-vbmd", "ct-model-vbmd", "other"),
        default="knee-probability",
        help="fusion: what image_score is; the node applies a knee-probability bundle to knee radiographs "
        "(default), a ct-vbmd one (minus the calibrated-ROI L1-L2 vBMD) or a ct-model-vbmd one (minus the "
        "bmd bundle's L1-L2 vBMD) to CT jobs, and never applies an 'other' one",
    )
    _image_results_argument(tr)
    tr.add_argument(
        "--missing",
        choices=("decline", "impute"),
        default="decline",
        help="fusion: without every lab value the fused model declines and the image model answers "
        "(decline, default), or the training median is used (impute)",
    )


def _image_results_argument(parser: Any) -> None:
    parser.add_argument(
        "--image-results",
        type=Path,
        default=None,
        help="fusion with --image-input ct-vbmd/ct-model-vbmd: a folder of the CT analyses' result.json "
        "files (dicomnode analyze --out DIR/<case>, with the bmd bundle as --backend for ct-model-vbmd); "
        "the CSV then has patient_id,date,label and study_instance_uid or accession_number instead of "
        "image_score, and each score is read from the study's result.json as the node reads its own",
    )


def add_evaluate_arguments(ev: Any) -> None:
    """``evaluate --fusion BUNDLE --labs CSV``: the three-way comparison on a site's own data."""
    ev.add_argument(
        "--fusion",
        type=Path,
        default=None,
        help="a fusion bundle: --reference is then a CSV patient_id,date,label,image_score and --labs the "
        "lab CSV; prints image-only, labs-only and fused side by side",
    )
    ev.add_argument("--labs", type=Path, default=None, help="with --fusion: lab CSV")
    _image_results_argument(ev)


def run_train_fusion(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode train fusion``."""
    from dicomnode.ml.fusion import FusionConfig, train_fusion

    if args.labs is None:
        print("dicomnode train: fusion needs --labs (CSV patient_id,date,loinc,value,unit)", file=sys.stderr)
        return 1
    cfg = FusionConfig(
        data=args.data,
        labs=args.labs,
        out=args.out,
        external=args.external,
        folds=args.folds,
        seed=args.seed,
        window_days=args.labs_window,
        missing=args.missing,
        image_input=args.image_input,
        image_results=args.image_results,
        name=args.name or "dicomnode-fusion",
        version=args.bundle_version,
    )
    try:
        report = train_fusion(cfg)
    except DicomnodeError as exc:
        print(f"dicomnode train: {exc}", file=sys.stderr)
        return 1
    print(report["table"])
    print(
        json.dumps(
            {
                "bundle": report["bundle"],
                "patients_with_missing_labs": report["patients_with_missing_labs"],
                "missing_policy": report["missing_policy"],
                "image_input": report["image_input"],
                "rows_left_out": report["rows_left_out"],
                "rows_left_out_first": report["rows_left_out_first"],
            }
        )
    )
    return 0


def run_evaluate_fusion(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode evaluate --fusion``: writes ``three_way.json`` into ``--out``."""
    import numpy as np

    from dicomnode.ml.fusion import (
        FusionConfig,
        _features,
        format_three_way,
        load_fusion_bundle,
        predict_fusion,
        read_fusion_rows,
        three_way,
    )

    if args.labs is None:
        print("dicomnode evaluate: --fusion needs --labs", file=sys.stderr)
        return 1
    try:
        bundle = load_fusion_bundle(args.fusion)
        rows, left_out = read_fusion_rows(args.reference, args.image_results, bundle.image_input)
        cfg = FusionConfig(
            data=args.reference,
            labs=args.labs,
            out=args.out,
            window_days=bundle.window_days,
            missing=bundle.missing,
            analytes=bundle.analytes,
        )
        img, labs, y = _features(rows, args.labs, cfg)
        metrics = three_way(y, predict_fusion(bundle.params, img, labs, bundle.missing))
    except DicomnodeError as exc:
        print(f"dicomnode evaluate: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "bundle": bundle.identification,
        "n": len(rows),
        "missing_labs": int(np.isnan(labs).any(axis=1).sum()),
        "rows_left_out": len(left_out),
        "metrics": metrics,
    }
    (args.out / "three_way.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(format_three_way(metrics, f"{bundle.identification} on {args.reference.name}"))
    print(f"report: {args.out / 'three_way.json'}")
    return 0
