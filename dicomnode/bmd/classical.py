"""Classical (weight-free) vertebral body detection and level naming on a canonical CT volume.

Pipeline (all on the ~2 mm isotropic working grid, in calibrated HU, distances in mm):

1. **Body and bone.** The patient body is the largest > -400 HU component; bone is > 180 HU (cortex and
   end plates of every adult vertebra exceed this at 2 mm resolution, soft tissue and discs do not).
2. **Spinal canal.** On each axial slice the canal is a low-HU hole enclosed by bone (vertebral foramen)
   near the midline, with the vertebral body, a long run of bone, directly anterior to it. Slices where the
   arch is open (disc levels) are bridged by interpolation along z after rejecting outliers.
3. **Vertebral bodies.** Bone anterior to the canal's anterior border, within 40 mm of the canal axis,
   opened by 4 mm (cuts the aorta, psoas or osteophytes touching the body). Discs are not bone, so bodies
   separate in 3-D (tilted discs included); components taller than one vertebra are split at the narrowest
   cross-section (thin or calcified discs at thick slices).
4. **Anchors.** *Ribs*: bone outside a 45 mm core around the canal axis that reaches >= 75 mm laterally and
   passes next to the vertebra (45-62 mm off the axis, at canal depth) is a rib articulating with that
   vertebra; the lowest of the rib-bearing run from the top is T12. *Sacrum*: slices where solid bone
   connected to the body extends 28-60 mm to both sides at body depth (sacral alae, fused with the body)
   over at least 8 mm, below the lumbar column; the vertebra above is L5.
5. **Naming.** Both anchors: names agree when T12 and L5 are six vertebrae apart, otherwise every level is
   uncertain (11/13 rib pairs, transitional vertebra) and the sacrum-based names are used. One anchor:
   names from it, uncertain when its evidence is weak (one-sided ribs, a lowest rib that reaches the
   anterior half of the trunk like an 11th rib, or a stub like a lumbar rib). No anchor: uncertain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from dicomnode.bmd.grid import B, F32, CoarseGrid, body_mask, coarse_to_full, disk, make_coarse
from dicomnode.errors import AnalysisError, NotQualifyingError
from dicomnode.imaging.volume import Volume

log = logging.getLogger(__name__)

#: Normal level sequence used for naming (T13 / L6 only appear as notes).
NORMAL_LEVELS: tuple[str, ...] = (
    "C1", "C2", "C3", "C4", "C5", "C6", "C7",
    "T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12",
    "L1", "L2", "L3", "L4", "L5",
)  # fmt: skip

BONE_HU = 180.0
#: Wall threshold for the canal ring and the body outline: cortex and pedicles at 2-3 mm resolution exceed it
#: even with partial volume, discs (80-100 HU), muscle (50) and CSF/fat do not.
WALL_HU = 120.0
CANAL_MAX_HU = 100.0
CORE_HALF_WIDTH_MM = 45.0
RIB_MIN_REACH_MM = 75.0


@dataclass
class Segment:
    """One vertebral body candidate on the coarse grid."""

    label: int
    z0: int
    z1: int
    mask: B = field(repr=False)
    truncated: bool = False
    rib_l: float = 0.0  # mm3 of rib passing next to it, left / right
    rib_r: float = 0.0
    rib_reach: float = 0.0  # angular reach (rad, 0 posterior, pi anterior) of its ribs
    sacral: bool = False

    @property
    def zc(self) -> float:
        return 0.5 * (self.z0 + self.z1)

    @property
    def has_rib(self) -> bool:
        return self.rib_l > 0 or self.rib_r > 0


@dataclass
class Frame:
    """Per-slice spine geometry on the coarse grid (index units)."""

    xc: npt.NDArray[np.float64]  # canal centre x
    yc: npt.NDArray[np.float64]  # canal centre y
    ya: npt.NDArray[np.float64]  # canal anterior border y
    found: npt.NDArray[np.bool_]
    z_lo: int
    z_hi: int


def _smooth_track(values: npt.NDArray[np.float64], ok: npt.NDArray[np.bool_], win: int, tol: float) -> Any:
    """Reject outliers against a running median of the found values, then interpolate the gaps."""
    z = np.arange(values.size)
    good = ok.copy()
    for _ in range(2):
        idx = np.nonzero(good)[0]
        if idx.size < 3:
            break
        med = np.array([np.median(values[idx[np.abs(idx - k) <= win]]) for k in idx])
        bad = np.abs(values[idx] - med) > tol
        good[idx[bad]] = False
    idx = np.nonzero(good)[0]
    if idx.size == 0:
        return np.full(values.size, np.nan), good
    return np.interp(z, idx, values[idx]), good


def _fill_bright_holes(closed: B, hu2: F32, min_hu: float) -> B:
    """Fill holes of a slice mask whose median HU exceeds ``min_hu`` (marrow), not the dark canal."""
    filled = np.asarray(ndi.binary_fill_holes(closed), dtype=bool)
    holes = filled & ~closed
    if not holes.any():
        return filled
    lab, n = ndi.label(holes)
    med = ndi.median(hu2, lab, np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = np.asarray(med) > min_hu
    return np.asarray(closed | keep[lab], dtype=bool)


def _find_canal(hu: F32, body: B, g: float) -> tuple[Frame, B]:
    """Track the vertebral bodies slice by slice; the canal lies directly behind their posterior wall.

    Per slice: wall = HU > ``WALL_HU``; holes are filled only when their median is marrow-like (> 40 HU),
    never the dark canal (CSF, epidural fat), so an enclosed canal does not merge body and arch; a 7 mm
    opening keeps only thick bone (vertebral bodies, sacrum, pelvis); the body is the most posterior thick
    blob within 35 mm of the trunk midline (the aorta and abdominal organs lie in front of it).
    """
    nz, ny, nx = hu.shape
    wall = (hu > WALL_HU) & body
    st = ndi.generate_binary_structure(2, 1)
    filled_all = np.zeros_like(wall)
    xb = np.full(nz, np.nan)
    ya = np.full(nz, np.nan)
    found = np.zeros(nz, dtype=bool)
    r_open = max(1, int(round(7.0 / g)))
    st_open = disk(r_open)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for z in range(nz):
        w = wall[z]
        if w.sum() * g * g < 300.0 or not body[z].any():
            continue
        closed = ndi.binary_closing(w, structure=st) | w
        filled = _fill_bright_holes(closed, hu[z], 40.0)
        filled_all[z] = filled
        op = ndi.binary_opening(filled, structure=st_open)
        lab, n = ndi.label(op)
        if n == 0:
            continue
        bj, bi = np.nonzero(body[z])
        mid_x, mid_y = float(bi.mean()), float(bj.mean())
        idx = np.arange(1, n + 1)
        areas = ndi.sum_labels(np.ones_like(lab), lab, idx) * g * g
        cms = ndi.center_of_mass(op, lab, idx)
        best, best_y = 0, -np.inf
        for q, (area, (cy, cx)) in enumerate(zip(areas, cms, strict=True)):
            if area < 400.0 or abs(cx - mid_x) * g > 35.0 or cy < mid_y - 30.0 / g:
                continue
            if cy > best_y:
                best, best_y = q + 1, cy
        if best == 0:
            continue
        comp = lab == best
        cx = float(ndi.center_of_mass(comp)[1])
        cols = np.abs(xx - cx) * g <= 5.0
        post = yy[comp & cols]
        if post.size == 0:
            continue
        xb[z] = cx
        ya[z] = float(post.max())
        found[z] = True
    if int(found.sum()) * g < 20.0:
        raise NotQualifyingError("spine not found: no vertebral body column in view")
    win = int(round(15.0 / g))
    tol = 8.0 / g
    xs, good_x = _smooth_track(xb, found, win, tol)
    yas, good_a = _smooth_track(ya, found & good_x, win, tol)
    good = good_x & good_a
    idx = np.nonzero(good)[0]
    if idx.size * g < 20.0:
        raise NotQualifyingError("spine not found: no consistent vertebral body column in view")
    ext = int(round(12.0 / g))
    z_lo, z_hi = max(0, int(idx.min()) - ext), min(nz - 1, int(idx.max()) + ext)
    ycs = yas + 9.0 / g  # canal centre ~9 mm behind the posterior wall (lumbar canal depth ~15-18 mm)
    return Frame(xs, ycs, yas, good, z_lo, z_hi), filled_all


def _bodies(hu: F32, body: B, frame: Frame, g: float) -> B:
    """Vertebral bodies per slice: solid bone in front of the canal, near the tracked column.

    The wall mask is closed by 4 mm in-plane (thin or osteoporotic cortex leaves gaps) and its marrow-like
    holes filled; only in-plane operations, so the disc gaps between bodies stay open along z.
    """
    nz, ny, nx = hu.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    out = np.zeros(hu.shape, dtype=bool)
    r_open = max(1, int(round(4.0 / g)))
    st_open = disk(r_open)
    st_close = disk(max(1, int(round(4.0 / g))))
    for z in range(frame.z_lo, frame.z_hi + 1):
        xc, ya = frame.xc[z], frame.ya[z]
        win = (yy <= ya + 0.5) & (yy >= ya - 70.0 / g) & (np.abs(xx - xc) <= 40.0 / g)
        w = (hu[z] > WALL_HU) & body[z] & win
        if w.sum() * g * g < 100.0:
            continue
        closed = ndi.binary_closing(np.pad(w, 3), structure=st_close)[3:-3, 3:-3] | w
        reg = _fill_bright_holes(closed, hu[z], 40.0) & win
        if reg.sum() * g * g < 150.0:
            continue
        op = ndi.binary_opening(reg, structure=st_open)
        lab, n = ndi.label(op)
        if n == 0:
            continue
        # the component nearest to the point 12 mm in front of the posterior wall
        sy, sx = ya - 12.0 / g, xc
        d = ndi.labeled_comprehension(
            np.hypot(yy - sy, xx - sx), lab, np.arange(1, n + 1), np.min, float, np.inf
        )
        k = int(np.argmin(d)) + 1
        if d[k - 1] * g > 15.0:
            continue
        comp = lab == k
        comp = ndi.binary_dilation(comp, structure=ndi.generate_binary_structure(2, 1), iterations=r_open) & reg
        if comp.sum() * g * g >= 150.0:
            out[z] = comp
    return out


def _split_segments(bodies: B, g: float) -> list[Segment]:
    lab, n = ndi.label(bodies, structure=ndi.generate_binary_structure(3, 1))
    segs: list[Segment] = []
    nz = bodies.shape[0]
    objs = ndi.find_objects(lab)
    pending: list[tuple[B, int]] = []
    for q, sl in enumerate(objs):
        if sl is None:
            continue
        m = np.zeros_like(bodies)
        m[sl] = lab[sl] == q + 1
        vol = float(m.sum()) * g**3
        if vol < 1500.0:
            continue
        pending.append((m, 0))
    max_h = 42.0
    while pending:
        m, depth = pending.pop()
        zs = np.nonzero(m.any(axis=(1, 2)))[0]
        z0, z1 = int(zs.min()), int(zs.max())
        h = (z1 - z0 + 1) * g
        if h > max_h and depth < 6:
            area = m.sum(axis=(1, 2)).astype(float)
            margin = int(round(10.0 / g))
            inner = np.arange(z0 + margin, z1 - margin + 1)
            if inner.size:
                prof = ndi.uniform_filter1d(area, 3)[inner]
                zc = int(inner[int(np.argmin(prof))])
                med = float(np.median(area[z0 : z1 + 1]))
                if prof.min() < 0.75 * med:
                    lo = m.copy()
                    lo[zc:] = False
                    hi = m.copy()
                    hi[: zc + 1] = False
                    for part in (lo, hi):
                        if part.sum() * g**3 >= 1500.0:
                            pending.append((part, depth + 1))
                    continue
        segs.append(Segment(0, z0, z1, m, truncated=(z0 == 0 or z1 == nz - 1)))
    segs.sort(key=lambda s: -s.zc)  # cranial first (z grows superior)
    for i, s in enumerate(segs):
        s.label = i + 1
    return segs


def _rib_evidence(hu: F32, body: B, frame: Frame, segs: list[Segment], g: float) -> list[str]:
    """Attach rib volume passing next to each vertebra; return notes."""
    notes: list[str] = []
    nz, ny, nx = hu.shape
    xx = np.arange(nx)[None, None, :]
    xc = frame.xc[:, None, None]
    dx = (xx - xc) * g
    bone = (hu > BONE_HU) & body
    outside = bone & (np.abs(dx) >= CORE_HALF_WIDTH_MM)
    lab, n = ndi.label(outside, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return notes
    idx = np.arange(1, n + 1)
    adx = np.abs(dx) * np.ones_like(hu)
    reach = ndi.maximum(adx, lab, idx)
    vol = ndi.sum_labels(np.ones_like(hu), lab, idx) * g**3
    zs = np.arange(nz)[:, None, None] * np.ones_like(hu)
    ztop = ndi.maximum(zs, lab, idx)
    # medial end must lie inside the field of view (a rib entering from the top has an unknown head)
    ok = (reach >= RIB_MIN_REACH_MM) & (vol < 150_000.0) & (vol > 300.0)
    lut = np.zeros(n + 1, dtype=bool)
    lut[1:] = ok
    ribs = lut[lab]
    yy = np.arange(ny)[None, :, None]
    dy = (yy - frame.yc[:, None, None]) * g
    ann = ribs & (np.abs(dx) >= CORE_HALF_WIDTH_MM) & (np.abs(dx) <= 62.0) & (dy >= -30.0) & (dy <= 40.0)
    if not ann.any() or not segs:
        return notes
    # assign each annulus voxel to the nearest vertebra along z
    zc = np.array([s.zc for s in segs])
    az, ay, ax = np.nonzero(ann)
    nearest = np.argmin(np.abs(az[:, None] - zc[None, :]), axis=1)
    side_left = (ax - frame.xc[az]) > 0
    comp_of = lab[az, ay, ax]
    top_touch = {int(c) for c in np.unique(comp_of) if ztop[c - 1] >= nz - 1}
    # components whose annulus part touches the top slice: head outside the FOV
    for s_i, s in enumerate(segs):
        sel = nearest == s_i
        if not sel.any():
            continue
        comps = np.unique(comp_of[sel])
        usable = [c for c in comps if not (c in top_touch and az[sel & (comp_of == c)].max() >= nz - 2)]
        use = sel & np.isin(comp_of, usable)
        s.rib_l = float((use & side_left).sum()) * g**3
        s.rib_r = float((use & ~side_left).sum()) * g**3
        # ignore tiny contacts (< 150 mm3): a rib cross-section over 15 mm is several hundred mm3
        if s.rib_l < 150.0:
            s.rib_l = 0.0
        if s.rib_r < 150.0:
            s.rib_r = 0.0
        if s.has_rib:
            # angular reach of the rib components around the trunk (0 posterior, pi anterior)
            reach_angle = 0.0
            for c in usable:
                cz, cy, cx = np.nonzero(lab == c)
                xcz = frame.xc[cz]
                body_y = np.array([np.nonzero(body[z])[0].mean() for z in np.unique(cz)])
                ymap = dict(zip(np.unique(cz).tolist(), body_y.tolist(), strict=True))
                ty = np.array([ymap[z] for z in cz.tolist()])
                ang = np.arctan2(np.abs(cx - xcz), (cy - ty))
                reach_angle = max(reach_angle, float(np.percentile(ang, 99)))
            s.rib_reach = reach_angle
    return notes


def _sacral_slices(hu: F32, filled: B, frame: Frame, g: float) -> npt.NDArray[np.bool_]:
    nz, ny, nx = hu.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    out = np.zeros(nz, dtype=bool)
    st = disk(1)
    for z in range(frame.z_lo, frame.z_hi + 1):
        xc, ya = frame.xc[z], frame.ya[z]
        f = filled[z]
        if not f.any():
            continue
        f = ndi.binary_closing(f, structure=st) | f
        lab, n = ndi.label(f)
        sy, sx = int(round(ya - 12.0 / g)), int(round(xc))
        if not (0 <= sy < ny and 0 <= sx < nx) or lab[sy, sx] == 0:
            continue
        comp = lab == lab[sy, sx]
        band = (yy >= ya - 35.0 / g) & (yy <= ya + 15.0 / g)
        dxm = (xx - xc) * g
        left = comp & band & (dxm >= 28.0) & (dxm <= 60.0)
        right = comp & band & (dxm <= -28.0) & (dxm >= -60.0)
        if left.sum() * g * g >= 450.0 and right.sum() * g * g >= 450.0:
            out[z] = True
    return out


@dataclass(frozen=True)
class Naming:
    names: dict[int, str]  # segment label -> level
    uncertain: bool
    evidence: tuple[str, ...]


def _name(segs: list[Segment], sacrum_top: int | None, sacral_run_mm: float, g: float) -> Naming:
    ev: list[str] = []
    n = len(segs)
    # rib anchor: the run of rib-bearing vertebrae from the top
    t12: int | None = None
    rib_weak = False
    first = next((i for i, s in enumerate(segs) if s.has_rib), None)
    if first is not None:
        i = first
        while i + 1 < n and segs[i + 1].has_rib:
            i += 1
        t12 = i
        below = [j for j in range(i + 2, n) if segs[j].has_rib]
        if below:
            ev.append(f"rib-like bone at {len(below)} vertebra(e) below a rib-free one ignored (pelvis?)")
        s = segs[t12]
        if not (s.rib_l > 0 and s.rib_r > 0):
            rib_weak = True
            ev.append("lowest rib seen on one side only")
        if t12 == n - 1:
            rib_weak = True
        if s.rib_reach > np.radians(100.0):
            rib_weak = True
            ev.append(
                f"lowest rib reaches {np.degrees(s.rib_reach):.0f} deg around the trunk (an 11th rib does; "
                "a 12th usually ends behind the flank): 11 rib pairs possible"
            )
        elif s.rib_reach and s.rib_reach < np.radians(50.0):
            rib_weak = True
            ev.append(f"lowest rib is a stub ({np.degrees(s.rib_reach):.0f} deg): lumbar rib possible")
        if first == 0 and segs[0].truncated:
            pass
        ev.append(
            f"ribs articulate down to vertebra #{t12 + 1} of {n} in view (left {s.rib_l:.0f} mm3, right "
            f"{s.rib_r:.0f} mm3): T12 anchor"
        )
    # sacrum anchor
    l5: int | None = None
    sac_weak = False
    if sacrum_top is not None:
        above = [i for i, s in enumerate(segs) if s.z0 > sacrum_top - int(round(6.0 / g))]
        if above:
            l5 = max(above, key=lambda i: -segs[i].zc)  # the lowest vertebra above the sacrum
            ev.append(f"sacrum (alae fused with the body over {sacral_run_mm:.0f} mm) below vertebra #{l5 + 1}: L5 anchor")
            if sacral_run_mm < 16.0:
                sac_weak = True
                ev.append("sacral evidence short")
            if segs[l5].truncated:
                sac_weak = True
    names: dict[int, str] = {}
    uncertain = False
    base: int | None = None  # NORMAL_LEVELS index of segment 0
    i_t12 = NORMAL_LEVELS.index("T12")
    i_l5 = NORMAL_LEVELS.index("L5")
    if t12 is not None and l5 is not None:
        gap = l5 - t12
        if gap == 6:
            base = i_t12 - t12
            uncertain = rib_weak and sac_weak
            ev.append("rib and sacrum anchors agree (5 lumbar vertebrae)")
        else:
            base = i_l5 - l5
            uncertain = True
            lumbar = gap - 1
            ev.append(
                f"rib and sacrum anchors disagree ({lumbar} rib-free vertebrae above the sacrum instead of 5: "
                "11/13 rib pairs or a transitional vertebra); named from the sacrum, all levels uncertain"
            )
    elif t12 is not None:
        base = i_t12 - t12
        uncertain = rib_weak
        ev.append("named from the ribs (sacrum not in view)")
    elif l5 is not None:
        base = i_l5 - l5
        uncertain = sac_weak
        ev.append("named from the sacrum (no rib-bearing vertebra in view)")
    else:
        uncertain = True
        # no anchor: assume the first complete vertebra below any rib is L1 (lowest ribs are out of view)
        first_full = next((i for i, s in enumerate(segs) if not s.truncated), 0)
        base = NORMAL_LEVELS.index("L1") - first_full
        ev.append("neither ribs nor sacrum in view: levels guessed (top complete vertebra = L1), all uncertain")
    for i, s in enumerate(segs):
        k = base + i
        if 0 <= k < len(NORMAL_LEVELS):
            names[s.label] = NORMAL_LEVELS[k]
    return Naming(names, uncertain, tuple(ev))


@dataclass
class ClassicalContext:
    """Intermediate results the analysis reuses (tissue ROIs need the spine frame)."""

    grid: CoarseGrid
    body: B
    hu_cal: F32
    frame: Frame | None = None
    segments: list[Segment] = field(default_factory=list)


class ClassicalBackend:
    """Threshold/morphology/anatomy-based vertebral body detection and naming (no trained weights)."""

    name = "classical"
    version = "1"

    def __init__(self, **_: Any) -> None:
        pass

    def segment(self, canonical: Volume, context: ClassicalContext | None = None) -> Any:
        """Find and name vertebral bodies (see module docstring).

        Parameters
        ----------
        canonical
            The canonical volume (i -> L, j -> P, k -> S).
        context
            Precomputed working grid (optional); filled with the spine frame for the caller.

        Returns
        -------
        SpineSegmentation
        """
        from dicomnode.bmd.segmentation import SpineSegmentation

        if context is None:
            grid = make_coarse(canonical)
            context = ClassicalContext(grid, body_mask(grid.hu, grid.g), grid.hu)
        g = context.grid.g
        hu = context.hu_cal
        body = context.body
        if body.sum() * g**3 < 1.0e6:
            raise NotQualifyingError("no trunk in view (body volume below 1 litre)")
        frame, filled = _find_canal(hu, body, g)
        context.frame = frame
        bodies = _bodies(hu, body, frame, g)
        segs = _split_segments(bodies, g)
        if len(segs) < 2:
            raise NotQualifyingError(f"spine not found: {len(segs)} vertebral body candidate(s) in view")
        notes = _rib_evidence(hu, body, frame, segs, g)
        sac = _sacral_slices(hu, filled, frame, g)
        sacrum_top, run_mm = _sacrum_top(sac, segs, g)
        naming = _name(segs, sacrum_top, run_mm, g)
        context.segments = segs
        # vertebrae inside the sacrum are not vertebrae for our purpose
        coarse_labels = np.zeros(hu.shape, dtype=np.uint8)
        levels: list[str] = []
        truncated: set[str] = set()
        for s in segs:
            lvl = naming.names.get(s.label)
            if lvl is None:
                continue
            if sacrum_top is not None and s.zc < sacrum_top:
                continue
            levels.append(lvl)
            coarse_labels[s.mask] = len(levels)
            if s.truncated:
                truncated.add(lvl)
        if not levels:
            raise NotQualifyingError("no vertebra could be named")
        full = _labels_to_full(context.grid, coarse_labels, len(levels))
        ev = list(notes) + list(naming.evidence)
        log.debug("classical segmentation: %s", "; ".join(ev))
        return SpineSegmentation(
            levels=tuple(levels),
            body_labels=full,
            level_uncertain=naming.uncertain,
            evidence=tuple(ev),
            truncated=frozenset(truncated),
            hints={"frame": frame, "sacrum_top_z": sacrum_top},
        )


def _sacrum_top(sac: npt.NDArray[np.bool_], segs: list[Segment], g: float) -> tuple[int | None, float]:
    """Top slice of the caudal-most run of sacral slices (>= 8 mm), if it lies below a lumbar vertebra."""
    if not sac.any():
        return None, 0.0
    lab, n = ndi.label(sac)
    runs = []
    for q in range(1, n + 1):
        zs = np.nonzero(lab == q)[0]
        runs.append((int(zs.min()), int(zs.max())))
    runs = [r for r in runs if (r[1] - r[0] + 1) * g >= 8.0]
    if not runs:
        return None, 0.0
    # the sacrum lies below every rib-bearing vertebra (rib heads next to thoracic bodies look alike)
    rib_z = [s.z0 for s in segs if s.has_rib]
    if rib_z:
        runs = [r for r in runs if r[1] < min(rib_z)]
    if not runs:
        return None, 0.0
    lo, hi = min(runs, key=lambda r: r[0])  # caudal-most
    # at least one vertebra must lie entirely above it
    if not any(s.z0 > hi for s in segs):
        return None, 0.0
    return hi, (hi - lo + 1) * g


def _labels_to_full(grid: CoarseGrid, labels: npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.uint8]:
    out = np.zeros(grid.full_shape, dtype=np.uint8)
    from dicomnode.bmd.grid import full_bbox_of_coarse

    for q in range(1, n + 1):
        m = labels == q
        if not m.any():
            continue
        bbox = full_bbox_of_coarse(grid, m, 4.0)
        fm, _ = coarse_to_full(grid, m, bbox)
        sub = out[bbox]
        sub[fm & (sub == 0)] = q
    return out


__all__ = ["AnalysisError", "ClassicalBackend", "ClassicalContext"]
