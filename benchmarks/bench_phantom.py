"""Speed of the phantom generator and the DICOM series writer (prints figures; never pass/fail).

Run: ``python benchmarks/bench_phantom.py [--full]`` (``--full`` adds the 512 x 512 x 300 case).
"""

from __future__ import annotations

import sys
import tempfile
import time

from dicomnode.imaging.writer import write_dicom_series
from dicomnode.phantom import PhantomSpec, make_phantom


def _bench(name: str, spec: PhantomSpec, write: bool) -> None:
    t0 = time.perf_counter()
    ph = make_phantom(spec)
    t1 = time.perf_counter()
    k, j, i = ph.volume.shape
    line = f"{name}: {i}x{j}x{k} generated in {t1 - t0:.2f} s"
    if write:
        with tempfile.TemporaryDirectory() as tmp:
            t2 = time.perf_counter()
            write_dicom_series(ph.volume, tmp)
            line += f", written in {time.perf_counter() - t2:.2f} s"
    print(line, flush=True)


def main() -> None:
    _bench(
        "unit-test size",
        PhantomSpec(matrix=128, spacing_mm=2.8, thickness_mm=3.0, z_levels=("T11", "L3")),
        True,
    )
    if "--full" in sys.argv:
        _bench(
            "512 x 300 @ 1 mm", PhantomSpec(matrix=512, spacing_mm=1.0, thickness_mm=1.0, n_slices=300), True
        )


if __name__ == "__main__":
    main()
