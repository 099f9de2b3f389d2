"""Benchmark of ``dicomnode analyze`` on a 512 x 512 x 300, 1 mm phantom CT series, on 2 cores.

Each run is the full command in a fresh process from a cold start (interpreter, imports, scan, load,
measurement, report, exit). Prints, for each run, the wall time, the CPU time (user + system) and the peak
memory (max RSS of the analysing process, from ``resource.getrusage(RUSAGE_CHILDREN)`` in a small runner
process, so runs do not mask each other), the per-step timings the command reports with ``-v`` and the time
outside those steps (interpreter start, imports, exit); then the medians, against the targets (<= 10 s
wall, <= 2.5 GB). Figures only, never pass/fail. On a shared machine wall time includes waiting for the
CPU: compare CPU time too, and run when the machine is quiet.

    .venv/bin/python benchmarks/analyze.py [--matrix 512] [--slices 300] [--thickness 1.0] [--cores 2]
        [--repeat 3] [--keep DIR]

The thin-slice case of issue 9: ``--slices 640 --thickness 0.625`` (400 mm of 0.625 mm slices).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_WALL_S = 10.0
TARGET_RSS_GB = 2.5

#: Runs in a fresh interpreter: pins itself to N CPUs, runs the command, reports its wall time and max RSS.
RUNNER = """
import json, os, resource, subprocess, sys, time
cores = int(sys.argv[1])
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
t0 = time.perf_counter()
p = subprocess.run(sys.argv[2:], capture_output=True, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall_s": wall, "rss_gb": ru.ru_maxrss * 1024 / 1e9,  # KiB on Linux
                  "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
                  "stdout": p.stdout[-4000:], "stderr": p.stderr[-1000:]}))
"""


def make_series(folder: Path, matrix: int, slices: int, thickness: float = 1.0) -> float:
    """Write the phantom series (0.7 mm pixels at 512, ``thickness`` mm slices); return the time it took."""
    from dicomnode.imaging.writer import write_dicom_series
    from dicomnode.phantom import PhantomSpec, make_phantom

    t0 = time.perf_counter()
    spec = PhantomSpec(
        matrix=matrix, spacing_mm=0.7 * 512 / matrix, thickness_mm=thickness, n_slices=slices, seed=5
    )
    write_dicom_series(make_phantom(spec).volume, folder)
    return time.perf_counter() - t0


def measure(cmd: list[str], cores: int) -> dict[str, object]:
    """Run ``cmd`` on ``cores`` CPUs (thread pools capped too) and return rc, wall_s, rss_gb, output tails."""
    n = str(cores)
    env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, n, *cmd], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--thickness", type=float, default=1.0, help="slice thickness and spacing (mm)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="keep the series and outputs in this folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="dicomnode-bench-"))
    series = work / "ct"
    try:
        if not series.is_dir():
            gen = make_series(series, args.matrix, args.slices, args.thickness)
            print(
                f"phantom series {args.matrix}x{args.matrix}x{args.slices}, {args.thickness:g} mm slices, "
                f"written in {gen:.1f} s"
            )
        script = Path(sys.executable).parent / "dicomnode"
        print(
            f"dicomnode analyze (fresh process, imports included) on {args.cores} core(s); "
            f"targets <= {TARGET_WALL_S:g} s wall, <= {TARGET_RSS_GB:g} GB peak RSS"
        )
        runs: list[dict[str, float]] = []
        for n in range(args.repeat):
            cmd = [str(script), "-v", "analyze", str(series), "--out", str(work / f"out{n}"), "--no-png"]
            r = measure(cmd, args.cores)
            steps = next((ln for ln in str(r["stdout"]).splitlines() if ln.startswith("timings:")), "")
            figures = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", steps)}
            wall, cpu = float(str(r["wall_s"])), float(str(r["cpu_s"]))
            figures.update(wall=wall, cpu=cpu, rss=float(str(r["rss_gb"])))
            if "total" in figures:
                figures["outside"] = wall - figures["total"]
            runs.append(figures)
            print(
                f"run {n + 1}: exit {r['rc']}, wall {wall:.1f} s, CPU {cpu:.1f} s "
                f"(user {float(str(r['user_s'])):.1f} + sys {float(str(r['sys_s'])):.1f}), "
                f"peak RSS {figures['rss']:.2f} GB"
            )
            if steps:
                outside = f", outside the steps (start, imports, exit) {figures['outside']:.2f} s"
                print(f"       {steps}{outside if 'outside' in figures else ''}")
            if r["rc"] not in (0, 2):
                print(r["stderr"], file=sys.stderr)
        if runs:
            keys = [k for k in runs[0] if all(k in f for f in runs)]
            med = {k: statistics.median(f[k] for f in runs) for k in keys}
            parts = ", ".join(f"{k} {med[k]:.2f} s" for k in keys if k not in ("wall", "cpu", "rss"))
            print(
                f"median of {len(runs)}: wall {med['wall']:.1f} s (target <= {TARGET_WALL_S:g}), "
                f"CPU {med['cpu']:.1f} s, peak RSS {med['rss']:.2f} GB (target <= {TARGET_RSS_GB:g}); {parts}"
            )
        last = work / f"out{args.repeat - 1}" / "result.json"
        if last.is_file():
            doc = json.loads(last.read_text())
            s = doc.get("summary") or {}
            vbmd, cat = s.get("vbmd_l1_l2_mg_cm3"), s.get("category")
            print(f"result: status {doc['status']}, L1-L2 vBMD {vbmd} mg/cm3, category {cat}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
