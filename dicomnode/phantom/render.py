"""Per-slice rasteriser: paints tissue classes on one axial plane of the canonical (LPS) grid.

The painter works on a ``uint8`` class image (painter's order: later structures win). Classes below
``LEVEL_BASE`` are generic tissues; each vertebra level ``n`` owns ``LEVEL_BASE + 5 * n + part`` so that
truth labels (body, whole vertebra, trabecular core) fall out of the class image by table look-up.
Every structure is painted only inside its bounding box, which keeps a 512 x 512 slice in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.phantom.anatomy import Rib, Vertebra

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

# generic tissue classes
AIR, LUNG, FAT, VFAT, MUSCLE, ARTERY, VEIN, LIVER, KIDNEY, BOWEL, CSF, DISC, TABLE = range(13)
RIB_CORTEX, RIB_MARROW, PELVIS_CORTEX, PELVIS_MARROW = 13, 14, 15, 16
N_GENERIC = 17
LEVEL_BASE = 32
# parts of a level
P_CORE, P_MARGIN, P_CORTEX, P_VEIN, P_POST = range(5)


@dataclass(frozen=True)
class Trunk:
    """Body outline and organ layout (LPS mm); depends on z through simple piecewise-linear tables."""

    center_x: float
    center_y: float
    z_table: tuple[float, ...]  # increasing z
    half_x: tuple[float, ...]
    half_y: tuple[float, ...]
    fat_mm: float
    table: str  # "posterior", "anterior" or "none"
    z_diaphragm: float  # dome height (mm)
    z_kidney_left: float
    z_kidney_right: float
    z_liver_bottom: float
    z_spleen_bottom: float
    z_aorta_bifurcation: float
    z_ivc_confluence: float
    z_psoas_top: float
    z_s1: float
    z_acetabulum: float
    z_iliac_crest: float
    bowel: tuple[tuple[float, float, float, float], ...]  # (x, y, z, r)

    def half_axes(self, z: float) -> tuple[float, float]:
        return (
            float(np.interp(z, self.z_table, self.half_x)),
            float(np.interp(z, self.z_table, self.half_y)),
        )


class SliceCanvas:
    """A class image for one axial plane with world coordinates of its pixel centres."""

    def __init__(self, xs: F32, ys: F32) -> None:
        self.xs = xs  # (nx,) world x of each column
        self.ys = ys  # (ny,) world y of each row
        self.cls: U8 = np.zeros((ys.size, xs.size), dtype=np.uint8)
        self._dx = float(xs[1] - xs[0]) if xs.size > 1 else 1.0
        self._dy = float(ys[1] - ys[0]) if ys.size > 1 else 1.0

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice, F32, F32] | None:
        """Index slices and coordinate vectors (column (ny,1), row (1,nx)) covering the world box."""
        i0 = math.floor((x0 - float(self.xs[0])) / self._dx)
        i1 = math.ceil((x1 - float(self.xs[0])) / self._dx) + 1
        j0 = math.floor((y0 - float(self.ys[0])) / self._dy)
        j1 = math.ceil((y1 - float(self.ys[0])) / self._dy) + 1
        i0, i1 = max(0, i0), min(self.xs.size, i1)
        j0, j1 = max(0, j0), min(self.ys.size, j1)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(j0, j1), slice(i0, i1), self.xs[None, i0:i1], self.ys[j0:j1, None]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, c: int) -> None:
        if rx <= 0 or ry <= 0:
            return
        b = self.box(cx - rx, cx + rx, cy - ry, cy + ry)
        if b is None:
            return
        sj, si, x, y = b
        m = ((x - np.float32(cx)) / np.float32(rx)) ** 2 + ((y - np.float32(cy)) / np.float32(ry)) ** 2 <= 1.0
        self.cls[sj, si][m] = c

    def disks(self, pts: npt.NDArray[np.float64], radii: npt.NDArray[np.float64], c: int) -> None:
        """Paint a union of disks (pts (N, 2) world xy, radii (N,)) with class c."""
        if len(pts) == 0:
            return
        r_max = float(radii.max())
        b = self.box(
            float(pts[:, 0].min()) - r_max,
            float(pts[:, 0].max()) + r_max,
            float(pts[:, 1].min()) - r_max,
            float(pts[:, 1].max()) + r_max,
        )
        if b is None:
            return
        sj, si, x, y = b
        m = np.zeros((y.shape[0], x.shape[1]), dtype=bool)
        for (px, py), r in zip(pts, radii, strict=True):
            # each disk only touches its own small box inside the union's box
            bb = self.box(px - r, px + r, py - r, py + r)
            if bb is None:
                continue
            sj2, si2, x2, y2 = bb
            mm = (x2 - np.float32(px)) ** 2 + (y2 - np.float32(py)) ** 2 <= np.float32(r * r)
            m[sj2.start - sj.start : sj2.stop - sj.start, si2.start - si.start : si2.stop - si.start] |= mm
        self.cls[sj, si][m] = c


def _spine_line(spine: list[Vertebra], z: float) -> tuple[float, float, float]:
    """Interpolated (x, y of body centre, anterior half-depth) of the spine at height z."""
    zs = np.array([v.center[2] for v in spine])[::-1]
    xs = np.array([v.center[0] for v in spine])[::-1]
    ys = np.array([v.center[1] for v in spine])[::-1]
    bs = np.array([v.half_depth for v in spine])[::-1]
    return (float(np.interp(z, zs, xs)), float(np.interp(z, zs, ys)), float(np.interp(z, zs, bs)))


def paint_soft_tissue(cv: SliceCanvas, z: float, trunk: Trunk, spine: list[Vertebra]) -> None:
    """Body outline, fat, muscle, organs, vessels, table."""
    ax, ay = trunk.half_axes(z)
    cx, cy = trunk.center_x, trunk.center_y
    sx, sy, sb = _spine_line(spine, z)
    # table under (supine) or over (prone) the patient
    if trunk.table != "none":
        y0 = cy + ay + 2.0 if trunk.table == "posterior" else cy - ay - 16.0
        b = cv.box(cx - 230.0, cx + 230.0, y0, y0 + 14.0)
        if b is not None:
            sj, si, _, _ = b
            cv.cls[sj, si] = TABLE
    cv.ellipse(cx, cy, ax, ay, FAT)
    f = trunk.fat_mm
    cv.ellipse(cx, cy, ax - f, ay - f, MUSCLE)  # abdominal/thoracic wall
    cv.ellipse(cx, cy, ax - f - 10.0, ay - f - 10.0, VFAT)
    # lungs above the diaphragm (posterior recess lower); liver/spleen below it
    y_ant = cy - ay
    if z > trunk.z_diaphragm - 45.0:
        b = cv.box(cx - ax, cx + ax, cy - ay, cy + ay)
        if b is not None:
            sj, si, x, y = b
            inner = ((x - cx) / (ax - f - 14.0)) ** 2 + ((y - cy) / (ay - f - 14.0)) ** 2 <= 1.0
            z_dia = trunk.z_diaphragm - 45.0 * (y - y_ant) / (2.0 * ay)
            medi = (np.abs(x - sx) < 45.0) & (y < sy + sb + 30.0)
            lung = inner & (np.float32(z) > z_dia) & ~medi & ~((np.abs(x - sx) < 60.0) & (y > sy - sb))
            cv.cls[sj, si][lung] = LUNG
    if z > trunk.z_diaphragm - 5.0:  # heart
        cv.ellipse(cx + 20.0, cy - 45.0, 55.0, 45.0, VEIN)
    if trunk.z_liver_bottom < z < trunk.z_diaphragm + 10.0:
        t = (z - trunk.z_liver_bottom) / max(1.0, trunk.z_diaphragm - trunk.z_liver_bottom)
        k = min(1.0, 0.35 + 1.3 * t) * min(1.0, max(0.0, (trunk.z_diaphragm + 10.0 - z) / 25.0) + 0.3)
        cv.ellipse(cx - 60.0, cy - 10.0, 85.0 * k, 80.0 * k, LIVER)
    if trunk.z_spleen_bottom < z < trunk.z_diaphragm:
        cv.ellipse(cx + 90.0, cy + 35.0, 30.0, 42.0, LIVER)
    for side, zk in ((1, trunk.z_kidney_left), (-1, trunk.z_kidney_right)):
        dz = (z - zk) / 55.0
        if abs(dz) < 1.0:
            k = math.sqrt(1.0 - dz * dz)
            cv.ellipse(sx + side * 72.0, sy + 12.0, 28.0 * k, 22.0 * k, KIDNEY)
    for bx, by, bz, br in trunk.bowel:
        dz = (z - bz) / br
        if abs(dz) < 1.0:
            r = br * math.sqrt(1.0 - dz * dz)
            cv.ellipse(bx, by, r, r * 0.8, BOWEL)
    # muscles: paraspinal (both sides of the spinous processes), psoas (T12 down to the pelvis)
    if z > trunk.z_s1 - 60.0:
        for side in (1, -1):
            cv.ellipse(sx + side * 36.0, sy + sb + 45.0, 28.0, 24.0, MUSCLE)
    if trunk.z_acetabulum < z < trunk.z_psoas_top:
        t = (trunk.z_psoas_top - z) / max(1.0, trunk.z_psoas_top - trunk.z_s1)
        r = 6.0 + 19.0 * min(1.0, t)
        below = max(0.0, trunk.z_s1 - z)
        for side in (1, -1):
            px = sx + side * (sb * 1.35 + r + 2.0 + 0.3 * below)
            py = sy + 4.0 - 0.6 * below
            cv.ellipse(px, py, r, r * 0.9, MUSCLE)
    # aorta anterior-left of the spine, IVC anterior-right; iliac vessels below the bifurcation
    if z > trunk.z_aorta_bifurcation:
        cv.ellipse(sx + 15.0, sy - sb - 14.0, 11.0, 11.0, ARTERY)
    elif z > trunk.z_acetabulum:
        d = trunk.z_aorta_bifurcation - z
        _, yb, bb = _spine_line(spine, trunk.z_aorta_bifurcation)
        for side in (1, -1):
            cv.ellipse(sx + side * (8.0 + 0.5 * d), yb - bb - 10.0 + 0.1 * d, 6.5, 6.5, ARTERY)
    if z > trunk.z_ivc_confluence:
        if z < trunk.z_diaphragm:
            cv.ellipse(sx - 22.0, sy - sb - 9.0, 13.0, 9.0, VEIN)
    elif z > trunk.z_acetabulum:
        d = trunk.z_ivc_confluence - z
        _, yb, bb = _spine_line(spine, trunk.z_ivc_confluence)
        for side in (1, -1):
            cv.ellipse(sx + side * (12.0 + 0.5 * d), yb - bb - 4.0 + 0.1 * d, 7.5, 7.5, VEIN)


def paint_pelvis(cv: SliceCanvas, z: float, trunk: Trunk, spine: list[Vertebra]) -> None:
    """Sacrum below S1 (S2-S5 tapering and curving back), sacral alae, iliac wings, femoral heads."""
    s1 = spine[-1]
    if z < trunk.z_iliac_crest + 5.0 and z > trunk.z_acetabulum - 60.0:
        _paint_sacrum(cv, z, s1)
        _paint_ilium(cv, z, trunk, s1)


def _paint_sacrum(cv: SliceCanvas, z: float, s1: Vertebra) -> None:
    # sacral segments continue below S1 along a kyphotic curve; fused, so no discs
    sizes = (
        (40.0, 25.0, 22.0, 40.0),
        (32.0, 20.0, 20.0, 50.0),
        (25.0, 16.0, 17.0, 60.0),
        (20.0, 13.0, 14.0, 70.0),
    )
    c = np.array(s1.center)
    d_prev = np.array(s1.axis)
    h_prev = s1.height
    segs: list[Vertebra] = []
    for k, (wd, dd, h, tilt) in enumerate(sizes):
        th = math.radians(tilt) * (s1.theta / math.radians(30.0) if s1.theta else 0.0)
        d = np.array([0.0, -math.sin(th), math.cos(th)])
        c = c - d_prev * h_prev / 2 - d * (h / 2 + 2.0)
        segs.append(
            Vertebra(f"S{k + 2}", -1, (float(c[0]), float(c[1]), float(c[2])), th, wd / 2, dd / 2, h, 0.0)
        )
        d_prev, h_prev = d, h
    for seg in [s1, *segs]:
        lo, hi = seg.extent_bounds()
        if not lo - 30.0 < z < hi + 30.0:
            continue
        a, b, h = seg.half_width, seg.half_depth, seg.height
        reach = a + (38.0 if seg is s1 else 30.0 if seg.name == "S2" else 8.0)
        bx = cv.box(
            seg.center[0] - reach - 2, seg.center[0] + reach + 2, seg.center[1] - 60, seg.center[1] + 60
        )
        if bx is None:
            continue
        sj, si, x, y = bx
        u, v, w = seg.local(x, y, z)
        sub = cv.cls[sj, si]
        if seg is not s1:
            body = ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & (np.abs(w) <= h / 2 + 1.0)
            sub[body] = PELVIS_CORTEX
            inner = ((u / (a - 1.5)) ** 2 + (v / (b - 1.5)) ** 2 <= 1.0) & (np.abs(w) <= h / 2 - 0.5)
            sub[inner] = PELVIS_MARROW
        # alae (S1, S2) and the dorsal sacral plate behind the canal (all segments)
        if seg.name in ("S1", "S2"):
            # wing-shaped: the anterior border sweeps back as the ala runs laterally
            v_front = -0.5 * b + 0.45 * np.maximum(np.abs(u) - a, 0.0)
            ala = (np.abs(u) >= a - 4.0) & (np.abs(u) <= reach) & (v >= v_front) & (v <= b + 8.0)
            ala &= np.abs(w) <= h / 2 + 1.0
            sub[ala & ~(sub >= LEVEL_BASE)] = PELVIS_CORTEX
            ala_in = ala & (np.abs(u) <= reach - 1.5) & (v >= v_front + 1.5) & (v <= b + 6.5)
            sub[ala_in & ~(sub >= LEVEL_BASE)] = PELVIS_MARROW
        vc = b + 7.0
        plate = (np.abs(u) <= a * 0.9) & (v >= b) & (v <= vc + 12.0) & (np.abs(w) <= h / 2 + 1.0)
        sub[plate & ~(sub >= LEVEL_BASE)] = PELVIS_CORTEX
        canal = ((u / (a * 0.45)) ** 2 + ((v - vc) / 5.0) ** 2 <= 1.0) & (np.abs(w) <= h / 2 + 1.0)
        sub[canal] = CSF


def _paint_ilium(cv: SliceCanvas, z: float, trunk: Trunk, s1: Vertebra) -> None:
    span = trunk.z_iliac_crest - trunk.z_acetabulum
    t = (z - trunk.z_acetabulum) / span
    if t < -0.35 or t > 1.0:
        return
    sx, sy = s1.center[0], s1.center[1]
    si_x = s1.half_width + 42.0
    for side in (1, -1):
        if t >= 0.0:
            # posterior end at the sacroiliac joint, sweeping laterally then anteriorly; wider higher up
            p0 = np.array([sx + side * si_x, sy + 22.0])
            p1 = np.array([sx + side * (si_x + 30.0 + 30.0 * t), sy + 5.0 - 10.0 * t])
            p2 = np.array([sx + side * (si_x + 20.0 + 40.0 * t), sy - 40.0 - 40.0 * t])
            s = np.linspace(0.0, 1.0, 40)[:, None]
            pts = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2
            th = 5.0 + 7.0 * max(0.0, 0.4 - t) / 0.4 * 1.5
            if t > 0.92:
                pts = pts[int(40 * (t - 0.92) / 0.08 * 0.9) :]
            radii = np.full(len(pts), th)
            cv.disks(pts, radii, PELVIS_CORTEX)
            cv.disks(pts, np.maximum(radii - 2.0, 0.5), PELVIS_MARROW)
        # femoral head below the acetabular roof
        fz = trunk.z_acetabulum - 22.0
        dz = (z - fz) / 24.0
        if abs(dz) < 1.0:
            r = 24.0 * math.sqrt(1.0 - dz * dz)
            hx, hy = sx + side * (si_x + 25.0), sy - 45.0
            cv.ellipse(hx, hy, r, r, PELVIS_CORTEX)
            cv.ellipse(hx, hy, max(0.5, r - 2.0), max(0.5, r - 2.0), PELVIS_MARROW)


def paint_ribs(cv: SliceCanvas, z: float, ribs: list[Rib]) -> None:
    for rib in ribs:
        dz = np.abs(rib.points[:, 2] - z)
        sel = dz < rib.radius
        if not sel.any():
            continue
        pts = rib.points[sel, :2]
        rr = np.sqrt(np.maximum(rib.radius**2 - dz[sel] ** 2, 0.0))
        cv.disks(pts, rr, RIB_CORTEX)
        inner = rr - 1.3
        ok = inner > 0.3
        if ok.any():
            cv.disks(pts[ok], inner[ok], RIB_MARROW)


def paint_vertebra(
    cv: SliceCanvas, z: float, vert: Vertebra, upper: Vertebra | None, margins: tuple[float, float]
) -> None:
    """Posterior elements, disc above, body (cortex, trabecular margin, truth core, vein), canal.

    ``margins`` = (in-plane, axial) distance (mm) the truth core keeps from the cortex/end plates/vein.
    """
    lo, hi = vert.extent_bounds()
    disc_hi = hi
    if upper is not None:
        disc_hi = max(hi, upper.center[2])
    if not lo - 2.0 <= z <= disc_hi + 2.0:
        return
    a, b, h = vert.half_width, vert.half_depth, vert.height
    cw, cd, vc = vert.canal_half_width, vert.canal_half_depth, vert.canal_center_v
    tp = vert.transverse_length
    reach_u = cw + 6.0 + tp + 8.0
    # the whole in-plane footprint (tilt makes v stretch along y)
    cosv = max(0.3, abs(math.cos(vert.theta)))
    bx = cv.box(
        vert.center[0] - max(reach_u, a + 8.0),
        vert.center[0] + max(reach_u, a + 8.0),
        vert.center[1] - (b + 12.0) / cosv - 30.0,
        vert.center[1] + (vc + 50.0) / cosv + 30.0,
    )
    if bx is None:
        return
    sj, si, x, y = bx
    u, v, w = vert.local(x, y, z)
    sub = cv.cls[sj, si]
    n = vert.index
    post = LEVEL_BASE + 5 * n + P_POST
    au = np.abs(u)

    # disc between this body and the one above (same ellipse as the bodies, between their end plates)
    if upper is not None:
        _, _, wu = upper.local(x, y, z)
        ad = 0.5 * (a + upper.half_width)
        bd = 0.5 * (b + upper.half_depth)
        top = vert.top_w(v)
        disc = (w > top) & (wu < -upper.height / 2) & ((u / ad) ** 2 + (v / bd) ** 2 <= 1.0)
        disc &= v <= 0.85 * bd
        sub[disc & (sub < LEVEL_BASE)] = DISC
        # the canal runs through the disc level too
        canal_d = ((u / cw) ** 2 + ((v - vc) / cd) ** 2 <= 1.0) & (w > 0) & (wu < 0)
        sub[canal_d & (sub < LEVEL_BASE)] = CSF

    if vert.name != "S1":
        # arch ring around the canal (pedicles + laminae), restricted to the upper part of the body height
        ring = ((u / (cw + 6.0)) ** 2 + ((v - vc) / (cd + 6.0)) ** 2 <= 1.0) & (
            v >= vert.posterior_wall_v - 3.0
        )
        ring &= (w >= -0.45 * h) & (w <= 0.42 * h)
        # spinous process: a plate going posterior (and caudal, steeply for thoracic levels)
        slope = -0.15 if vert.is_lumbar else -0.8
        hs = 9.0 if vert.is_lumbar else 4.5
        ls = 30.0 if vert.is_lumbar else 35.0
        vs = v - (vc + cd + 2.0)
        w0 = slope * vs
        spin = (au <= 3.0) & (vs >= -3.0) & (vs <= ls) & (np.abs(w - w0) <= hs)
        # transverse processes (thoracic ones angle posteriorly)
        kt = 0.0 if vert.is_lumbar else 0.45
        vt = vc - 2.0 + kt * np.maximum(au - cw, 0.0)
        trans = (au >= cw) & (au <= cw + 6.0 + tp) & (np.abs(v - vt) <= 4.5) & (np.abs(w - 0.1 * h) <= 5.5)
        pe = ring | spin | trans
        sub[pe] = post
    # vertebral body: cortex (shell and end plates), trabecular margin, truth core, basivertebral vein
    waist = np.float32(1.0) - np.float32(0.06) * (np.float32(1.0) - np.clip((2.0 * w / h) ** 2, 0.0, 1.0))
    top = vert.top_w(v)
    bottom = -h / 2
    pw = vert.posterior_wall_v
    ell = (u / (a * waist)) ** 2 + (v / b) ** 2
    body = (ell <= 1.0) & (v <= pw) & (w >= bottom) & (w <= top)
    sub[body] = LEVEL_BASE + 5 * n + P_CORTEX
    t, te = vert.cortical_mm, vert.endplate_mm
    ell_t = (u / (a * waist - t)) ** 2 + (v / (b - t)) ** 2
    trab = (ell_t <= 1.0) & (v <= pw - t) & (w >= bottom + te) & (w <= top - te)
    sub[trab] = LEVEL_BASE + 5 * n + P_MARGIN
    m_xy, m_w = margins
    ell_c = (u / (a * waist - t - m_xy)) ** 2 + (v / (b - t - m_xy)) ** 2
    core = (ell_c <= 1.0) & (v <= pw - t - m_xy) & (w >= bottom + te + m_w) & (w <= top - te - m_w)
    # the basivertebral vein enters the posterior centre of the body (horizontal channel, ~2 mm radius)
    rv = 1.8
    vein_start = -0.3 * b
    r2 = u * u + w * w
    core &= ~((r2 <= (rv + m_xy) ** 2) & (v >= vein_start - m_xy))
    sub[core] = LEVEL_BASE + 5 * n + P_CORE
    vein = (r2 <= rv * rv) & (v >= vein_start) & (v <= pw)
    sub[vein & body] = LEVEL_BASE + 5 * n + P_VEIN
    # spinal canal (through the pedicle ring)
    canal = ((u / cw) ** 2 + ((v - vc) / cd) ** 2 <= 1.0) & (w >= bottom - 1.0) & (w <= h / 2 + 1.0)
    sub[canal] = CSF
