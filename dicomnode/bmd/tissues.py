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

from dicomnode.bmd.grid import F32, B, erode_in_plane

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


def outline_hull(body: B) -> B:
    """The body's outline slice by slice: the convex hull of each axial slice's body mask.

    What lies outside it is the air around the patient. What lies inside it but outside the body is not:
    a lung or bowel gas that a small field of view cuts open to the image edge, the gap between an arm and
    the trunk. The image edge itself is no skin: where a small display field of view cuts the trunk, the
    hull runs along the edge and nothing outside it is in view there.
    """
    from skimage.morphology import convex_hull_image

    hull = np.zeros(body.shape, dtype=bool)
    for z in range(body.shape[0]):
        if body[z].any():
            hull[z] = convex_hull_image(body[z])  # type: ignore[no-untyped-call]
    return hull


def depth_from_skin(body: B, g: float, max_mm: float = 30.0, hull: B | None = None) -> F32:
    """In-plane depth (mm) of each body voxel under the skin, capped at ``max_mm``.

    The skin is where the body meets the air around it (outside ``outline_hull``), never the image edge:
    a trunk cut by a small field of view has no skin at the cut, and the tissue there is not subcutaneous.
    Repeated in-plane erosions of the hull (the image edge counting as inside) alternating a cross and a
    square (an octagon approximates a disk to within a few percent); much cheaper than a distance transform
    and exact enough for 3-25 mm bands. At a concave stretch of skin (the back's midline groove) the hull
    runs a few millimetres outside it, so the depth there reads a little more than the skin's own.
    """
    cross = ndi.generate_binary_structure(2, 1)
    square = np.ones((3, 3), dtype=bool)
    depth = np.zeros(body.shape, dtype=np.float32)
    cur = outline_hull(body) if hull is None else hull  # never changed in place: each erosion is new
    n = int(np.ceil(max_mm / g))
    step = np.float32(g)
    for it in range(n):
        np.add(depth, step, out=depth, where=cur)
        cur = erode_in_plane(cur, square if it % 2 == 1 else cross, border=True)
        if not cur.any():
            break
    np.copyto(depth, np.float32(max_mm + g), where=cur)
    np.copyto(depth, np.float32(0.0), where=~body)
    return depth


def measure_air(hu: F32, body: B, g: float, hull: B | None = None) -> float | None:
    """Air around the body (outside its outline hull, at least 10 mm from it), ignoring fill values outside
    the reconstructed field of view. Air inside the hull is not sampled: a lung cut open to the image edge
    by a small field of view reads -850 to -900 HU, not air's -1000."""
    r = max(1, round(10.0 / g))
    outline = outline_hull(body) if hull is None else hull
    near = ndi.binary_dilation(outline, structure=np.ones((1, 3, 3), dtype=bool), iterations=r)
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
    y_back_mm: npt.NDArray[np.float64] | None = None  # posterior wall of the body per z
    half_width_mm: npt.NDArray[np.float64] | None = None  # half width of the body per z


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


def _round_blobs(mask: B, g: float) -> list[tuple[B, float, float]]:
    """Components of a 2-D mask with area 150-900 mm2 and their circularity (1 = disk)."""
    lab, _ = ndi.label(mask)
    out: list[tuple[B, float, float]] = []
    for q, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab[sl] == q
        area = float(comp.sum()) * g * g
        if not 150.0 <= area <= 900.0:
            continue
        edge = comp & ~ndi.binary_erosion(comp)
        perim = float(edge.sum()) * g * 1.1  # boundary pixels underestimate the perimeter a little
        circ = 4.0 * np.pi * area / max(perim * perim, 1e-6)
        full = np.zeros_like(mask)
        full[sl] = comp
        out.append((full, area, circ))
    return out


def measure_psoas(hu: F32, body: B, depth: F32, frame: SpineFrame, g: float) -> float | None:
    """Psoas muscle: beside the vertebral bodies (2-50 mm lateral of the body, +/- 15 mm of its centre
    depth). Psoas keeps its density with age far better than the paraspinal muscles, which are often
    fatty in older patients (the example CT: psoas 46 HU, erector spinae 15 HU)."""
    if frame.y_back_mm is None or frame.half_width_mm is None:
        return None
    vals: list[npt.NDArray[np.float32]] = []
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    for z in range(max(0, frame.z_lo), min(hu.shape[0], frame.z_hi + 1)):
        xc, yf, yb, hw = frame.x_mm[z], frame.y_front_mm[z], frame.y_back_mm[z], frame.half_width_mm[z]
        if not all(np.isfinite(v) for v in (xc, yf, yb, hw)):
            continue
        adx = np.abs(xx * g - xc)
        dy = yy * g - 0.5 * (yf + yb)
        sel = body[z] & (depth[z] >= 10.0) & (adx >= hw + 4.0) & (adx <= hw + 50.0) & (np.abs(dy) <= 15.0)
        # muscle interior only: the 6 mm neighbourhood must itself read as muscle (no fat/kidney edges)
        loc = ndi.uniform_filter(hu[z], size=3)
        sel &= (loc > 20.0) & (loc < 100.0)
        v = hu[z][sel]
        vals.append(v[(v > -20.0) & (v < 130.0)])
    if not vals:
        return None
    return robust_mean(np.concatenate(vals))


def measure_aorta(hu: F32, body: B, frame: SpineFrame, g: float) -> float | None:
    """Aortic blood: a round (circularity > 0.6), 14-34 mm wide blob in front of and left of the vertebral
    bodies, surrounded by retroperitoneal fat; bright (> 150 HU) after contrast, soft tissue (10-100 HU)
    when native. The value is the robust mean of the blob shrunk by 2 mm (no wall, no partial volume)."""
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    found: list[float] = []
    for z in range(max(0, frame.z_lo), min(hu.shape[0], frame.z_hi + 1)):
        xc, yf = frame.x_mm[z], frame.y_front_mm[z]
        if not (np.isfinite(xc) and np.isfinite(yf)):
            continue
        dx = xx * g - xc
        dy = yy * g - yf
        win = body[z] & (dx >= -20.0) & (dx <= 50.0) & (dy >= -50.0) & (dy <= -2.0)
        sl = ndi.uniform_filter(hu[z], size=3)
        best: tuple[float, float] | None = None  # (score, value)
        for lo, hi in ((150.0, 700.0), (10.0, 100.0)):
            cand = win & (sl > lo) & (sl < hi)
            for comp, _area, circ in _round_blobs(cand, g):
                if circ < 0.5:
                    continue
                cj, ci = ndi.center_of_mass(comp)
                dist = float(np.hypot(ci * g - (xc + 15.0), cj * g - (yf - 15.0)))
                score = circ - dist / 60.0
                inner = ndi.binary_erosion(comp, iterations=max(1, round(2.0 / g)))
                vals = hu[z][inner if inner.sum() >= 5 else comp]
                if best is None or score > best[0]:
                    best = (score, float(np.median(vals)))
            if best is not None:
                break  # an enhanced round vessel wins over soft tissue
        if best is not None:
            found.append(best[1])
    if len(found) < 3:
        return None
    return float(np.median(found))
