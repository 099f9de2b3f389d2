"""Replay the trabecular ROI on stored inputs: try an ROI change on dozens of re-encoded copies in seconds.

A full analysis of one copy of a real CT takes 10-40 s, most of it finding and naming the column; the ROI
itself (``dicomnode.bmd.roi.trabecular_roi``) takes well under a second. ``capture`` runs the analysis on the
copies ``invariance_sweep.py`` makes (its fixed variants, or ``--random N --seed S``) and stores, for T12, L1
and L2 of every copy, what ``trabecular_roi`` was given (the image cropped in-plane around the body, every
slice kept, so the scan-edge and end-plate-profile logic sees what it saw) and what it returned. ``replay``
calls the ``trabecular_roi`` of the working tree on every stored input and prints, per level, the spread of
the stored and the new means over the copies whose naming was confident, and one row per copy. Figures
only, never pass/fail; a change that looks good here must still pass the metamorphic suite, the phantom grid
and a look at the overlays.

    .venv/bin/python benchmarks/roi_replay.py capture DIR [--patient lidc|basel] [--random N --seed S]
    .venv/bin/python benchmarks/roi_replay.py replay DIR [--patient lidc|basel] [--level L1]

The stored inputs hold patient images: keep ``DIR`` outside the repository.
"""

from __future__ import annotations

import argparse
import pickle
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests" / "integration"), str(REPO / "tests")]

import invariance_sweep as sweep  # noqa: E402
import test_bmd_metamorphic as meta  # noqa: E402

import dicomnode.bmd.analysis as analysis  # noqa: E402
import dicomnode.bmd.roi as roi  # noqa: E402
from dicomnode.errors import DicomnodeError  # noqa: E402

LEVELS = ("T12", "L1", "L2")
#: In-plane margin (mm) kept around the body box: the end-plate profiles' context (16 mm) and a spare.
CROP_MM = 24.0


def _key(box: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(b.start), int(b.stop)) for b in box)


def _copies(patient: str, n_random: int, seed: int) -> list[tuple[str, str, Callable[[Any], Any]]]:
    if not n_random:
        return [(f"{patient}-v{n:02d}", name, fn) for n, (name, fn) in enumerate(sweep.VARIANTS)]
    rng = random.Random(f"{patient}-{seed}")
    out = []
    for n in range(n_random):
        label, fn, _ = sweep._draw(rng)
        out.append((f"{patient}-s{seed}-{n:02d}", label, lambda v, fn=fn: fn(v)[1]))
    return out


def capture(folder: Path, patient: str, n_random: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    calls: dict[tuple[tuple[int, int], ...], dict[str, Any]] = {}
    levels: dict[str, tuple[tuple[int, int], ...]] = {}
    original_roi, original_qc = analysis.trabecular_roi, analysis.qc.build_vertebrae

    def spy_roi(canon: Any, body: Any, box: Any, erosion: float, margin: float, axis: Any = None) -> Any:
        st = original_roi(canon, body, box, erosion, margin, axis)
        sx, sy, _ = canon.spacing
        gj, gi = int(np.ceil(CROP_MM / sy)), int(np.ceil(CROP_MM / sx))
        j0, j1 = max(0, box[1].start - gj), min(canon.shape[1], box[1].stop + gj)
        i0, i1 = max(0, box[2].start - gi), min(canon.shape[2], box[2].stop + gi)
        calls[_key(box)] = {
            "data": np.asarray(canon.data[:, j0:j1, i0:i1], dtype=np.float32),
            "spacing": canon.spacing,
            "body": body,
            "box": (
                (box[0].start, box[0].stop),
                (box[1].start - j0, box[1].stop - j0),
                (box[2].start - i0, box[2].stop - i0),
            ),
            "erosion": erosion,
            "margin": margin,
            "axis": axis,
            "mean": st.mean,
        }
        return st

    def spy_qc(**kw: Any) -> Any:
        levels.update({lvl: _key(st.box) for lvl, st in kw["stats"].items()})
        return original_qc(**kw)

    analysis.trabecular_roi = spy_roi
    analysis.qc.build_vertebrae = spy_qc
    try:
        vol = sweep._load(patient)
        for key, label, fn in _copies(patient, n_random, seed):
            calls.clear()
            levels.clear()
            try:
                res = analysis.analyze_volume(fn(vol)).result
            except DicomnodeError as exc:
                print(f"{key} {label:52s} refused: {str(exc)[:80]}", flush=True)
                continue
            row = meta._row(label, res)
            got = {lvl: calls[levels[lvl]] for lvl in LEVELS if lvl in levels and levels[lvl] in calls}
            with open(folder / f"{key}.pkl", "wb") as fh:
                pickle.dump({"label": label, "uncertain": row.uncertain, "levels": got}, fh)
            means = " ".join(f"{lvl} {c['mean']:6.1f}" for lvl, c in got.items())
            print(f"{key} {label:52s} {'uncertain' if row.uncertain else 'confident'} {means}", flush=True)
    finally:
        analysis.trabecular_roi = original_roi
        analysis.qc.build_vertebrae = original_qc


def replay(folder: Path, patient: str, level: str) -> None:
    """Re-run this tree's ``trabecular_roi`` on every stored input of ``patient`` and print the spreads."""
    rows: list[tuple[str, str, bool, dict[str, tuple[float, float, float, float]]]] = []
    slabs: dict[tuple[str, str], str] = {}
    for path in sorted(folder.glob(f"{patient}-*.pkl")):
        with open(path, "rb") as fh:
            d = pickle.load(fh)
        got = {}
        for lvl, c in d["levels"].items():
            canon = SimpleNamespace(data=c["data"], spacing=c["spacing"], shape=c["data"].shape)
            box = tuple(slice(a, b) for a, b in c["box"])
            st = roi.trabecular_roi(canon, c["body"], box, c["erosion"], c["margin"], c["axis"])  # type: ignore[arg-type]
            got[lvl] = (c["mean"], st.mean, st.median, st.volume_mm3)
            # where the mid-vertebral slab came from: the end-plate profiles (their heights, with standard
            # errors) or the mask's ends (the outline's heights shown; none for a body at the scan's edge)
            h = st.heights_mm
            src = "the end-plate profiles" if st.heights_se_mm is not None else "the mask's ends"
            slabs[(path.stem, lvl)] = f"slab from {src}" + (
                f" (heights {h[0]:.1f}/{h[1]:.1f}/{h[2]:.1f} mm)"
                if h is not None
                else " (at the scan's edge)"
            )
        rows.append((path.stem, d["label"], d["uncertain"], got))
    print(
        f"[{patient}] {len(rows)} copies; over the confident ones:"
        " stored mean | this tree's mean | its median"
    )
    for lvl in LEVELS:
        sets: dict[str, list[tuple[float, float, float, float]]] = {}
        for key, _, unc, got in rows:
            if not unc and lvl in got and all(np.isfinite(got[lvl][:3])):
                part = key.split("-")[1]  # "v00" (the fixed variants) or "s3" (random seed 3)
                sets.setdefault(part if part.startswith("s") else "v", []).append(got[lvl])
        every = [v for vs in sets.values() for v in vs]
        if not every:
            continue
        for name, vs in [*sorted(sets.items()), ("all", every)]:
            a = np.asarray(vs)
            cols = " | ".join(
                f"{x.min():6.1f}-{x.max():6.1f} (spread {np.ptp(x):4.1f}, SD {x.std():3.1f})"
                for x in (a[:, 0], a[:, 1], a[:, 2])
            )
            print(
                f"[{patient}] {lvl:3s} {name:4s} n {len(a):2d}  {cols}"
                f"  ROI median {np.median(a[:, 3]):5.0f} mm3"
            )
    for key, label, unc, got in rows:
        if level in got:
            o, n, _, v = got[level]
            flag = "uncertain " if unc else ""
            print(
                f"  {key:14s} {label:52s} {flag}{level} {o:6.1f} -> {n:6.1f} HU, {v:5.0f} mm3,"
                f" {slabs[(key, level)]}"
            )


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a capture / replay benchmark (this one, ``disc_replay.py``): the action, the
    folder, the patient and which copies (``invariance_sweep.py``'s fixed variants, or ``--random N --seed
    S``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("action", choices=("capture", "replay"))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--patient", choices=("basel", "lidc"), default="lidc")
    ap.add_argument("--random", type=int, default=0, metavar="N")
    ap.add_argument("--seed", type=int, default=1)
    return ap


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--level", default="L1", choices=LEVELS)
    args = ap.parse_args()
    if args.action == "capture":
        capture(args.folder, args.patient, args.random, args.seed)
    else:
        replay(args.folder, args.patient, args.level)


if __name__ == "__main__":
    main()
