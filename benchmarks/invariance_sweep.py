"""Invariance beyond the metamorphic suite: the two real CTs re-encoded with settings the suite does not use.

``tests/integration/test_bmd_metamorphic.py`` holds the issue's tolerances on one fixed set of copies of each
real CT. Hidden cases will be re-encoded with other parameters, so this script re-runs the same transforms
(imported from the suite: slab-averaged thick slices, tilts about the spine, noise, small display field of
view) at other settings and prints one row per copy: the levels reported, whether naming is uncertain, the
fracture flags, the L1 mean and L1-L2 (or the pair used) vBMD, the category, the L1 ROI centroid and every
exclusion. Figures only, never pass/fail: a row that differs from the original in its names, its flags or
by more than 10 HU is a generalisation gap to look at (see the issue note of 2026-12-06 for the last table).

Tilted copies report their centroid in the tilted frame (not mapped back), so compare them by name and value.

``--random N`` draws N copies per patient instead, each combining settings at random (slices 0.625-5 mm,
slab-averaged or point-sampled up to 2.5 mm, in-plane 0.6-1.0 mm, a tilt up to 10 degrees about one axis,
noise up to 20 HU, a field of view down to 220 mm; ``--seed`` fixes the draw), and sorts each answer by
where its L1 ROI lies against the original's, the tilt undone: *confident, L1 in place* (within 12 mm, less
than half a vertebra, and its figure used), *uncertain* (no category: the safe failure), *confident, L1 set
aside* (no L1 figure in the report: no ROI, too small, or excluded; the category comes from other levels),
*confident, L1 elsewhere* (its ROI more than 12 mm away: named off, the failure that matters) and *refused*.
Before 2026-12-07 late evening the set-aside copies were counted "in place" when their ROI had a centroid
within 12 mm and "elsewhere" when it had none. Each row also names the fracture flags that appear (+) or
disappear (-) against the original's. It prints the tally, the spread of the confident L1 means and the
number of copies whose fracture flags differ.

    .venv/bin/python benchmarks/invariance_sweep.py [--patient basel|lidc|both] [--only SUBSTRING ...]
    .venv/bin/python benchmarks/invariance_sweep.py --random 14 [--seed 1] [--patient ...]

The real CTs are read from ``../shared/data`` beside the repository (or ``DICOMNODE_TEST_DATA``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO / "tests")]

import test_bmd_metamorphic as meta  # noqa: E402  (the suite's transforms, so both use the same ones)

from dicomnode.bmd import analyze_volume  # noqa: E402
from dicomnode.errors import DicomnodeError  # noqa: E402
from dicomnode.imaging.volume import Volume  # noqa: E402

Variant = tuple[str, Callable[[Volume], Volume]]

VARIANTS: list[Variant] = [
    ("original", lambda v: v),
    ("1.25 mm slab, 0.5 mm in-plane", lambda v: meta._resample(v, (0.5, 0.5, 1.25), slab_mm=1.25)),
    ("2 mm slab, 0.8 mm in-plane", lambda v: meta._resample(v, (0.8, 0.8, 2.0), slab_mm=2.0)),
    ("3 mm slab, 0.7 mm in-plane", lambda v: meta._resample(v, (0.7, 0.7, 3.0), slab_mm=3.0)),
    ("4 mm slab, 0.9 mm in-plane", lambda v: meta._resample(v, (0.9, 0.9, 4.0), slab_mm=4.0)),
    ("5 mm slab, 0.6 mm in-plane", lambda v: meta._resample(v, (0.6, 0.6, 5.0), slab_mm=5.0)),
    ("tilt -10 deg about left-right", lambda v: meta._tilt(v, "x", -10.0)),
    ("tilt 5 deg about left-right", lambda v: meta._tilt(v, "x", 5.0)),
    ("tilt 10 deg about anterior-posterior", lambda v: meta._tilt(v, "y", 10.0)),
    ("noise 15 HU", lambda v: meta._noise(v, 15.0, seed=3)),
    ("field of view 220 mm", lambda v: meta._small_fov(v, 220.0)),
    (
        "5 mm slab + noise 15 HU",
        lambda v: meta._noise(meta._resample(v, (0.8, 0.8, 5.0), slab_mm=5.0), 15.0, seed=4),
    ),
]


def _data_dir() -> Path:
    env = os.environ.get("DICOMNODE_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _load(patient: str) -> Volume:
    from dicomnode.imaging.loader import load_series
    from dicomnode.imaging.nifti import load_nifti
    from dicomnode.imaging.series import scan_path

    data = _data_dir()
    if patient == "basel":
        return load_nifti(data / "totalsegmentator_abdomen_nifti" / "example_ct.nii.gz")
    (series,) = scan_path(data / "lidc_idri_0001_chest_dicom" / "dicom")
    return load_series(series)


#: An L1 ROI this close to the original's (the tilt undone) lies in the same vertebra: less than half the
#: pitch of T12-L2 (about 30 mm).
SAME_BODY_MM = 12.0


def _draw(
    rng: random.Random,
) -> tuple[str, Callable[[Volume], tuple[Volume, Volume]], tuple[str, float] | None]:
    """One random copy: its label, the transform (giving the copy before its tilt, where the tilt is undone,
    and the copy), and the tilt (axis, degrees)."""
    slab = rng.choice([0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.75, 4.0, 5.0])
    inplane = rng.choice([0.6, 0.7, 0.8, 0.9, 1.0])
    axis = rng.choice(["x", "y"])
    deg = round(rng.uniform(-10.0, 10.0), 1) if rng.random() < 0.6 else 0.0
    noise = rng.choice([0.0, 0.0, 10.0, 20.0])
    fov = rng.choice([None, None, 300.0, 260.0, 220.0])
    averaged = slab > 2.5 or rng.random() < 0.5
    seed = rng.randrange(1 << 16)
    label = (
        f"{slab:g} mm {'slab' if averaged else 'sampled'}, {inplane:g} mm"
        + (f", tilt {deg:+g} {'LR' if axis == 'x' else 'AP'}" if deg else "")
        + (f", noise {noise:g}" if noise else "")
        + (f", FOV {fov:g}" if fov else "")
    )

    def fn(v: Volume) -> tuple[Volume, Volume]:
        grid = meta._resample(v, (inplane, inplane, slab), slab_mm=slab if averaged else None)
        out = meta._tilt(grid, axis, deg) if deg else grid
        if noise:
            out = meta._noise(out, noise, seed=seed)
        if fov:
            out = meta._small_fov(out, fov)
        return grid, out

    return label, fn, ((axis, deg) if deg else None)


def _random_sweep(patient: str, vol: Volume, n: int, seed: int) -> None:
    rng = random.Random(f"{patient}-{seed}")
    base = meta._row("original", analyze_volume(vol).result)
    if base.l1_at is None:
        print(f"[{patient}] the original has no L1 ROI: nothing to compare with")
        return
    tally = {
        "confident, L1 in place": 0,
        "uncertain": 0,
        "confident, L1 set aside": 0,
        "confident, L1 elsewhere": 0,
        "refused": 0,
    }
    means: list[float] = []
    flags_differ = 0
    print(f"\n[{patient}] {n} random copies (seed {seed}); original L1 {base.l1_hu:.1f} HU, {base.category}")
    for _ in range(n):
        label, fn, tilt = _draw(rng)
        t0 = time.perf_counter()
        before_tilt, copy = fn(vol)
        try:
            res = analyze_volume(copy).result
        except DicomnodeError as exc:
            tally["refused"] += 1
            print(f"[{patient}] {label:52s} refused: {str(exc)[:90]}", flush=True)
            continue
        row = meta._row(label, res)
        d = None
        if row.l1_at is not None and all(np.isfinite(row.l1_at)):
            at = row.l1_at
            if tilt is not None:
                at = meta._untilt(before_tilt, tilt[0], tilt[1], at)
            d = float(np.linalg.norm(np.subtract(at, base.l1_at)))
        # L1's figure as the report uses it (None where L1 is set aside)
        used = row.l1_hu if res.summary is not None and res.summary.l1_hu is not None else None
        if row.uncertain:
            verdict = "uncertain"
        elif d is not None and d > SAME_BODY_MM:
            verdict = "confident, L1 elsewhere"
        elif d is None or used is None:
            # no L1 figure in the report (ROI too small or none, L1 excluded): the category comes from other
            # levels; where its ROI lies cannot tell a misnamed L1 from a badly segmented one
            verdict = "confident, L1 set aside"
        else:
            verdict = "confident, L1 in place"
            means.append(used)
        tally[verdict] += 1
        l1 = f"{row.l1_hu:6.1f}" if row.l1_hu is not None else "     -"
        dist = f"{d:5.1f} mm" if d is not None else "    -   "
        # fracture flags that appear (+) or disappear (-) against the original's
        fr = " ".join(
            [f"+{lv}" for lv in sorted(row.fractures - base.fractures)]
            + [f"-{lv}" for lv in sorted(base.fractures - row.fractures)]
        )
        flags_differ += bool(fr)
        why = ""
        if verdict == "confident, L1 set aside":
            l1v = [v for v in res.vertebrae if v.level == "L1"]
            why = f"  ({(l1v[0].exclusion_reason or 'not used') if l1v else 'no L1'})"[:90]
        print(
            f"[{patient}] {label:52s} {verdict:24s} L1 {l1} HU at {dist} {row.category or '-':13s}"
            f" fractures {fr or 'same':9s} {time.perf_counter() - t0:4.0f} s{why}",
            flush=True,
        )
    spread = f"{max(means) - min(means):.1f} HU ({min(means):.1f}-{max(means):.1f})" if means else "-"
    print(f"[{patient}] tally: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
    print(f"[{patient}] L1 mean spread over the confident copies whose L1 is used: {spread}")
    print(f"[{patient}] copies whose fracture flags differ from the original's: {flags_differ} of {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patient", choices=("basel", "lidc", "both"), default="both")
    ap.add_argument("--only", nargs="*", default=[], help="variants whose name contains one of these")
    ap.add_argument("--random", type=int, default=0, metavar="N", help="N random copies per patient")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    patients = ("basel", "lidc") if args.patient == "both" else (args.patient,)
    if not (_data_dir() / "README.md").is_file():
        sys.exit(f"shared data not found at {_data_dir()} (set DICOMNODE_TEST_DATA)")
    if args.random:
        for patient in patients:
            _random_sweep(patient, _load(patient), args.random, args.seed)
        return
    for patient in patients:
        vol = _load(patient)
        head = f"{'variant':38s} {'levels':20s} unc fractures   L1 HU  pair   category      L1 at (mm)"
        print(f"\n[{patient}] {head}")
        for name, fn in VARIANTS:
            if args.only and not any(s in name for s in args.only):
                continue
            t0 = time.perf_counter()
            try:
                res = analyze_volume(fn(vol)).result
            except DicomnodeError as exc:
                print(f"[{patient}] {name:38s} refused: {str(exc)[:100]}", flush=True)
                continue
            row = meta._row(name, res)
            summary_pair = res.summary.vbmd_l1_l2_mg_cm3 if res.summary is not None else None
            l1 = f"{row.l1_hu:6.1f}" if row.l1_hu is not None else "     -"
            pair = f"{summary_pair:6.1f}" if summary_pair is not None else "     -"
            at = "(" + ",".join(f"{q:5.0f}" for q in row.l1_at) + ")" if row.l1_at is not None else "-"
            excluded = "; ".join(
                f"{v.level}: {v.exclusion_reason.split(';')[0]}" for v in res.vertebrae if v.exclusion_reason
            )
            print(
                f"[{patient}] {name:38s} {','.join(row.levels):20s} {str(row.uncertain)[0]}   "
                f"{','.join(sorted(row.fractures)) or '-':11s} {l1} {pair}   {row.category or '-':13s} {at}"
                f"  {time.perf_counter() - t0:4.0f} s"
                + (f"\n{'':48s}excluded: {excluded}" if excluded else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
