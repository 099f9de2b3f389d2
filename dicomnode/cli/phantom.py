"""``dicomnode phantom``: write a synthetic abdominal CT (DICOM) with its ground truth (``truth.json``).

Examples::

    dicomnode phantom --out ph --matrix 512 --spacing 0.7 --thickness 1 --bmd L1=75,L2=80
    dicomnode phantom --out ph --z-range T12:L3 --orientation FFS --contrast portal_venous --ribs 13
    dicomnode phantom --out ph --study          # localizer + 5 mm bone + 3 mm soft series in one study
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomnodeError, InputError

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "rle": "1.2.840.10008.1.2.5",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "j2k": "1.2.840.10008.1.2.4.90",
}


def register(subparsers: Any) -> None:
    """Add the ``phantom`` sub-command."""
    p = subparsers.add_parser(
        "phantom",
        help="write a synthetic abdominal CT with known truth",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--matrix", type=int, default=512, help="rows = columns (default 512)")
    p.add_argument("--spacing", type=float, default=0.7, help="pixel spacing mm (default 0.7)")
    p.add_argument("--thickness", type=float, default=1.0, help="slice thickness mm (default 1.0)")
    p.add_argument("--slice-spacing", type=float, default=None, help="slice spacing mm (default: thickness)")
    p.add_argument("--slices", type=int, default=None, help="number of slices (centred on the z-range)")
    p.add_argument(
        "--z-range",
        default="T10:S1",
        help="LEVEL:LEVEL (e.g. T12:L3; S1 includes the pelvis) or ZMIN:ZMAX in mm, negative values as "
        "--z-range=-300:-200 (default T10:S1)",
    )
    p.add_argument("--orientation", default="HFS", help="HFS, FFS, HFP/PRONE or FFP (default HFS)")
    p.add_argument("--flip-rows", action="store_true", help="reverse the row order")
    p.add_argument("--flip-cols", action="store_true", help="reverse the column order")
    p.add_argument("--bmd", default="", help="per-level trabecular vBMD mg/cm3, e.g. L1=95,L2=100")
    p.add_argument("--bmd-all", type=float, default=None, help="the same vBMD (mg/cm3) for every level")
    p.add_argument("--ribs", type=int, default=12, choices=(11, 12, 13), help="rib pairs (default 12)")
    p.add_argument("--contrast", default="native", choices=("native", "arterial", "portal_venous"))
    p.add_argument("--noise", type=float, default=10.0, help="Gaussian noise SD in HU (default 10)")
    p.add_argument(
        "--noise-fwhm", type=float, default=0.0, help="noise correlation FWHM mm (default 0: white)"
    )
    p.add_argument("--texture", type=float, default=0.0, help="trabecular texture SD in HU (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kvp", type=float, default=120.0)
    p.add_argument("--gain", type=float, default=None, help="scanner map gain (default: drawn with the seed)")
    p.add_argument("--offset", type=float, default=None, help="scanner map offset HU (default: drawn)")
    p.add_argument("--curvature", type=float, default=1.0, help="0 = straight spine, 1 = typical curves")
    p.add_argument(
        "--fracture", action="append", default=[], help="LEVEL:FRACTION anterior height loss, e.g. L2:0.3"
    )
    p.add_argument("--no-table", action="store_true", help="no patient table")
    p.add_argument("--kernel", default="STANDARD", help="ConvolutionKernel written (default STANDARD)")
    p.add_argument("--transfer-syntax", default="explicit", choices=sorted(TRANSFER_SYNTAXES))
    p.add_argument("--study", action="store_true", help="write localizer + thick bone + 3 mm soft series")
    p.add_argument("--labels", action="store_true", help="also write truth_labels.nii.gz (body labels)")
    p.add_argument("--header", action="append", default=[], help="KEYWORD=VALUE DICOM header override")
    p.set_defaults(handler=run)


def _parse_levels(text: str, sep: str, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if sep not in item:
            raise InputError(f"{what}: expected LEVEL{sep}VALUE, got {item!r}")
        lv, val = item.split(sep, 1)
        try:
            out[lv.strip().upper()] = float(val)
        except ValueError:
            raise InputError(f"{what}: {val!r} is not a number") from None
    return out


def _parse_z(text: str) -> tuple[tuple[str, str] | None, tuple[float, float] | None]:
    parts = text.split(":")
    if len(parts) != 2:
        raise InputError(f"--z-range: expected A:B, got {text!r}")
    try:
        return None, (float(parts[0]), float(parts[1]))
    except ValueError:
        return (parts[0].strip().upper(), parts[1].strip().upper()), None


def build_spec(args: argparse.Namespace) -> Any:
    """The :class:`PhantomSpec` the arguments describe (raises InputError on bad values)."""
    from dicomnode.phantom import PhantomSpec

    levels, z_mm = _parse_z(args.z_range)
    fractures: dict[str, float] = {}
    for item in args.fracture:
        fractures.update(_parse_levels(item, ":", "--fracture"))
    return PhantomSpec(
        matrix=args.matrix,
        spacing_mm=args.spacing,
        thickness_mm=args.thickness,
        slice_spacing_mm=args.slice_spacing,
        z_levels=levels or ("T10", "S1"),
        z_mm=z_mm,
        n_slices=args.slices,
        orientation=args.orientation,
        flip_rows=args.flip_rows,
        flip_cols=args.flip_cols,
        bmd=_parse_levels(args.bmd, "=", "--bmd"),
        bmd_all=args.bmd_all,
        rib_pairs=args.ribs,
        contrast=args.contrast,
        noise_sd=args.noise,
        noise_fwhm_mm=args.noise_fwhm,
        texture_sd=args.texture,
        seed=args.seed,
        kvp=args.kvp,
        gain=args.gain,
        offset=args.offset,
        curvature=args.curvature,
        fractures=fractures,
        table=not args.no_table,
        kernel=args.kernel,
    )


def _header(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--header: expected KEYWORD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def run(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode phantom``."""
    try:
        return _run(args)
    except DicomnodeError as exc:
        print(f"dicomnode phantom: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from dicomnode.imaging.writer import write_dicom_series, write_study
    from dicomnode.phantom import make_phantom

    spec = build_spec(args)
    header = _header(args.header)
    ts = TRANSFER_SYNTAXES[args.transfer_syntax]
    ph = make_phantom(spec)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    if args.study:
        series = write_study(ph.volume, out / "study", header=header, transfer_syntax=ts)
        for name, paths in series.items():
            written[name] = {"folder": str(paths[0].parent.relative_to(out)), "files": len(paths)}
    else:
        paths = write_dicom_series(ph.volume, out / "dicom", header=header, transfer_syntax=ts)
        written["series"] = {"folder": "dicom", "files": len(paths)}
    truth = ph.truth.as_dict()
    truth["written"] = written
    truth["truth_grid"] = "labels and geometry refer to the phantom volume before any slab averaging"
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    if args.labels:
        import nibabel as nib

        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        labels_ijk = np.transpose(ph.body_labels, (2, 1, 0))  # NIfTI wants [i, j, k]
        img = nib.Nifti1Image(labels_ijk, lps_to_ras @ ph.volume.affine)  # type: ignore[no-untyped-call]
        nib.save(img, str(out / "truth_labels.nii.gz"))
    log.info("phantom written to %s (%d slices)", out, ph.volume.shape[0])
    print(f"wrote {out} ({ph.volume.shape[0]} x {ph.volume.shape[1]} x {ph.volume.shape[2]})")
    return 0
