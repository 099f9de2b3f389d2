"""Trabecular ROI of one vertebral body at full resolution: erosion in mm, end-plate margin,
basivertebral region, statistics, outline on the mid-vertebral slice, and body heights (Genant).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def padded_box(box: Box, shape: tuple[int, int, int], pad: int = 2) -> Box:
    return (
        slice(max(0, box[0].start - pad), min(shape[0], box[0].stop + pad)),
        slice(max(0, box[1].start - pad), min(shape[1], box[1].stop + pad)),
        slice(max(0, box[2].start - pad), min(shape[2], box[2].stop + pad)),
    )


def trabecular_roi(
    canon: Volume, body: B, box: Box, erosion_mm: float, endplate_margin_mm: float
) -> RoiStats:
    """Build the trabecular ROI inside one body mask (``body`` covers ``box`` of the canonical grid).

    * cortex: voxels closer than ``erosion_mm`` (3-D, anisotropic spacing respected) to the body surface go;
    * end plates: voxels closer than ``max(endplate_margin_mm, erosion_mm + slice/2)`` along the
      cranio-caudal axis to the body's end go (thick slices smear the end plate over half a slice);
    * basivertebral vein: the posterior third of the body in its central half width goes.
    """
    sx, sy, sz = canon.spacing
    data = canon.data[box]
    padded = np.pad(body, 1)
    dist = ndi.distance_transform_edt(padded, sampling=(sz, sy, sx))[1:-1, 1:-1, 1:-1]
    # distance along k only: a huge in-plane sampling leaves the column direction
    dist_z = ndi.distance_transform_edt(padded, sampling=(sz, 1e4, 1e4))[1:-1, 1:-1, 1:-1]
    z_margin = max(endplate_margin_mm, erosion_mm + 0.5 * sz)
    roi = body & (dist > erosion_mm) & (dist_z > z_margin)
    heights = body_heights(body, (sx, sy, sz))
    if body.any():
        kk, jj, ii = np.nonzero(body)
        y_ant, y_post = np.percentile(jj, 2) * sy, np.percentile(jj, 98) * sy
        x_lo, x_hi = np.percentile(ii, 2) * sx, np.percentile(ii, 98) * sx
        depth, width = y_post - y_ant, x_hi - x_lo
        x_mid = 0.5 * (x_lo + x_hi)
        jgrid = np.arange(body.shape[1])[None, :, None] * sy
        igrid = np.arange(body.shape[2])[None, None, :] * sx
        basi = (jgrid > y_post - BASIVERTEBRAL_DEPTH_FRACTION * depth) & (
            np.abs(igrid - x_mid) < BASIVERTEBRAL_HALF_WIDTH_FRACTION * width
        )
        roi &= ~basi
    vals = data[roi]
    voxel = sx * sy * sz
    metal = float(np.count_nonzero(data[body] > METAL_HU)) * voxel
    if vals.size == 0:
        return RoiStats(roi, box, np.nan, np.nan, np.nan, 0.0, (np.nan, np.nan, np.nan), metal, heights)
    kk, jj, ii = np.nonzero(roi)
    cen = (
        float(ii.mean()) + box[2].start,
        float(jj.mean()) + box[1].start,
        float(kk.mean()) + box[0].start,
    )
    return RoiStats(
        roi=roi,
        box=box,
        mean=float(vals.mean()),
        median=float(np.median(vals)),
        sd=float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
        volume_mm3=float(vals.size) * voxel,
        centroid_ijk=cen,
        metal_mm3=metal,
        heights_mm=heights,
    )


def body_heights(body: B, spacing: tuple[float, float, float]) -> tuple[float, float, float] | None:
    """Anterior, middle and posterior heights (mm) at 15/50/85 % of the body depth, central +/- 3 mm.

    Heights are measured along the cranio-caudal axis of the canonical grid (column extent of the mask),
    averaged over +/- 2 mm in depth, as TotalSegmentator's spine report measures them.
    """
    sx, sy, sz = spacing
    if not body.any():
        return None
    kk, jj, ii = np.nonzero(body)
    x_mid = float(np.median(ii))
    band_i = np.abs(np.arange(body.shape[2]) - x_mid) * sx <= 3.0
    sub = body[:, :, band_i]
    col_h = sub.sum(axis=0) * sz  # [j, i_band]
    y0, y1 = float(np.percentile(jj, 2)), float(np.percentile(jj, 98))
    out = []
    for frac in (0.15, 0.5, 0.85):
        yc = y0 + frac * (y1 - y0)
        rows = np.abs(np.arange(body.shape[1]) - yc) * sy <= 2.0
        h = col_h[rows]
        h = h[h > 0]
        if h.size == 0:
            return None
        out.append(float(np.median(h)))
    return (out[0], out[1], out[2])


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
    contours = measure.find_contours(np.pad(sl.astype(np.float32), 1), 0.5)
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
