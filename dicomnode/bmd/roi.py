"""Trabecular ROI of one vertebral body at full resolution: erosion in mm, end-plate margin,
basivertebral region, statistics, outline on the mid-vertebral slice, and body heights (Genant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from dicomnode.domain import RoiOutline
from dicomnode.imaging.volume import Volume

B = npt.NDArray[np.bool_]
Box = tuple[slice, slice, slice]

#: Fraction of the body depth (posterior) and width (central) where the basivertebral vein enters.
BASIVERTEBRAL_DEPTH_FRACTION = 1.0 / 3.0
BASIVERTEBRAL_HALF_WIDTH_FRACTION = 0.25
#: HU above which voxels inside a body are metal or cement (cortical bone stays below ~1500-1800 HU).
METAL_HU = 2000.0
METAL_MIN_MM3 = 30.0


@dataclass(frozen=True)
class RoiStats:
    roi: B  # mask inside ``box``
    box: Box
    mean: float
    median: float
    sd: float
    volume_mm3: float
    centroid_ijk: tuple[float, float, float]
    metal_mm3: float
    heights_mm: tuple[float, float, float] | None  # anterior, middle, posterior
    #: standard errors of ``heights_mm`` from the profile fit (None: mask-based heights, no fit)
    heights_se_mm: tuple[float, float, float] | None = None
    #: mask-based heights (``body_heights``), an independent second estimate
    mask_heights_mm: tuple[float, float, float] | None = None
    #: volume of outlier voxels excluded from the statistics (bone islands, sclerotic foci, vein)
    outliers_mm3: float = 0.0
    #: the body ends within ``PROFILE_BEYOND_MM`` of the top or bottom of the scan (no heights then)
    near_edge: bool = False
    #: the end-plate profiles' heights step by this much part-way through the depth (``HeightFit.step_mm``)
    height_step_mm: float | None = None
    #: residual degrees of freedom behind ``heights_se_mm`` (``HeightFit.dof``; None: no profile fit)
    heights_dof: int | None = None


def padded_box(box: Box, shape: tuple[int, int, int], pad: int = 2) -> Box:
    return (
        slice(max(0, box[0].start - pad), min(shape[0], box[0].stop + pad)),
        slice(max(0, box[1].start - pad), min(shape[1], box[1].stop + pad)),
        slice(max(0, box[2].start - pad), min(shape[2], box[2].stop + pad)),
    )


def _near_scan_edge(canon: Volume, box: Box, body: B) -> bool:
    """Whether the body ends closer to the top or bottom of the scan than the end-plate profiles reach
    beyond it (``PROFILE_BEYOND_MM``): its end plate or the disc beyond may be cut off."""
    sz = canon.spacing[2]
    ks = np.nonzero(body.any(axis=(1, 2)))[0]
    if ks.size == 0:
        return False
    k0, k1 = box[0].start + int(ks[0]), box[0].start + int(ks[-1])
    return bool(k0 * sz < PROFILE_BEYOND_MM or (canon.shape[0] - 1 - k1) * sz < PROFILE_BEYOND_MM)


def _with_context(canon: Volume, box: Box, body: B) -> tuple[Box, B]:
    """``box`` grown by ``PROFILE_CONTEXT_MM`` on every side (within the volume) and ``body`` placed in it:
    the end-plate profiles see the same anatomy beyond the body on every grid."""
    sx, sy, sz = canon.spacing
    grow = [max(1, int(np.ceil(PROFILE_CONTEXT_MM / s))) for s in (sz, sy, sx)]
    ctx = tuple(
        slice(max(0, b.start - c), min(n, b.stop + c)) for b, c, n in zip(box, grow, canon.shape, strict=True)
    )
    out = np.zeros(tuple(c.stop - c.start for c in ctx), dtype=bool)
    o = tuple(b.start - c.start for b, c in zip(box, ctx, strict=True))
    out[o[0] : o[0] + body.shape[0], o[1] : o[1] + body.shape[1], o[2] : o[2] + body.shape[2]] = body
    return (ctx[0], ctx[1], ctx[2]), out


def _mid_slab_weight(
    fit: HeightFit,
    idx: tuple[npt.NDArray[np.intp], ...],
    spacing: tuple[float, float, float],
    a: npt.NDArray[np.float64],
    shift: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """The weight (``slab_weight``) of each voxel ``idx`` (i, j, k of the body box) in the central half of the
    body height, between the end plates of ``fit``: at each depth the slab is centred on the fitted mid-plane
    and half as tall as the fitted height there. It follows the end plates themselves, so a body axis a few
    degrees off (the column's smoothed tangent in a strong lordosis) or a wedge does not bring the slab's
    corners against an end plate, as a slab cut square to the axis from the mask's extent does."""
    sx, sy, sz = spacing
    ri, rj, rk = idx
    _, e_ap, _ = _body_frame((float(a[0]), float(a[1]), float(a[2])))
    pts = np.stack([ri * sx, rj * sy, rk * sz], axis=1) + shift[None, :]
    h, v = pts @ a, pts @ e_ap
    v0, v1 = fit.depth_mm
    f = np.clip((v - v0) / max(v1 - v0, 1e-6), 0.0, 1.0)
    m0, m1 = fit.mid_line_mm
    h0, _, h2 = fit.heights_mm
    height = h0 + (h2 - h0) * f
    return slab_weight(np.abs(h - (m0 + m1 * f)) - 0.25 * height, spacing, a)


#: A voxel counts once its extent (half a slice each side of its centre, along the slab's axis) reaches no
#: more than this (mm) beyond the mid-vertebral slab's face, ...
SLAB_LEAK_MM = 1.0
#: ... and fully once its extent lies this far (mm) inside: the thickest slices the shipped rules qualify
#: (5 mm) plus a 3 mm ramp, less the leak (see ``slab_weight``).
SLAB_FULL_MM = 7.0
#: The weight's ramp is never narrower than this (slices thicker than 5 mm): no jump when the slab's face
#: crosses a slice centre.
SLAB_MIN_RAMP_MM = 1.0


def slab_weight(
    beyond_mm: npt.NDArray[np.float64], spacing: tuple[float, float, float], a: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Each voxel's weight in a slab, from how far (mm, along the slab's axis ``a``) its centre lies beyond
    the slab's face (negative: inside).

    A voxel integrates the image over about its own extent along the axis (a slice over its slice
    sensitivity profile, half extent ``r``): a 5 mm slice centred 1 mm inside the face carries 1.5 mm of
    what lies beyond it (the denser bone towards the end plates). So a voxel counts nothing until its
    extent reaches at most ``SLAB_LEAK_MM`` beyond the face (centre ``r - SLAB_LEAK_MM`` inside), and its
    weight rises linearly to full where its far edge lies ``SLAB_FULL_MM`` inside (centre ``SLAB_FULL_MM -
    r`` inside). The weight folded with the slice profile is then about the same on every grid from 0.5 to
    5 mm slices: what enters from beyond the face is under a tenth of a mm of bone, the ramp costs about 3 mm
    of depth at each face (2-4 mm on 5 mm slices, by where the face falls between slice centres), full
    sampling from ``SLAB_FULL_MM`` inside; thicker slices keep a ramp of ``SLAB_MIN_RAMP_MM`` (no jump when
    the face crosses a slice centre). Thin and thick slices of one patient sample the same bone: counting a
    voxel by how far inside its centre lies, regardless of its extent, let 5 mm copies of both real CTs
    read 9 HU above their native slices."""
    sx, sy, sz = spacing
    reach = 0.5 * (abs(float(a[0])) * sx + abs(float(a[1])) * sy + abs(float(a[2])) * sz)
    start = reach - SLAB_LEAK_MM
    width = max(SLAB_FULL_MM - reach - start, SLAB_MIN_RAMP_MM)
    out: npt.NDArray[np.float64] = np.clip((-beyond_mm - start) / width, 0.0, 1.0)
    return out


def _column_distance(mask: B, sz: float) -> npt.NDArray[np.float64]:
    """Distance (mm) of each voxel of ``mask`` to the nearest voxel outside it in its own column (along
    axis 0), 0 outside; every column must hold an outside voxel (a padded mask).

    What ``ndi.distance_transform_edt(mask, sampling=(sz, 1e4, 1e4))`` gives when the huge in-plane
    sampling leaves only the column (the same float64: ``|dk| * sz``, squared, summed with two zeros and
    square-rooted back, is ``|dk| * sz`` exactly), by two running scans instead of a 3-D transform."""
    nk = mask.shape[0]
    k = np.arange(nk, dtype=np.int64).reshape(nk, 1, 1)
    outside = ~np.asarray(mask, dtype=bool)
    below = np.maximum.accumulate(np.where(outside, k, np.int64(-(2**40))), axis=0)
    above = np.minimum.accumulate(np.where(outside, k, np.int64(2**40))[::-1], axis=0)[::-1]
    dk = np.minimum(k - below, above - k)
    return np.asarray(dk.astype(np.float64) * sz)


def trabecular_roi(
    canon: Volume,
    body: B,
    box: Box,
    erosion_mm: float,
    endplate_margin_mm: float,
    axis_mm: tuple[float, float, float] | None = None,
) -> RoiStats:
    """Build the trabecular ROI inside one body mask (``body`` covers ``box`` of the canonical grid).

    * cortex: voxels closer than ``erosion_mm`` (3-D, anisotropic spacing respected) to the body surface go;
    * end plates: voxels closer than ``max(endplate_margin_mm, erosion_mm + slice thickness)`` along the
      cranio-caudal axis to the body's end go (the slice sensitivity profile smears the dense end plate over
      about one slice thickness beyond its own edge);
    * mid-vertebral slab: only the central half of the body height, between the end plates the end-plate
      profiles found (a mid-plane and a height fitted over the depth, ``_mid_slab_weight``), or, when the
      profiles fail (thick slices, a body at the scan's edge), between the mask's ends at each depth
      (``mask_height_fit``); each voxel counts by where its whole extent lies in the slab (``slab_weight``:
      the statistics are weighted, the ROI mask holds every voxel with a weight above 0);
    * shape: on each slice an ellipse centred slightly anterior of the centre of the trabecular compartment
      (0.45 of its depth behind its front) with semi-axes 36 % of its width and 33 % of its depth, like the
      oval ROI of manual L1 measurements (Pickhardt; Comp2Comp uses 65 % x 50 % diameters). The
      compartment is the inside of the cortex on the mid-slab slices (``_inner_outline``), not the body
      mask: the mask is made on the coarse working grid and runs up to a few mm beyond the cortex, by an
      amount that changes with the grid's phase, so an oval sized from it reached the anterior cortex on
      a leaning body and moved with each re-encoding. Its front and middle follow the body from slice to
      slice (a leaning body's sections move), its size is the median over the slices;
    * cortex: what lies less than ``erosion_mm`` inside the cortex's inner edge goes as well;
    * basivertebral vein: the posterior third of the body in its central half width goes, and so does
      the vein's channel towards the centre (central 24 % of the width behind 40 % of the depth);
    * end-plate guard: what lies on the rise towards an end plate goes (``_endplate_guard``), for the slabs
      placed from a mask whose ends run a few mm into a disc.
    """
    sx, sy, sz = canon.spacing
    data = canon.data[box]
    padded = np.pad(body, 1)
    dist = ndi.distance_transform_edt(padded, sampling=(sz, sy, sx))[1:-1, 1:-1, 1:-1]
    # distance along k only
    dist_z = _column_distance(padded, sz)[1:-1, 1:-1, 1:-1]
    z_margin = max(endplate_margin_mm, erosion_mm + sz)
    roi = body & (dist > erosion_mm) & (dist_z > z_margin)
    # each ROI voxel's weight in the mid-vertebral slab (``slab_weight``)
    weight = np.zeros(body.shape, dtype=np.float64)
    mask_heights = body_heights(body, (sx, sy, sz), axis_mm)
    heights: tuple[float, float, float] | None
    heights_se: tuple[float, float, float] | None
    near_edge = _near_scan_edge(canon, box, body)
    pfit: HeightFit | None = None
    shift = np.zeros(3)
    if near_edge:
        # the profiles need the disc and the next end plate beyond the body: not in view, no heights
        heights, heights_se = None, None
    else:
        ctx, body_ctx = _with_context(canon, box, body)
        pfit = profile_height_fit(canon.data[ctx], body_ctx, (sx, sy, sz), axis_mm)
        heights, heights_se = (pfit.heights_mm, pfit.se_mm) if pfit is not None else (mask_heights, None)
        # the body box's origin in the context box's mm coordinates (x, y, z)
        shift = np.array(
            [(b.start - c.start) * d for b, c, d in zip(box[::-1], ctx[::-1], (sx, sy, sz), strict=True)]
        )
    # the fit's step and residual degrees of freedom, for the fracture QC (none without a profile fit)
    step, dof = (pfit.step_mm, pfit.dof) if pfit is not None else (None, None)
    if body.any():
        kk, jj, ii = np.nonzero(body)
        # mid-vertebral slab: the central half of the body height along its own axis (clinical L1 ROIs are
        # drawn on the mid-vertebral slice; end plate sclerosis and Schmorl nodes sit in the outer quarters)
        a = np.asarray(axis_mm if axis_mm is not None else (0.0, 0.0, 1.0), dtype=float)
        a /= np.linalg.norm(a)
        rk, rj, ri = np.nonzero(roi)
        mfit = None if pfit is not None else mask_height_fit(body, (sx, sy, sz), axis_mm)
        if pfit is not None:
            w_slab = _mid_slab_weight(pfit, (ri, rj, rk), (sx, sy, sz), a, shift)
        elif mfit is not None:
            w_slab = _mid_slab_weight(mfit, (ri, rj, rk), (sx, sy, sz), a, np.zeros(3))
        else:
            h_all = ii * sx * a[0] + jj * sy * a[1] + kk * sz * a[2]
            h_lo, h_hi = np.percentile(h_all, 2), np.percentile(h_all, 98)
            hr = ri * sx * a[0] + rj * sy * a[1] + rk * sz * a[2]
            w_slab = slab_weight(np.abs(hr - 0.5 * (h_lo + h_hi)) - 0.25 * (h_hi - h_lo), (sx, sy, sz), a)
        out_slab = w_slab <= 0.0
        roi[rk[out_slab], rj[out_slab], ri[out_slab]] = False
        weight[rk, rj, ri] = w_slab
        jgrid = np.arange(body.shape[1])[None, :, None] * sy
        igrid = np.arange(body.shape[2])[None, None, :] * sx
        in_slab = w_slab > 0.0
        inner = None
        if in_slab.any():
            ref = float(np.median(data[rk[in_slab], rj[in_slab], ri[in_slab]]))
            inner = _inner_outline(data, body, ref, (sx, sy), np.unique(rk[in_slab]))
        if inner is not None:
            depth, width, y_ant, x_mid = inner.frame(body.shape[0])
        else:
            ya, yp = np.percentile(jj, 2) * sy, np.percentile(jj, 98) * sy
            x_lo, x_hi = np.percentile(ii, 2) * sx, np.percentile(ii, 98) * sx
            depth, width = max(yp - ya, 1.0), max(x_hi - x_lo, 1.0)
            y_ant = np.full((body.shape[0], 1, 1), ya)
            x_mid = np.full((body.shape[0], 1, 1), 0.5 * (x_lo + x_hi))
        y_post = y_ant + depth
        y_c = y_ant + 0.45 * depth
        ell = ((igrid - x_mid) / (0.36 * width)) ** 2 + ((jgrid - y_c) / (0.33 * depth)) ** 2 <= 1.0
        basi = (jgrid > y_post - BASIVERTEBRAL_DEPTH_FRACTION * depth) & (
            np.abs(igrid - x_mid) < BASIVERTEBRAL_HALF_WIDTH_FRACTION * width
        )
        basi |= (jgrid > y_ant + 0.4 * depth) & (np.abs(igrid - x_mid) < 0.12 * width)
        roi &= ell & ~basi
        if inner is not None:
            roi &= inner.inside(body.shape, erosion_mm)
        guard = _endplate_guard(data, body & (dist > erosion_mm) & ell & ~basi, roi, weight, a, (sx, sy, sz))
        roi &= ~guard
    voxel = sx * sy * sz
    metal = float(np.count_nonzero(data[body] > METAL_HU)) * voxel
    roi, n_out = exclude_outliers(data, roi)
    vals, w = data[roi].astype(np.float64), weight[roi]
    if vals.size == 0 or float(w.sum()) <= 0.0:
        return RoiStats(
            roi,
            box,
            np.nan,
            np.nan,
            np.nan,
            0.0,
            (np.nan, np.nan, np.nan),
            metal,
            heights,
            heights_se,
            mask_heights,
            near_edge=near_edge,
            height_step_mm=step,
            heights_dof=dof,
        )
    # weighted statistics (frequency weights: voxels near the slab's faces count for less)
    w_sum = float(w.sum())
    mean = float(np.sum(w * vals) / w_sum)
    sd = float(np.sqrt(np.sum(w * (vals - mean) ** 2) / (w_sum - 1.0))) if w_sum > 1.0 else 0.0
    kk, jj, ii = np.nonzero(roi)
    cen = (
        float(ii.mean()) + box[2].start,
        float(jj.mean()) + box[1].start,
        float(kk.mean()) + box[0].start,
    )
    return RoiStats(
        roi=roi,
        box=box,
        mean=mean,
        median=_weighted_median(vals, w),
        sd=sd,
        volume_mm3=w_sum * voxel,
        centroid_ijk=cen,
        metal_mm3=metal,
        heights_mm=heights,
        heights_se_mm=heights_se,
        mask_heights_mm=mask_heights,
        outliers_mm3=float(n_out) * voxel,
        near_edge=near_edge,
        height_step_mm=step,
        heights_dof=dof,
    )


#: The cortex must stand this far (HU) above the trabecular level along a ray to be taken for the wall.
CORTEX_MIN_RISE_HU = 60.0
#: Directions of the rays, evenly spaced over the full turn.
CORTEX_RAYS = 24
#: How far (mm) beyond the body mask's edge a ray looks for the cortex, ...
RAY_BEYOND_MM = 3.0
#: ... and how far inside it (the mask lies within a few mm of the cortex; a bone island nearer the centre
#: is not the wall).
RAY_WITHIN_MM = 10.0
#: Step (mm) along a ray, and its length (beyond any vertebral body's half width).
RAY_STEP_MM = 0.5
RAY_LENGTH_MM = 80.0
#: The rays' unit directions (x, y), in-plane.
_RAY_DX = np.cos(np.linspace(0.0, 2.0 * np.pi, CORTEX_RAYS, endpoint=False))
_RAY_DY = np.sin(np.linspace(0.0, 2.0 * np.pi, CORTEX_RAYS, endpoint=False))


@dataclass(frozen=True)
class InnerOutline:
    """The cortex's inner edge on the mid-slab slices ``ks``: from each slice's centre ``(cy, cx)`` (mm), the
    radius (mm) along each of ``CORTEX_RAYS`` directions, each ray's radii made a robust line over the
    slices."""

    ks: npt.NDArray[np.intp]
    cy: npt.NDArray[np.float64]
    cx: npt.NDArray[np.float64]
    radii: npt.NDArray[np.float64]  # (len(ks), CORTEX_RAYS)
    spacing: tuple[float, float]

    def _vertices(
        self, radii: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The outline's vertices (y, x in mm; one row per slice) for ``radii`` along the rays."""
        return self.cy[:, None] + _RAY_DY[None, :] * radii, self.cx[:, None] + _RAY_DX[None, :] * radii

    def frame(self, nk: int) -> tuple[float, float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Depth and width (mm) of the trabecular compartment (medians over the slices) and, per slice of
        the box, its front (y, mm) and its middle (x, mm), as robust lines over the slices."""
        vy, vx = self._vertices(self.radii)
        front, back = vy.min(axis=1), vy.max(axis=1)
        left, right = vx.min(axis=1), vx.max(axis=1)
        depth = max(float(np.median(back - front)), 1.0)
        width = max(float(np.median(right - left)), 1.0)
        return depth, width, _line_over(self.ks, front, nk), _line_over(self.ks, 0.5 * (left + right), nk)

    def inside(self, shape: tuple[int, int, int], margin_mm: float) -> B:
        """The voxels at least ``margin_mm`` inside the outline, on its slices (none elsewhere)."""
        from skimage import draw

        polygon: Any = draw.polygon  # untyped library function
        sx, sy = self.spacing
        out = np.zeros(shape, dtype=bool)
        vy, vx = self._vertices(np.maximum(self.radii - margin_mm, 0.0))
        for q, k in enumerate(self.ks):
            rr, cc = polygon(vy[q] / sy, vx[q] / sx, shape=shape[1:])
            out[k, rr, cc] = True
        return out


def _line_over(ks: npt.NDArray[np.intp], v: npt.NDArray[np.float64], nk: int) -> npt.NDArray[np.float64]:
    """``v`` (one value per slice ``ks``) as a robust line over all ``nk`` slices, shaped (nk, 1, 1); the
    median where fewer than three slices."""
    kf = np.arange(nk, dtype=np.float64)
    if ks.size >= 3:
        b0, b1 = _theil_sen(ks.astype(np.float64), v)
        return (b0 + b1 * kf).reshape(nk, 1, 1)
    return np.full((nk, 1, 1), float(np.median(v)))


def _inner_outline(
    data: npt.NDArray[Any], body: B, ref: float, spacing: tuple[float, float], ks: npt.NDArray[np.intp]
) -> InnerOutline | None:
    """The cortex's inner edge on slices ``ks`` of the body box (``InnerOutline``), from rays out of each
    section's centre.

    On each ray the brightest point from ``RAY_WITHIN_MM`` inside the body mask's edge to ``RAY_BEYOND_MM``
    beyond is the cortex when it stands ``CORTEX_MIN_RISE_HU`` above the trabecular level ``ref``; walking
    back inwards, the first sample below half way between the two is its inner edge (where a blurred edge
    stays: thick slices and soft kernels move it little). A ray without such a cortex (the basivertebral
    foramen, a thin cortex on thick slices) keeps the mask's edge. The rays start on the sections' centres
    made robust lines over the slices (a mask made on the coarse working grid moves its centre by whole
    coarse voxels from slice to slice), and each ray's radii become a robust line over the slices too: a
    leaning body's section moves steadily, one slice's bone island or gap in the cortex does not move the
    outline. None without a section of at least 20 voxels."""
    sx, sy = spacing
    dx, dy = _RAY_DX, _RAY_DY
    t = np.arange(0.0, RAY_LENGTH_MM, RAY_STEP_MM)
    within, beyond = int(RAY_WITHIN_MM / RAY_STEP_MM), int(RAY_BEYOND_MM / RAY_STEP_MM)
    kept = np.array([k for k in ks if np.count_nonzero(body[k]) >= 20], dtype=np.intp)
    if kept.size == 0:
        return None
    nk = body.shape[0]
    centres = [np.nonzero(body[k]) for k in kept]
    oy = _line_over(kept, np.array([float(np.median(jj)) * sy for jj, _ in centres]), nk).ravel()[kept]
    ox = _line_over(kept, np.array([float(np.median(ii)) * sx for _, ii in centres]), nk).ravel()[kept]
    rad = np.empty((kept.size, CORTEX_RAYS))
    for q, k in enumerate(kept):
        img = np.asarray(data[k], dtype=np.float64)
        ny, nx = img.shape
        px, py = (ox[q] + dx[:, None] * t[None, :]) / sx, (oy[q] + dy[:, None] * t[None, :]) / sy
        inside = (px >= 0) & (px <= nx - 1) & (py >= 0) & (py <= ny - 1)
        pxc, pyc = np.clip(px, 0, nx - 1), np.clip(py, 0, ny - 1)
        prof = ndi.map_coordinates(img, [pyc.ravel(), pxc.ravel()], order=1).reshape(px.shape)
        in_body = body[k][np.rint(pyc).astype(int), np.rint(pxc).astype(int)] & inside
        for r in range(CORTEX_RAYS):
            gone = np.nonzero(~in_body[r])[0]
            edge = int(gone[0]) if gone.size else t.size
            rad[q, r] = edge * RAY_STEP_MM
            lo, hi = max(0, edge - within), min(t.size, edge + beyond + 1)
            if hi <= lo:
                continue
            p = prof[r, :hi]
            peak = lo + int(np.argmax(p[lo:]))
            top = float(p[peak])
            if top - ref < CORTEX_MIN_RISE_HU:
                continue
            below = np.nonzero(p[: peak + 1] < ref + 0.5 * (top - ref))[0]
            rad[q, r] = (float(below[-1]) + 0.5 if below.size else 0.0) * RAY_STEP_MM
    if kept.size >= 3:
        kf = kept.astype(np.float64)
        for r in range(CORTEX_RAYS):
            b0, b1 = _theil_sen(kf, rad[:, r])
            rad[:, r] = np.maximum(b0 + b1 * kf, 0.0)
    return InnerOutline(kept, oy, ox, rad, (sx, sy))


#: Voxels further than this many robust SDs (1.4826 x MAD) from the ROI's median are left out of it, counted:
#: bone islands and sclerotic foci (hundreds of HU above), the basivertebral vein or an air/fat focus
#: (below), and the one-sided tail of partial volume with cortex or end plate that thick, tilted or
#: re-gridded slices leave at the ROI's edge. Trabecular bone itself is close to normal at CT noise levels
#: (SD 20-60 HU): two robust SDs drop 4.6 % of it, evenly from both tails, so its mean stays (a symmetric
#: trimmed mean) and its SD reads about 0.88 of the whole spread. Every statistic is over the same voxels.
#: Three robust SDs let the tail through: over 82 re-encoded copies of the LIDC chest CT the L1 mean's SD
#: was 2.3 HU with three and 1.9 with two, over 20 copies of the Basel CT 2.5 and 1.9 HU
#: (``benchmarks/roi_replay.py``).
OUTLIER_ROBUST_SD = 2.0
#: The robust SD is not taken below this (HU): a very smooth ROI must not lose its normal noise tails.
OUTLIER_MIN_SD = 15.0


#: A layer of the ROI's footprint (across the body, one slice thick along its axis) whose median lies this
#: far (HU) above the ROI's median, beyond its own sampling error, is the rise towards an end plate
#: (``_endplate_guard``).
ENDPLATE_GUARD_RISE_HU = 20.0
#: Fewest footprint voxels for a layer's median to count.
ENDPLATE_GUARD_MIN_VOXELS = 10


def _endplate_guard(
    data: npt.NDArray[Any],
    foot: B,
    roi: B,
    weight: npt.NDArray[np.float64],
    a: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
) -> B:
    """The ROI voxels that lie on the rise towards an end plate: in or beyond the first layer, walking from
    the ROI's centre along the body axis ``a`` either way, whose median over the ROI's footprint (``foot``:
    the body's eroded elliptic core at every height) stands ``ENDPLATE_GUARD_RISE_HU`` above the ROI's own
    median, plus twice the layer median's standard error (1.253 robust SD / sqrt(n)).

    The mid-vertebral slab keeps a quarter of the body height from each end plate when the end plates are
    found; where they are not (thick slices that fill a thin disc between two end-plate peaks), the slab
    comes from the mask, whose ends may lie a few mm off, and on slices 3-4 mm thick one layer holds both
    marrow and the denser bone under the end plate. The layers' medians show where the marrow ends on any
    grid: trabecular bone is densest next to the end plates, and a layer one slice thick averages over some
    hundred voxels. Layers are one voxel's extent along the axis (at least 1 mm) thick."""
    out = np.zeros(roi.shape, dtype=bool)
    sx, sy, sz = spacing
    rk, rj, ri = np.nonzero(roi)
    w = weight[rk, rj, ri]
    if rk.size < ENDPLATE_GUARD_MIN_VOXELS or float(w.sum()) <= 0.0:
        return out
    ax = (float(a[0]) * sx, float(a[1]) * sy, float(a[2]) * sz)
    hr = ri * ax[0] + rj * ax[1] + rk * ax[2]
    h0 = float(np.sum(w * hr) / w.sum())
    rvals = data[rk, rj, ri].astype(np.float64)
    marrow = _weighted_median(rvals, w)
    _, rsd = _robust_sd(rvals)
    bw = max(1.0, abs(ax[0]) + abs(ax[1]) + abs(ax[2]))
    fk, fj, fi = np.nonzero(foot)
    vals = data[fk, fj, fi]
    b = np.floor((fi * ax[0] + fj * ax[1] + fk * ax[2] - h0) / bw + 0.5).astype(np.int64)
    if b.size == 0:
        return out
    for step in (1, -1):
        last = int(b.max()) if step > 0 else int(b.min())
        for n in range(0, last + step, step):
            layer = vals[b == n]
            if layer.size < ENDPLATE_GUARD_MIN_VOXELS:
                continue
            se = 1.253 * rsd / float(np.sqrt(layer.size))
            if float(np.median(layer)) >= marrow + ENDPLATE_GUARD_RISE_HU + 2.0 * se:
                beyond = (hr - (h0 + (n - 0.5 * step) * bw)) * step >= 0.0
                out[rk[beyond], rj[beyond], ri[beyond]] = True
                break
    return out


def _weighted_median(vals: npt.NDArray[np.float64], w: npt.NDArray[np.float64]) -> float:
    """The value at which the cumulative weight reaches half the total (the lower of two on a tie)."""
    order = np.argsort(vals, kind="stable")
    cum = np.cumsum(w[order])
    return float(vals[order][int(np.searchsorted(cum, 0.5 * cum[-1]))])


def _robust_sd(vals: npt.NDArray[Any]) -> tuple[float, float]:
    """The median of ``vals`` and their robust SD (1.4826 x MAD), the SD at least ``OUTLIER_MIN_SD``."""
    med = float(np.median(vals))
    return med, max(OUTLIER_MIN_SD, 1.4826 * float(np.median(np.abs(vals - med))))


def exclude_outliers(data: npt.NDArray[np.float32], roi: B) -> tuple[B, int]:
    """Drop outlier voxels from a trabecular ROI (robust z-score against the ROI's own median and MAD).

    Returns the cleaned ROI and how many voxels were dropped (reported, never hidden).
    """
    vals = data[roi]
    if vals.size < 10:
        return roi, 0
    med, rsd = _robust_sd(vals)
    bad = roi & (np.abs(data - med) > OUTLIER_ROBUST_SD * rsd)
    n = int(np.count_nonzero(bad))
    return (roi & ~bad) if n else roi, n


def _body_frame(
    axis_mm: tuple[float, float, float] | None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit vectors of a vertebral body's own frame: its axis (default cranio-caudal), then anterior-posterior
    (the patient's y made orthogonal to the axis) and left-right (their cross product)."""
    a = np.asarray(axis_mm if axis_mm is not None else (0.0, 0.0, 1.0), dtype=float)
    a /= np.linalg.norm(a)
    e_ap = np.array([0.0, 1.0, 0.0]) - a * a[1]
    e_ap /= np.linalg.norm(e_ap)
    return a, e_ap, np.cross(a, e_ap)


def body_heights(
    body: B, spacing: tuple[float, float, float], axis_mm: tuple[float, float, float] | None = None
) -> tuple[float, float, float] | None:
    """Anterior, middle and posterior heights (mm) at 15/50/85 % of the body depth (TotalSegmentator's
    spine report positions), measured along the vertebra's own axis (``axis_mm``, unit vector in canonical
    mm; default the cranio-caudal axis) in a central 12 mm wide sagittal band, over 6 mm of depth.

    Height = the fraction of grid points of that patch (between the body's lowest and highest point along
    the axis) that lie inside the body, times that span, less the partial-volume spread of the mask: an
    average over the patch, so a pedicle root or an osteophyte at one corner barely changes it.
    """
    sx, sy, sz = spacing
    if not body.any():
        return None
    a, e_ap, e_lr = _body_frame(axis_mm)
    kk, jj, ii = np.meshgrid(
        np.arange(body.shape[0]) * sz,
        np.arange(body.shape[1]) * sy,
        np.arange(body.shape[2]) * sx,
        indexing="ij",
    )
    h = ii * a[0] + jj * a[1] + kk * a[2]
    v = ii * e_ap[0] + jj * e_ap[1] + kk * e_ap[2]
    u = ii * e_lr[0] + jj * e_lr[1] + kk * e_lr[2]
    vb, ub = v[body], u[body]
    u0 = float(np.median(ub))
    band = np.abs(ub - u0) <= 6.0
    if band.sum() < 10:
        return None
    v0, v1 = np.percentile(vb[band], 2), np.percentile(vb[band], 98)
    # the mask, thresholded well below the end plate / disc midpoint, reaches about half a slice beyond each
    # end plate, plus one 2 mm working-grid voxel of outline rounding: take that constant off every height
    # (a constant would otherwise pull wedge ratios towards 1)
    spread = abs(float(a[2])) * sz + 2.0
    out = []
    for frac in (0.15, 0.5, 0.85):
        vt = v0 + frac * (v1 - v0)
        inb = (np.abs(u - u0) <= 6.0) & (np.abs(v - vt) <= 3.0)
        hin = h[inb & body]
        if hin.size < 3:
            return None
        lo, hi = float(hin.min()), float(hin.max())
        span_pts = inb & (h >= lo) & (h <= hi)
        frac_in = float((span_pts & body).sum()) / max(1, int(span_pts.sum()))
        step = abs(a[0]) * sx + abs(a[1]) * sy + abs(a[2]) * sz  # one grid step along the axis (approx.)
        out.append(max(1.0, frac_in * (hi - lo) + step - spread))
    return (out[0], out[1], out[2])


#: Depth fractions (0 = anterior, 1 = posterior of the body) where end-plate profiles are taken.
PROFILE_FRACTIONS = (0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85)
#: Step (mm) along a profile, and the least HU drop from an end-plate peak into the disc that counts.
PROFILE_STEP_MM = 0.25
#: How far (mm) a profile runs beyond the body's own extent (into the disc and the next end plate), and the
#: image context the profiles get around the body (the same in mm on every grid).
PROFILE_BEYOND_MM = 12.0
PROFILE_CONTEXT_MM = 16.0
ENDPLATE_MIN_DROP_HU = 60.0
#: Least HU an end-plate peak stands above the marrow at the body's middle.
ENDPLATE_MIN_RISE_HU = 40.0
#: A thin disc between two end plates, smeared by thick slices or partial volume, may not fall by
#: ``ENDPLATE_MIN_DROP_HU``: two end-plate peaks facing each other within ``DISC_PAIR_MM`` with a dip of at
#: least ``DISC_DIP_HU`` below both, the dip in the outer ``DISC_NEAR_MM`` of the body's extent, are the
#: body's end plate, the disc and the next body's end plate (the first peak is the edge, not the second),
#: unless a disc darker than the marrow follows the second peak (then it is the body's own end plate).
DISC_PAIR_MM = 12.0
DISC_DIP_HU = 30.0
DISC_NEAR_MM = 8.0


@dataclass(frozen=True)
class HeightFit:
    """Body heights from the end-plate profiles (``profile_height_fit``) with their standard errors."""

    heights_mm: tuple[float, float, float]  # anterior, middle, posterior
    se_mm: tuple[float, float, float]  # standard errors of ``heights_mm`` from the residual spread
    fractions: tuple[float, ...]  # depth fractions of the profiles that showed both end plates
    profile_heights_mm: tuple[float, ...]  # their heights
    #: the body's mid-plane between its end plates along the axis, as a Theil-Sen line over the depth
    #: (intercept at the front, slope per unit depth fraction), in the coordinates of the box the fit was
    #: given (mm along the axis); the depth fraction runs from ``depth_mm[0]`` (front) to ``depth_mm[1]``
    mid_line_mm: tuple[float, float]
    depth_mm: tuple[float, float]
    #: the step by which a run of neighbouring profile heights differs from all the others
    #: (``_height_step``), when larger than the slice quantisation allows; None when there is none
    step_mm: float | None = None
    #: residual degrees of freedom of the line (profiles within 3 robust SDs of it, less 2): ``se_mm`` is
    #: estimated from that few residuals
    dof: int = 0


def profile_heights(
    data: npt.NDArray[Any],
    body: B,
    spacing: tuple[float, float, float],
    axis_mm: tuple[float, float, float] | None = None,
) -> tuple[float, float, float] | None:
    """Anterior, middle and posterior heights of ``profile_height_fit`` (None when it fails)."""
    fit = profile_height_fit(data, body, spacing, axis_mm)
    return None if fit is None else fit.heights_mm


def profile_height_fit(
    data: npt.NDArray[Any],
    body: B,
    spacing: tuple[float, float, float],
    axis_mm: tuple[float, float, float] | None = None,
) -> HeightFit | None:
    """Anterior, middle and posterior body heights (mm) from the image itself, with sub-voxel end plates.

    Counting mask voxels biases heights by up to a slice thickness (partial volume at the end plates, the
    working-grid outline, the mask's closing along the axis that fills a wedge) and pulls wedge ratios
    towards 1. Instead, at depth fractions 0.15 ... 0.85 of the body (along its own axis ``axis_mm``, in a
    central 8 mm wide, 2 mm deep column) the HU profile along the axis is sampled every 0.25 mm
    (trilinear). From the body's middle outwards, each end plate is the first peak that stands
    >= ``ENDPLATE_MIN_RISE_HU`` above the marrow and falls by >= ``ENDPLATE_MIN_DROP_HU`` (and by half its
    height above the marrow) into the disc within 8 mm; its
    outer edge is the half-maximum crossing of the cortical end plate (half-way between its peak and the
    disc minimum beyond it), interpolated linearly between samples. On thin slices that is sub-voxel; on
    thick slices a thin plate fills one slice and the edge can only be placed to about half a slice, but
    the body's tilt against the slices shifts that error from profile to profile and the line fitted over
    the depth averages it. The height at each fraction is the distance of the two edges; an edge more than
    a slice (+ 2 mm) beyond the mask's own extent there has met another structure (a thin posterior disc
    missed, the next vertebra, a pedicle root) and its profile is dropped.

    Middle = the height at 0.5 (the line's value there when that profile fails, or when it reads taller than
    the line by more than 3 robust SDs of the residuals and a slice + 2 mm). Anterior and posterior =
    a Theil-Sen line fitted to the heights over the depth, evaluated at the anterior (0) and posterior (1)
    margins: Genant's heights are taken at the corners, which a profile cannot sample (the cortex of the
    anterior / posterior wall runs along it), and a wedge is linear in depth; a symmetric end-plate
    concavity does not tilt the line. ``None`` when fewer
    than five profiles show both end plates (the caller then falls back to the mask, ``body_heights``).

    Standard errors: the residual spread of the profile heights around the line (RMS with n - 2 degrees of
    freedom over the profiles within 3 robust SDs of it, so a profile the line rejected does not inflate it,
    while at least five remain; else over all) is the scatter of one profile height: noise, trabecular texture
    and the end plates' placement in the slices where the plates cross them. The line's value at depth ``f``
    then has the ordinary least-squares standard error ``sigma * sqrt(1/n + (f - mean)^2 / Sxx)``; the middle
    height is one profile (``sigma``). The part of the slice quantisation common to all profiles (a plate
    parallel to the slices) does not show in the residuals: ``qc`` adds it to the ratio.
    """
    sx, sy, sz = spacing
    if not body.any():
        return None
    a, e_ap, e_lr = _body_frame(axis_mm)
    kk, jj, ii = np.nonzero(body)
    pts = np.stack([ii * sx, jj * sy, kk * sz], axis=1)  # (x, y, z) mm within the box
    h, v, u = pts @ a, pts @ e_ap, pts @ e_lr
    u0 = float(np.median(u))
    band = np.abs(u - u0) <= 6.0
    if band.sum() < 10:
        return None
    v0, v1 = float(np.percentile(v[band], 2)), float(np.percentile(v[band], 98))
    ds = PROFILE_STEP_MM
    du = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
    dv = np.array([-1.0, 0.0, 1.0])
    pu, pv = (x.ravel() for x in np.meshgrid(du, dv, indexing="ij"))
    # the mask's extent runs between voxel centres and its outline is rounded to the 2 mm working grid
    tol = abs(float(a[2])) * sz + abs(float(a[1])) * sy + 2.0
    fr: list[float] = []
    hs: list[float] = []
    mids: list[float] = []
    h_mid: float | None = None
    for frac in PROFILE_FRACTIONS:
        vt = v0 + frac * (v1 - v0)
        col = band & (np.abs(v - vt) <= 1.5)
        if col.sum() < 3:
            continue
        lo, hi = float(h[col].min()), float(h[col].max())
        c, half_span = 0.5 * (lo + hi), 0.5 * (hi - lo)
        n = int((half_span + PROFILE_BEYOND_MM) / ds)
        s = np.arange(-n, n + 1) * ds
        # sample points (x, y, z) mm -> index (k, j, i) of the box
        base = u0 * e_lr + vt * e_ap + c * a
        xyz = (
            base[None, None, :]
            + s[:, None, None] * a[None, None, :]
            + pu[None, :, None] * e_lr[None, None, :]
            + pv[None, :, None] * e_ap[None, None, :]
        )
        idx = np.stack([xyz[..., 2] / sz, xyz[..., 1] / sy, xyz[..., 0] / sx], axis=0)
        prof = ndi.map_coordinates(
            np.asarray(data, dtype=np.float32), idx.reshape(3, -1), order=1, mode="nearest"
        )
        p = ndi.gaussian_filter1d(prof.reshape(s.size, pu.size).mean(axis=1).astype(float), 0.5 / ds)
        marrow = float(np.median(p[np.abs(s) <= max(2.0, 0.2 * half_span)]))
        near = half_span - DISC_NEAR_MM
        up = _endplate_edge(p[n:], marrow, ds, near)
        dn = _endplate_edge(p[n::-1], marrow, ds, near)
        if up is None or dn is None:
            continue
        # the working-grid mask may be too tall (its closing along the axis fills a wedge) but an end
        # plate beyond the mask's own extent by more than a slice and a working voxel is another structure
        # (a thin posterior disc missed, the next vertebra, a pedicle root)
        if max(up, dn) > half_span + tol:
            continue
        fr.append(frac)
        hs.append(up + dn)
        mids.append(c + 0.5 * (up - dn))
        if frac == 0.5:
            h_mid = up + dn
    if len(hs) < 5:
        return None
    # Theil-Sen line (median of pairwise slopes): a profile caught by the posterior wall, a pedicle root or
    # a Schmorl node must not tilt it (robust to 2 of 7 outliers)
    fa, ha = np.asarray(fr), np.asarray(hs)
    icpt, slope = _theil_sen(fa, ha)
    res = ha - (icpt + slope * fa)
    robust_sd = 1.4826 * float(np.median(np.abs(res)))
    inl = np.abs(res) <= max(3.0 * robust_sd, 1e-9)
    if inl.sum() < 5:
        # degenerate residuals (an exact line, ties), or a line through three or four of five or six profiles:
        # so few residuals under-state the scatter the rest shows (LIDC's T12 on a random 1.5 mm copy: three
        # collinear profiles of five gave a height SE of 0.2 mm and a grade 3 call at 0.59), so all count
        inl = np.ones_like(inl)
    n = int(inl.sum())
    sigma = float(np.sqrt(np.sum(res[inl] ** 2) / max(1, n - 2)))
    f_in = fa[inl]
    sxx = max(float(np.sum((f_in - f_in.mean()) ** 2)), 1e-9)

    def _se(f: float) -> float:
        return sigma * float(np.sqrt(1.0 / n + (f - float(f_in.mean())) ** 2 / sxx))

    # the middle profile reads taller than the line through all of them by more than the slices and the end
    # plates' concavity allow: it ran past an end plate (the next body, a disc merged with its plates). A
    # fracture shortens the middle (a biconcave deformity), never lengthens it; the line's value stands in.
    if h_mid is not None and h_mid - (icpt + 0.5 * slope) > max(3.0 * robust_sd, tol):
        h_mid = None
    m_icpt, m_slope = _theil_sen(fa, np.asarray(mids))
    step = _height_step(ha)
    return HeightFit(
        heights_mm=(icpt, h_mid if h_mid is not None else icpt + 0.5 * slope, icpt + slope),
        se_mm=(_se(0.0), sigma if h_mid is not None else _se(0.5), _se(1.0)),
        fractions=tuple(float(x) for x in fa),
        profile_heights_mm=tuple(float(x) for x in ha),
        mid_line_mm=(m_icpt, m_slope),
        depth_mm=(v0, v1),
        step_mm=step if step > tol else None,
        dof=max(1, n - 2),
    )


def _height_step(hs: npt.NDArray[np.float64]) -> float:
    """The largest step in the profile heights ``hs`` (front to back): over each run of neighbouring profiles
    set against all the others, the gap by which every height of one exceeds every height of the other,
    counted only where it also exceeds the spread within each (a step, not a ramp); 0 when none.

    A run at the front or the back counts either way (taller or shorter than the rest): which side met
    another structure is not known. A run inside the depth counts only when it is the taller: a fracture
    shortens the middle of a body (a biconcave deformity, a Schmorl node), never lengthens it. A run may be
    one profile: with five profiles, one that jumped at the end tilts the Theil-Sen line as far as a wedge
    does (LIDC's T12 on 2.5 mm slabs tilted 9 degrees: 22.2 24.8 25.9 26.9 | 37.9 mm read 0.49).

    A wedge is a ramp: its heights change as much within each group as between them, and between neighbouring
    profiles by at most ~3 mm (a 60 % wedge of a 33 mm body over 0.15 of the depth). A step larger than the
    slices can make (each end plate's edge is placed to about half a slice) is one end plate's edge that
    jumped from one structure to another part-way through the depth: on a thin disc smeared by the slices or
    by a tilt, the profiles behind the jump passed the body's own end plate and stopped at the next body's."""
    n = hs.size
    best = 0.0
    for i in range(n):
        for j in range(i + 1, n + 1):
            if i == 0 and j == n:
                continue
            run, rest = hs[i:j], np.concatenate([hs[:i], hs[j:]])
            gap = float(run.min() - rest.max())
            if i == 0 or j == n:
                gap = max(gap, float(rest.min() - run.max()))
            if gap > max(float(np.ptp(run)), float(np.ptp(rest))):
                best = max(best, gap)
    return best


def _theil_sen(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Intercept and slope of the Theil-Sen line (median of pairwise slopes) through ``(x, y)``."""
    ia, ib = np.triu_indices(x.size, 1)
    slope = float(np.median((y[ib] - y[ia]) / (x[ib] - x[ia])))
    return float(np.median(y - slope * x)), slope


def mask_height_fit(
    body: B, spacing: tuple[float, float, float], axis_mm: tuple[float, float, float] | None = None
) -> HeightFit | None:
    """The body's mid-plane and height from the mask alone, at the depth fractions of the end-plate
    profiles (``PROFILE_FRACTIONS``, in the same central 12 mm wide band): at each, the mask's extent along
    the axis (voxel centres, so a mask that takes in half a slice of disc or end plate at each end is not
    taller than the body); Theil-Sen lines over the depth, as ``profile_height_fit`` fits its profiles.

    For the mid-vertebral slab when the end-plate profiles fail (thick slices, faint end plates): a body
    tilted against the column's smoothed axis (a strong lordosis) spans its height plus its depth times the
    tilt along that axis, and a slab over that whole extent takes in the end plates at its corners; per
    depth, the extent is the body's own. No standard errors (``se_mm`` is NaN): heights from a mask are
    never used to call a fracture on their own (``qc.reference_height``)."""
    sx, sy, sz = spacing
    if not body.any():
        return None
    a, e_ap, e_lr = _body_frame(axis_mm)
    kk, jj, ii = np.nonzero(body)
    pts = np.stack([ii * sx, jj * sy, kk * sz], axis=1)
    h, v, u = pts @ a, pts @ e_ap, pts @ e_lr
    band = np.abs(u - float(np.median(u))) <= 6.0
    if band.sum() < 10:
        return None
    v0, v1 = float(np.percentile(v[band], 2)), float(np.percentile(v[band], 98))
    fr, hs, mids = [], [], []
    for frac in PROFILE_FRACTIONS:
        col = band & (np.abs(v - (v0 + frac * (v1 - v0))) <= 1.5)
        if col.sum() < 3:
            continue
        lo, hi = float(h[col].min()), float(h[col].max())
        fr.append(frac)
        hs.append(hi - lo)
        mids.append(0.5 * (lo + hi))
    if len(fr) < 3:
        return None
    fa = np.asarray(fr)
    icpt, slope = _theil_sen(fa, np.asarray(hs))
    m_icpt, m_slope = _theil_sen(fa, np.asarray(mids))
    nan = float("nan")
    return HeightFit(
        heights_mm=(icpt, icpt + 0.5 * slope, icpt + slope),
        se_mm=(nan, nan, nan),
        fractions=tuple(float(x) for x in fa),
        profile_heights_mm=tuple(hs),
        mid_line_mm=(m_icpt, m_slope),
        depth_mm=(v0, v1),
    )


def _endplate_edge(
    q: npt.NDArray[np.float64], marrow: float, ds: float, disc_from_mm: float | None = None
) -> float | None:
    """Distance (mm) from ``q[0]`` (the body's middle) to the outer half-maximum edge of the first end
    plate met walking outwards along the profile ``q``; None when no end plate is seen. ``disc_from_mm``:
    where a disc may begin (the outer part of the body's extent), for a thin disc between two end-plate
    peaks that does not fall by ``ENDPLATE_MIN_DROP_HU`` (see ``DISC_PAIR_MM``)."""
    w = max(2, int(8.0 / ds))
    for k in range(1, q.size - 1):
        if q[k] < q[k - 1] or q[k] < q[k + 1]:
            continue
        beyond = q[k : k + w]
        j_low = int(np.argmin(beyond))
        low = float(beyond[j_low])
        drop = float(q[k]) - low
        # an end plate is cortex: brighter than the marrow it closes (the edge of a sclerotic core is not)
        if q[k] < marrow + ENDPLATE_MIN_RISE_HU:
            continue
        if drop < max(ENDPLATE_MIN_DROP_HU, 0.5 * (float(q[k]) - marrow)):
            j_disc = _thin_disc(q, k, marrow, ds, disc_from_mm)
            if j_disc is None:
                continue
            j_low, low = j_disc - k, float(q[j_disc])
        # the half-maximum of the cortical end plate: half-way between its peak and the disc. Half-way
        # between marrow and disc instead would put the edge of a bright plate up to a slice outwards and
        # pull every wedge ratio towards 1 (a 50 % wedge read 0.70 at 3 mm slices)
        half = 0.5 * (float(q[k]) + low)
        for j in range(k + 1, k + j_low + 1):
            if q[j] < half:
                t = (float(q[j - 1]) - half) / max(1e-6, float(q[j - 1] - q[j]))
                return (j - 1 + t) * ds
        return None
    return None


def _thin_disc(
    q: npt.NDArray[np.float64], k: int, marrow: float, ds: float, disc_from_mm: float | None
) -> int | None:
    """Index of the disc between the end-plate peak ``q[k]`` and the next body's end-plate peak within
    ``DISC_PAIR_MM`` (a dip >= ``DISC_DIP_HU`` below both, beyond ``disc_from_mm``); None if there is none."""
    if disc_from_mm is None:
        return None
    stop = min(q.size - 1, k + int(DISC_PAIR_MM / ds) + 1)
    for k2 in range(k + 2, stop):
        if q[k2] < q[k2 - 1] or q[k2] < q[k2 + 1] or q[k2] < marrow + ENDPLATE_MIN_RISE_HU:
            continue
        j = k + int(np.argmin(q[k : k2 + 1]))
        dip = float(q[j])
        # beyond the second peak lies the next body's marrow; a disc darker than the marrow there means the
        # second peak is this body's own end plate and the first a dense band inside the body (an impacted
        # fracture zone, a bone island)
        after = q[k2 : k2 + max(2, int(8.0 / ds))]
        if float(after.min()) < marrow - DISC_DIP_HU:
            return None
        if j * ds >= disc_from_mm and min(float(q[k]), float(q[k2])) - dip >= DISC_DIP_HU:
            return j
        return None
    return None


def outline_on_slice(volume: Volume, canon: Volume, stats: RoiStats, k: int) -> RoiOutline | None:
    """The ROI contour on canonical slice ``k`` as LPS points and, when the slice axis is the acquired
    one, as (column, row) of the source image (DICOM SCOORD: top-left pixel centre = (0.5, 0.5))."""
    from skimage import measure

    box = stats.box
    kl = k - box[0].start
    if not 0 <= kl < stats.roi.shape[0]:
        return None
    sl = stats.roi[kl]
    if not sl.any():
        return None
    find_contours: Any = measure.find_contours  # untyped library function
    contours = find_contours(np.pad(sl.astype(np.float32), 1), 0.5)
    if not contours:
        return None
    c = max(contours, key=len)
    rows = c[:, 0] - 1 + box[1].start
    cols = c[:, 1] - 1 + box[2].start
    ijk = np.stack([cols, rows, np.full(rows.shape, float(k))], axis=1)
    lps = canon.index_to_lps(ijk)
    if not np.allclose(lps[0], lps[-1]):
        lps = np.vstack([lps, lps[:1]])
    pts_lps = tuple((float(p[0]), float(p[1]), float(p[2])) for p in lps)
    sop: str | None = None
    frame: int | None = None
    pts_cr: tuple[tuple[float, float], ...] = ()
    a = canon.affine[:3, 2] / np.linalg.norm(canon.affine[:3, 2])
    b = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    if abs(float(a @ b)) > 0.99:  # canonical() kept the acquired slice axis
        if canon.slice_sop_instance_uids and k < len(canon.slice_sop_instance_uids):
            sop = canon.slice_sop_instance_uids[k]
        if canon.slice_frame_numbers and k < len(canon.slice_frame_numbers):
            frame = canon.slice_frame_numbers[k]
        orig = volume.lps_to_index(lps)
        pts_cr = tuple((float(p[0]) + 0.5, float(p[1]) + 0.5) for p in orig)
    return RoiOutline(sop_instance_uid=sop, frame_number=frame, points_cr=pts_cr, points_lps_mm=pts_lps)
