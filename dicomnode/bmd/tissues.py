"""Internal calibration tissues measured on the coarse grid: air, subcutaneous fat, paraspinal muscle, aorta.

Every measurement is a robust mean (median first, then the mean of values within 3 robust SD of it), so
noise is averaged while partial-volume edges and stray structures are dropped. ``None`` means "not
measurable here" (too few voxels), never a default value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from dicomnode.bmd.grid import B, F32

#: Fewest voxels (coarse grid) for a tissue mean to be trusted.
MIN_VOXELS = 60


def robust_mean(values: npt.NDArray[np.float32]) -> float | None:
    """Median-anchored trimmed mean; None when there are too few values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < MIN_VOXELS:
        return None
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826
    if mad <= 0:
        return med
    keep = v[np.abs(v - med) <= 3.0 * mad]
    return float(keep.mean()) if keep.size else med


def depth_from_skin(body: B, g: float, max_mm: float = 30.0) -> F32:
    """In-plane depth (mm) of each body voxel under the skin, capped at ``max_mm``.

    Repeated in-plane erosions alternating a cross and a square (an octagon approximates a disk to within a
    few percent); much cheaper than a distance transform and exact enough for 3-25 mm bands.
    """
    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0] = ndi.generate_binary_structure(2, 1)
    square = np.ones((1, 3, 3), dtype=bool)
    depth = np.zeros(body.shape, dtype=np.float32)
    cur = body.copy()
    n = int(np.ceil(max_mm / g))
    for it in range(n):
        depth[cur] += np.float32(g)
        cur = ndi.binary_erosion(cur, structure=cross if it % 2 == 0 else square)
        if not cur.any():
            break
    depth[cur] = np.float32(max_mm + g)
    return depth


def measure_air(hu: F32, body: B, g: float) -> float | None:
    """Air outside the body (at least 10 mm from the skin), ignoring fill values outside the FOV."""
    r = max(1, int(round(10.0 / g)))
    near = ndi.binary_dilation(body, structure=np.ones((1, 3, 3), dtype=bool), iterations=r)
    v = hu[~near]
    v = v[(v > -1400.0) & (v < -700.0)]
    if v.size == 0:
        return None
    # a fill value (one exact number repeated) is not air
    vals, counts = np.unique(v, return_counts=True)
    if counts.max() > 0.2 * v.size and counts.max() > 1000:
        v = v[v != vals[int(np.argmax(counts))]]
    return robust_mean(v)


def measure_fat(hu: F32, body: B, depth: F32) -> float | None:
    """Subcutaneous fat: 3-25 mm under the skin, within the fat window."""
    sel = body & (depth >= 3.0) & (depth <= 25.0)
    v = hu[sel]
    v = v[(v > -220.0) & (v < -20.0)]
    return robust_mean(v)


@dataclass(frozen=True)
class SpineFrame:
    """Where the spine is on each coarse slice (mm on the coarse grid; NaN where unknown)."""

    x_mm: npt.NDArray[np.float64]  # body centre x (left) per z
    y_front_mm: npt.NDArray[np.float64]  # anterior surface of the vertebral body per z
    y_canal_mm: npt.NDArray[np.float64]  # canal centre y per z
    z_lo: int  # coarse slices to use (e.g. L1-L4 levels)
    z_hi: int


def measure_muscle(hu: F32, body: B, depth: F32, frame: SpineFrame, g: float) -> float | None:
    """Paraspinal (erector spinae) muscle: posterior to the canal, 12-45 mm off the midline."""
    vals: list[npt.NDArray[np.float32]] = []
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    for z in range(max(0, frame.z_lo), min(hu.shape[0], frame.z_hi + 1)):
        xc, yc = frame.x_mm[z], frame.y_canal_mm[z]
        if not (np.isfinite(xc) and np.isfinite(yc)):
            continue
        dx = np.abs(xx * g - xc)
        dy = yy * g - yc
        sel = body[z] & (depth[z] >= 10.0) & (dx >= 12.0) & (dx <= 45.0) & (dy >= 15.0) & (dy <= 55.0)
        v = hu[z][sel]
        vals.append(v[(v > -30.0) & (v < 130.0)])
    if not vals:
        return None
    return robust_mean(np.concatenate(vals))


def measure_aorta(hu: F32, body: B, frame: SpineFrame, g: float) -> float | None:
    """Aortic blood: the most homogeneous bright blob anterior-left of the vertebral bodies.

    Native blood cannot be told from the crura/psoas by HU alone, so the value is used as a blood
    reference only together with the other tissues (small weight) and for the contrast phase.
    """
    r = max(1, int(round(4.0 / g)))
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    best: list[float] = []
    for z in range(max(0, frame.z_lo), min(hu.shape[0], frame.z_hi + 1)):
        xc, yf = frame.x_mm[z], frame.y_front_mm[z]
        if not (np.isfinite(xc) and np.isfinite(yf)):
            continue
        sl = hu[z]
        sm = ndi.uniform_filter(sl, size=2 * r + 1)
        sq = ndi.uniform_filter(sl * sl, size=2 * r + 1)
        sd = np.sqrt(np.maximum(sq - sm * sm, 0.0))
        dx = xx * g - xc
        dy = yy * g - yf
        region = body[z] & (dx >= -12.0) & (dx <= 40.0) & (dy >= -45.0) & (dy <= -3.0)
        region &= (sm > -20.0) & (sm < 600.0) & (sd < 60.0)
        # exclude anything touching bone (vertebra, osteophytes)
        bone = ndi.binary_dilation(sl > 500.0, iterations=r + 1)
        region &= ~bone
        if not region.any():
            continue
        score = np.where(region, sm - 0.5 * sd, -np.inf)
        j, i = np.unravel_index(int(np.argmax(score)), score.shape)
        best.append(float(sm[j, i]))
    if len(best) < 3:
        return None
    return float(np.median(best))
