"""Replay the disc chain on stored column profiles: try a change to the disc finder on many copies at once.

Where the discs fall decides the vertebrae's ends, their names and the slab of every ROI; the chain is
chosen from one HU profile along the column (``dicomnode.bmd.classical._find_discs``), so a change to it can
be judged on the stored profiles of many re-encoded copies in a second. ``capture`` runs the analysis on the
copies ``invariance_sweep.py`` makes (its fixed variants, or ``--random N --seed S``) and stores each copy's
profile, its frame, the chain found and, for the record, the names' confidence and the L1 mean. ``replay``
runs the working tree's ``_find_discs`` on every stored profile and prints, per copy, the stored and the new
chain (the discs that moved or appeared marked), then how many copies changed. Figures only: a chain that
looks better here must still pass the metamorphic suite on both real CTs, where the rest of the
segmentation and the naming run on it.

    .venv/bin/python benchmarks/disc_replay.py capture DIR [--patient lidc|basel] [--random N --seed S]
    .venv/bin/python benchmarks/disc_replay.py replay DIR [--patient lidc|basel]

Profiles are means over a 10 mm disk of patient images, nothing more; keep ``DIR`` outside the repository all
the same.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests" / "integration"), str(REPO / "tests")]

import invariance_sweep as sweep  # noqa: E402
import roi_replay  # noqa: E402
import test_bmd_metamorphic as meta  # noqa: E402

import dicomnode.bmd.analysis as analysis  # noqa: E402
import dicomnode.bmd.classical as classical  # noqa: E402
from dicomnode.errors import DicomnodeError  # noqa: E402


def capture(folder: Path, patient: str, n_random: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    original = classical._find_discs

    def spy(p: Any, z_lo: int, z_hi: int, g: float) -> list[int]:
        chain = original(p, z_lo, z_hi, g)
        seen.update(p=np.asarray(p, dtype=np.float64), z_lo=z_lo, z_hi=z_hi, g=g, chain=list(chain))
        return chain

    classical._find_discs = spy
    try:
        vol = sweep._load(patient)
        for key, label, fn in roi_replay._copies(patient, n_random, seed):
            seen.clear()
            try:
                res = analysis.analyze_volume(fn(vol)).result
            except DicomnodeError as exc:
                print(f"{key} {label:52s} refused: {str(exc)[:80]}", flush=True)
                if not seen:
                    continue
                row = None
            else:
                row = meta._row(label, res)
            rec = {
                **seen,
                "label": label,
                "uncertain": None if row is None else row.uncertain,
                "l1_hu": None if row is None else row.l1_hu,
            }
            with open(folder / f"{key}.pkl", "wb") as fh:
                pickle.dump(rec, fh)
            print(f"{key} {label:52s} discs {rec['chain']}", flush=True)
    finally:
        classical._find_discs = original


def _near(z: int, chain: list[int]) -> bool:
    """Whether a disc of ``chain`` lies within one working voxel of ``z``."""
    return any(abs(z - o) <= 1 for o in chain)


def _marked(new: list[int], old: list[int]) -> str:
    """``new`` with every disc that is not within one working voxel of one of ``old`` starred."""
    return " ".join(f"{z}{'' if _near(z, old) else '*'}" for z in new)


def replay(folder: Path, patient: str) -> None:
    changed = 0
    paths = sorted(folder.glob(f"{patient}-*.pkl"))
    for path in paths:
        with open(path, "rb") as fh:
            d = pickle.load(fh)
        new = classical._find_discs(d["p"], d["z_lo"], d["z_hi"], d["g"])
        old = list(d["chain"])
        same = len(new) == len(old) and all(abs(a - b) <= 1 for a, b in zip(new, old, strict=True))
        changed += not same
        state = "refused" if d["uncertain"] is None else ("uncertain" if d["uncertain"] else "confident")
        l1 = "-" if d["l1_hu"] is None else f"{d['l1_hu']:.1f}"
        print(f"{path.stem:14s} {d['label']:52s} {state:9s} L1 {l1:>6s}")
        print(f"    stored {' '.join(map(str, old))}")
        if not same:
            print(
                f"    now    {_marked(new, old)}   (* not in the stored chain; stored ones gone: "
                f"{' '.join(str(o) for o in old if not _near(o, new)) or 'none'})"
            )
    print(f"[{patient}] {len(paths)} copies, {changed} whose chain changed")


def main() -> None:
    args = roi_replay.parser(__doc__).parse_args()
    if args.action == "capture":
        capture(args.folder, args.patient, args.random, args.seed)
    else:
        replay(args.folder, args.patient)


if __name__ == "__main__":
    main()
