"""``dicomnode demo --out DIR``: make a phantom CT study, analyze it, and say where to look.

What ``./setup.sh`` runs at the end: no PACS and no real data needed. The study holds a localizer, a thick
bone-kernel series and a soft-kernel series (the one the node should pick); the phantom's true trabecular
vBMD per level is in ``DIR/phantom/truth.json`` for comparison with ``DIR/analysis/result.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from dicomnode.domain import AnalysisStatus
from dicomnode.errors import DicomnodeError

log = logging.getLogger(__name__)

#: True trabecular vBMD (mg/cm3) per level of the demo phantom: an osteopenic lumbar spine.
DEMO_BMD = {"T11": 118.0, "T12": 112.0, "L1": 96.0, "L2": 101.0, "L3": 106.0, "L4": 110.0, "L5": 114.0}


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="make a phantom CT study, analyze it and write SR, overlays and result.json",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    p.add_argument("--matrix", type=int, default=320, help="phantom matrix (default 320, faster than 512)")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode demo``."""
    verbose = int(getattr(args, "verbose", 0) or 0)
    out: Path = args.out
    t0 = time.perf_counter()
    try:
        from dicomnode.imaging.writer import write_study
        from dicomnode.phantom import PhantomSpec, make_phantom

        fov_mm = 360.0
        spec = PhantomSpec(
            matrix=args.matrix,
            spacing_mm=fov_mm / args.matrix,
            thickness_mm=1.0,
            z_levels=("T10", "S1"),
            bmd=DEMO_BMD,
            seed=args.seed,
        )
        phantom = make_phantom(spec)
        study = out / "phantom"
        study.mkdir(parents=True, exist_ok=True)
        write_study(
            phantom.volume,
            study / "study",
            header={
                "PatientName": "Demo^Phantom",
                "PatientID": "DEMO-0001",
                "StudyDescription": "CT ABDOMEN",
            },
        )
        (study / "truth.json").write_text(json.dumps(phantom.truth.as_dict(), indent=1), encoding="utf-8")
    except (DicomnodeError, ImportError) as exc:
        print(f"dicomnode demo: cannot make the phantom study: {exc}", file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    print(f"phantom study written to {study / 'study'} ({time.perf_counter() - t0:.1f} s)")

    from dicomnode.cli.analyze import print_result
    from dicomnode.pipeline.analyze import analyze_path

    run_ = analyze_path(study / "study", out / "analysis", job_key="dicomnode-demo")
    if run_.result.status is not AnalysisStatus.OK:
        if run_.error is not None and verbose >= 2:
            import traceback

            traceback.print_exception(run_.error)
        print(f"dicomnode demo: analysis {run_.result.status.value}: {run_.result.reason}", file=sys.stderr)
        return 1
    print(f"analysed in {time.perf_counter() - t1:.1f} s; series chosen: {run_.result.series_selection[0]}\n")
    print_result(run_.result, sys.stdout)
    truth = ", ".join(f"{lv} {v:g}" for lv, v in DEMO_BMD.items())
    print(f"\nphantom truth (mg/cm3): {truth}")
    analysis = out / "analysis"
    print("\nwhere to look:")
    for what, path in (
        ("numbers (schema: docs/conformance.md)", analysis / "result.json"),
        ("sagittal overview (PNG)", analysis / "overlay_00_overview.png"),
        ("one axial overlay per vertebra", analysis / "overlay_NN_<level>.png"),
        ("TID 1500 SR (read it with dsrdump)", analysis / "sr.dcm"),
        ("overlays as DICOM secondary captures", analysis / "sc_*.dcm"),
        ("what the phantom really contains", study / "truth.json"),
    ):
        print(f"  {what:<40} {path}")
    return 0
