"""Speed of ``dicomnode.bmd.analyze_volume`` alone (in process, volume already in memory).

Renders a phantom (not timed), then times ``analyze_volume`` ``--repeat`` times and prints wall and CPU time
per run, the median, and how the levels came out. Figures only, never pass/fail (target: well under 10 s
for a 512 x 512 x 300, 1 mm series on 2 cores, leaving room for loading and writing).

    .venv/bin/python benchmarks/bmd_speed.py [--matrix 512] [--spacing 0.8] [--thickness 1.0] [--slices 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

from dicomnode.bmd import analyze_volume
from dicomnode.phantom import PhantomSpec, make_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--spacing", type=float, default=0.8)
    ap.add_argument("--thickness", type=float, default=1.0)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    spec = PhantomSpec(
        matrix=args.matrix,
        spacing_mm=args.spacing,
        thickness_mm=args.thickness,
        n_slices=args.slices,
        z_levels=("T11", "S1"),
    )
    t0 = time.perf_counter()
    ph = make_phantom(spec)
    print(
        f"phantom {ph.volume.shape} spacing {ph.volume.spacing} rendered in {time.perf_counter() - t0:.1f} s"
    )
    walls, cpus = [], []
    for run in range(args.repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = analyze_volume(ph.volume)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        print(f"run {run + 1}: wall {walls[-1]:.2f} s, cpu {cpus[-1]:.2f} s")
    res = out.result
    levels = ", ".join(
        f"{v.level}{'?' if v.level_uncertain else ''}{'(x)' if v.excluded else ''}" for v in res.vertebrae
    )
    print(f"levels: {levels}")
    print(f"median wall {statistics.median(walls):.2f} s, median cpu {statistics.median(cpus):.2f} s")


if __name__ == "__main__":
    main()
