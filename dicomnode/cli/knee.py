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


def add_analyze_arguments(p: Any) -> None:
    """``analyze --knee-bundle``: knee radiographs among the input go to the knee-xray pipeline."""
    p.add_argument(
        "--knee-bundle",
        type=Path,
        default=None,
        help="knee radiographs (CR/DX routed to knee-xray) are classified with this bundle (default: the "
        "config's analysis.knee_bundle; without one: 'no model configured')",
    )


def _radiograph_series(path: Path) -> dict[str, list[Any]]:
    """Headers of the CR/DX files under ``path``, by series (empty when there are none)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    by_series: dict[str, list[Any]] = {}
    others = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (OSError, InvalidDicomError, EOFError, ValueError):
            continue
        if str(ds.get("Modality", "")).upper() in ("CR", "DX"):
            by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
        else:
            others += 1
            if others >= 5 and not by_series:
                return {}  # a CT (or other) folder: the CT path reads it; no second scan of every header
    return by_series


def maybe_analyze_knee(args: argparse.Namespace, select: Any) -> int | None:
    """For ``dicomnode analyze``: when routing sends a radiograph series of the input to the knee-xray
    pipeline, analyse it (exit 0 ok, 2 not qualifying, 1 failed) and print the class; None otherwise (the
    CT path goes on)."""
    from dicomnode.domain import AnalysisStatus
    from dicomnode.imaging.headers import summarize
    from dicomnode.pipeline.knee import KNEE_PIPELINE, analyze_knee

    if args.input.suffix in (".nii", ".gz"):
        return None
    series = _radiograph_series(args.input)
    if not series:
        return None
    every = list(select([summarize(v, uid) for uid, v in series.items()]))
    knee = [d for d in every if d.selected and d.pipeline == KNEE_PIPELINE]
    if not knee:
        if any(d.selected for d in every):
            return None
        # radiographs only, none a knee: say so with the knee rule's failed conditions, not the CT rule's
        why = [r for d in every for r in d.reasons if r.startswith("knee-radiograph:") and "FAIL" in r]
        modality = str(next(iter(series.values()))[0].get("Modality", ""))
        text = "; ".join(why[:2]) or "no routing rule analyses it"
        print(
            f"dicomnode analyze: not qualifying: {modality} radiograph, not a knee: {text}", file=sys.stderr
        )
        return 2
    bundle = args.knee_bundle
    if bundle is None and getattr(args, "config", None) is not None:
        from dicomnode.config import load_settings

        bundle = load_settings(args.config).analysis.knee_bundle
    d = knee[0]
    outcome = analyze_knee(
        args.input,
        args.out,
        bundle_path=str(bundle) if bundle else None,
        series_instance_uid=d.series_instance_uid,
        selection=(f"rule {d.rule}", *d.reasons),
        job_key=args.job_key,
        version=args.output_version,
        disclaimer=args.disclaimer,
    )
    print(f"series {d.series_instance_uid}: rule {d.rule} (knee-xray)")
    if outcome.status is AnalysisStatus.OK:
        k = outcome.result_json["knee"]
        print(f"knee radiograph: {k['class']} (p = {k['probability']:.2f}); {k['bundle']}")
        print(f"written to {args.out}: result.json, sr.dcm, 1 secondary capture, 1 PNG")
        return 0
    label = "not qualifying" if outcome.status is AnalysisStatus.NOT_QUALIFYING else "failed"
    print(f"dicomnode analyze: {label}: {outcome.reason}", file=sys.stderr)
    return 2 if outcome.status is AnalysisStatus.NOT_QUALIFYING else 1
