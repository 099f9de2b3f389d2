"""Classical (weight-free) vertebral body detection and level naming on a canonical CT volume.

Pipeline (on the ~2 mm isotropic working grid, in HU after the preliminary air/fat calibration, all
sizes in mm; the numbers are anatomical sizes, not fitted to any one scan):

0. **Noise.** The working grid is brought to a common noise level (``grid.equalise_noise``).
1. **Column.** Per axial slice: wall = HU > 120 (cortex, end plates and pedicles exceed it even with partial
   volume; discs 80-100, muscle 50 and CSF/fat do not), closed, marrow-like holes filled (not the dark
   canal), opened by 7 mm: only thick bone survives. The vertebral body is the most posterior thick blob
   within 35 mm of the trunk midline that contains bright cortex and lies >= 25 mm in front of the back
   skin (the aorta and organs lie in front of it, the table behind). A blob deeper than a body (55 mm) had
   the canal filled (contrast in the epidural veins) and is split again without it. Its posterior wall gives
   the canal's front; the track is cleaned with a running median and interpolated over disc levels.
2. **Bodies.** Per slice, bone in front of the posterior wall within 40 mm of the axis; a watershed on the
   distance map (one basin per blob standing >= 2.5 mm above its saddle) splits off an enhanced aorta or
   psoas glued to the body; a 4 mm opening drops thin attachments.
3. **Discs.** Along the smoothed centreline, the mean HU on a 10 mm disk perpendicular to the column axis.
   Thick discs are dips flanked within 6 mm by brighter end plates; thin (thoracic) discs merge with their
   end plates into one bright band at 2-3 mm sampling (``_disc_candidates``); a deep dip beside a band is
   the disc of a resolved pair unless its bright flanks lie a body's height apart (the marrow of a small
   thoracic body between two merged bands, on thick or tilted slices): then both stay candidates. The
   chain of discs is chosen by dynamic programming over pairs of discs: a 14-50 mm pitch that changes
   smoothly from one vertebra to the next (each disc costs 25 HU of score), gaps of a missed disc are
   filled (``_find_discs``), and so is the column above the top disc when it is longer than 1.2 pitches of
   the vertebrae below: at one pitch (0.8-1.2) above the top disc, a dip of the profile, else a candidate
   band (a faint disc beside a dense band in the body below it falls to neither the chain nor the band
   arbitration; Basel on 4 mm slabs or tilted 5 degrees lost its T12/L1 disc so, and with it T12). Bodies
   are split by the disc planes (perpendicular to the axis, so tilted L5/S1 discs split cleanly), closed
   along the axis, and each slice replaced by the convex hull of what its cortex encloses (an enhanced
   vessel lumen pressed against the body has no cortex and is dropped).
4. **Anchors.** *Ribs*: thin bone (no 12 mm ball fits: not an enhanced organ) outside a 30 mm core that
   reaches >= 58 mm from the axis (lumbar transverse processes end before) and whose medial end reaches the
   spine (<= 40 mm), the lowest piece of a side dropped when its head end lies far in front of the rib heads
   above it (an enhanced kidney reached by its artery); each rib is credited to the body nearest to its head
   along the column axis (the medial-cranial extreme of the rib: the lower ribs run down and out, the 12th
   lies at L1's level 45-60 mm out); ribs belong to the run of rib-bearing vertebrae from the top, one missed
   pair tolerated (iliac crests next to L4/L5 are not ribs); the lowest of that run is T12.
   *First rib*: when the scan reaches above the lung apices and no rib is cut by its top edge, the rib
   heads are counted per side from the first rib down, ordered along the column's own axis
   (``_count_from_top``); the count is used only when both sides agree and the heads are evenly spaced.
   *Sacrum*: walking up from the lowest vertebra, the highest piece with an ala: >= ``ALA_MIN_MM3`` of
   solid bone joined to the body 28-60 mm beside it on one side, summed between its own disc planes (a
   volume, so noise or thick slices that break the ala on a few slices lower it a little instead of
   removing it, and a steep lumbosacral disc does not hand S1's alae to L5); both sides: strong evidence.
   The run of pieces with alae may pass one without them when the piece above has alae on both sides (a
   lower sacral piece split off by a tilted plane, pelvic bone below it). The vertebra above it is L5.
5. **Naming.** Both anchors: names agree when five rib-free vertebrae lie between them (T12 ... L5);
   otherwise every level is uncertain (11/13 rib pairs, transitional vertebra) and the sacrum-based names
   are used. No anchor: uncertain. One anchor: names from it, confident only when the anchor is
   unambiguous (lumbar ribs 5.8 %, lumbosacral transitional vertebrae 9-30 %, lumbar miscount ~10 %;
   clinical.md 4.3), otherwise ``level_uncertain`` with the reason in the evidence:

   * *ribs only*: the lowest rib-bearing vertebra is T12 when the lowest rib pair has the length of a 12th
     (``_lowest_rib_note``): the lower ribs taper, the 11th about four fifths of the 10th, the 12th about
     half the 11th (Todd, table A), and a rib under 38 mm is not a thoracic rib (Yun 2018). Uncertain when
     the lowest pair is short (< 38 mm, or < 1/3 of the pair above: a lumbar rib or a hypoplastic 12th),
     long against the pair above (>= 2/3 of it: an 11th, 11 rib pairs possible), under a pair that is >= 0.85
     of the pair above it (a 10th against a 9th, not an 11th against a 10th), < 90 mm with no pair above
     in view to compare, or reaches round to the front of the flank like an 11th rib (> 100 deg), or is seen
     on one side only (a 12th whose partner was missed, or a rib credited one vertebra low). Rib
     length is the geodesic path through the rib's voxels from its head (``_rib_length``). A 13th pair as
     long as a 12th (13 pairs: 0.37 %) is not told from a 12th by the ribs alone.
   * *sacrum only*: uncertain when the sacral evidence is one-sided, or when the vertebra above the
     sacrum itself has >= 4 mm of slices (upper two thirds of it: the alae rise beside the lower end of a
     normally tilted L5) where bone joined to it reaches the ala / ilium, or >= ``LSTV_ALA_MM3`` of bone
     beside it on a side: a sacralised L5 (large transverse processes touching or fused to the sacrum /
     ilium) or a partly fused, lumbarised S1.

   With both anchors in view and five rib-free vertebrae between them a short 12th rib is confirmed and
   the names stay confident. A count from the first rib is a second anchor for the ribs: twelve pairs with
   the twelfth on the lowest rib-bearing vertebra confirm the T12 anchor (a short, one-sided or
   long-reaching lowest pair is then no reason for doubt); any other count (11 or 13 pairs, or a missed
   rib) disagrees and every level is uncertain.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from dicomnode.bmd.grid import (
    F32,
    B,
    CoarseGrid,
    background_holes,
    binary_closing_2d,
    binary_opening_2d,
    body_mask,
    coarse_to_full,
    disk,
    make_coarse,
    sparse_binary_opening,
)
from dicomnode.bmd.segmentation import SpineSegmentation
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
#: A vertebral body is at most this deep (AP, mm; lumbar end plates 30-40 mm, spine-anatomy.md 1): a deeper
#: blob on the midline has the neural arch joined to it.
BODY_MAX_DEPTH_MM = 55.0
CORE_HALF_WIDTH_MM = 45.0
#: Rib bone is looked for outside this half width around the axis: the vertebral body (half width 15-25 mm)
#: is inside, the rib heads and necks (25-50 mm out, where they articulate) are outside.
RIB_HEAD_CORE_MM = 30.0
#: Rib heads and necks articulate with the bodies and transverse processes 20-35 mm from the midline: rib
#: bone that comes no closer than this does not reach the spine (35 mm plus two working voxels: the thin
#: medial end of a rib comes and goes by a voxel with the reconstruction grid; the scapula, the nearest
#: other thin bone, stays > 50 mm out).
RIB_HEAD_MAX_MM = 40.0
#: The lowest rib-like piece of a side whose head end lies more than this in front of the rib heads above it
#: is not a rib (``_drop_organ_below_the_ribs``).
RIB_HEAD_FRONT_MM = 20.0
#: The lower ribs run down by roughly 0.5-1 mm for every mm out from their heads: the head is found as the
#: extreme of (distance out - this x height).
RIB_HEAD_SLOPE = 0.7
#: Ribs are 5-10 mm thick (up to 12 mm with partial volume): bone holding a ball this wide is not rib.
RIB_MAX_THICK_MM = 12.0
#: Score cost of one disc in the disc chain (HU of dip depth): end plate/disc contrast is 50-150 HU.
DISC_COST = 25.0
#: Rib bone reaches at least this far from the axis: lumbar transverse processes end 10-19 mm beyond the
#: pedicle (L3 the longest; spine-anatomy.md 3.1), i.e. within about 50 mm of the midline (a body half
#: width of 20-25 mm, the pedicle, then the process). A short 12th rib reaches only 60-75 mm out, and its
#: thin lateral tip comes and goes with the reconstruction grid (partial volume): the margin lies between.
RIB_MIN_REACH_MM = 58.0
#: A lowest rib shorter than this (geodesic length from its head) is a short rib: a thoracic vertebra bears
#: ribs >= 38 mm long, shorter ones mark a thoracolumbar transitional vertebra (Yun et al., Korean J Radiol
#: 2018;19:1140; spine-anatomy.md 2). See ``_lowest_rib_note``.
RIB_SHORT_MM = 38.0
#: A lowest rib shorter than this fraction of the rib pair above is a rudimentary rib, not a 12th: a 12th rib
#: is about half the 11th (arc lengths ~114 vs ~210 mm, Todd's Cyclopaedia, table A; spine-anatomy.md 2.2;
#: the LIDC patient's 12th measures 0.48-0.59 of its 11th on every grid tried), while a rib shorter than
#: 38 mm, a third of a full 12th, marks a thoracolumbar transitional vertebra or a lumbar rib (Yun 2018). It
#: is the same criterion as ``RIB_SHORT_MM``, scaled to the patient's own ribs.
RIB_SHORT_RATIO = 1.0 / 3.0
#: A lowest rib at least this fraction of the pair above continues the series like an 11th rib does (the
#: 11th is about four fifths of the 10th, Todd table A: 210 vs 267 mm), not like a 12th (about half the 11th):
#: with 11 rib pairs (8 %, spine-anatomy.md 2.3) the lowest rib-bearing vertebra is T11. The cut lies between
#: the two ratios.
RIB_ELEVENTH_RATIO = 2.0 / 3.0
#: The lower ribs' taper steepens towards the 12th: each of the 8th to 12th against the one above is 0.99,
#: 0.95, 0.91, 0.79, 0.55 (absolute lengths, Todd's Cyclopaedia, table A: 12.25, 12.10, 11.50, 10.50, 8.25,
#: 4.50 in). The pair above a 12th is an 11th, markedly shorter than the 10th; with 11 rib pairs the pair
#: above the lowest is a 10th, nearly as long as the 9th. So when the pair above the lowest is at least this
#: fraction of its own upper neighbour, 11 rib pairs are possible (the cut lies between 0.79 and 0.91).
RIB_TENTH_RATIO = 0.85
#: With no rib pair above in view to compare, a lowest pair at least this long (a full 12th rib, ~114 mm
#: arc in Todd's table) is taken as the 12th; a shorter one may be a lumbar rib.
RIB_LONE_MIN_MM = 90.0
#: Sacral-looking slices (mm) beside the vertebra above the sacrum that make a transitional vertebra possible.
LSTV_MIN_MM = 4.0
#: Least volume (mm3) of solid bone joined to a vertebra 28-60 mm to one side of it, between its disc planes,
#: that is a sacral ala. S1's ala is a lateral mass of about 30 x 30 x 30 mm joined to the ilium; a lumbar
#: transverse process is a bar of about 10 x 10 mm section, a few cm3 in that band at most. Seen on the
#: Basel CT across its metamorphic copies: S1 7.5-11.8 cm3 a side, L5 1.6-3.6 cm3.
ALA_MIN_MM3 = 6000.0
#: Lateral bone beside the vertebra above the sacrum that makes a transitional vertebra possible when the
#: sacrum is the only anchor: three quarters of an ala, well above a normal L5's transverse processes
#: (1.6-3.6 cm3 a side on the Basel copies), where a dysplastic process (>= 19 mm tall, Castellvi I) or one
#: articulating with the sacrum lies.
LSTV_ALA_MM3 = 4500.0


#: Vertebral bodies are not traced on the outermost slices of a scan: a body that reaches this close to the
#: top or bottom edge with no disc plane between is taken to be cut by the field of view.
EDGE_MM = 12.0
#: The first rib is surely in view when the top of the scan lies above the lung apices by this much.
TOP_FREE_MM = 6.0
#: Two rib pieces of one side whose heads lie closer than this (3-D) are one rib (the heads of consecutive
#: ribs lie >= 17 mm apart, the vertebral pitch at T1-T4).
TOP_MERGE_MM = 12.0
#: A spacing between consecutive rib heads above this multiple of its neighbours' (up to two each side) is a
#: missed rib, below its inverse a stray piece: the vertebral pitch changes smoothly down the thorax (~20 mm
#: at T1-T4 to ~30 mm at T11-T12).
TOP_GAP_RATIO = 1.6
#: The left and right heads of one pair are offset (along the column and front-back, beyond the offset
#: common to all pairs) by less than this fraction of the local spacing (a pair shifted by one rib is offset
#: by a whole spacing).
TOP_PAIR_RATIO = 0.6


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
    rib_len_l: float = 0.0  # path length (mm) of its rib outside the spine core, left / right
    rib_len_r: float = 0.0
    sacral: bool = False
    sacral_mm: float = 0.0  # extent (mm) of its slices where bone joined to it looks sacral (ala / ilium)
    ala_mm3: float = (
        0.0  # the larger side's volume of solid bone joined to it 28-60 mm out (``_ala_volumes``)
    )
    slab: int = -1  # number of disc planes below it (its place between the discs)
    rib_inferred: bool = False  # rib-free between two rib-bearing vertebrae: a missed rib pair

    @property
    def zc(self) -> float:
        return 0.5 * (self.z0 + self.z1)

    @property
    def has_rib(self) -> bool:
        return self.rib_l > 0 or self.rib_r > 0 or self.rib_inferred


@dataclass
class RibHead:
    """The medial (head) end of one rib piece that reaches the spine, working-grid index units."""

    z: float
    y: float
    x: float
    left: bool
    top_cut: bool  # the piece reaches the top slices of the scan (it may continue above the field of view)
    segment: int  # index of the vertebra (in view) it was credited to


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


def _fill_bright_holes(closed: B, hu2: F32, min_hu: float, behind_y: float | None = None) -> B:
    """Fill holes of a slice mask whose median HU exceeds ``min_hu`` (marrow), not the dark canal.

    ``behind_y``: holes whose centre lies behind this row (the canal behind a body's centre) stay open.
    """
    # the holes, labelled as ``ndi.label(binary_fill_holes(closed) & ~closed)`` labels them: the
    # background's 4-connected components that do not reach the slice's edge, numbered in scan order
    bg, hole = background_holes(closed)
    hole_ids = np.flatnonzero(hole)
    if hole_ids.size == 0:
        return np.array(closed, dtype=bool)
    n = int(hole_ids.size)
    renumber = np.zeros(hole.size, dtype=np.int32)
    renumber[hole_ids] = np.arange(1, n + 1, dtype=np.int32)
    lab = renumber[bg]
    holes = lab > 0
    idx = np.arange(1, n + 1)
    med = np.asarray(ndi.median(hu2, lab, idx))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = med > min_hu
    if behind_y is not None:
        cy = np.array([c[0] for c in ndi.center_of_mass(holes, lab, idx)])
        keep[1:] &= cy <= behind_y
    return np.asarray(closed | keep[lab], dtype=bool)


def _body_blob(
    filled: B, hu2: F32, st_open: B, mid_x: float, mid_y: float, skin: float, g: float, xx: Any, yy: Any
) -> tuple[float, float, float, float] | None:
    """The vertebral body on one slice: the most posterior thick blob within 35 mm of the trunk midline
    with bright cortex inside, >= 25 mm in front of the back skin. Returns its centre x, its posterior wall
    row and its depth (rows) along the midline, and its centre row; None when there is none."""
    op = binary_opening_2d(filled, st_open)
    lab, n = ndi.label(op)
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones_like(lab), lab, idx) * g * g
    cms = ndi.center_of_mass(op, lab, idx)
    # bright cortex inside (not the table or an enhanced organ) and well inside the back (>= 25 mm)
    cortex = np.asarray(ndi.mean(hu2 > 200.0, lab, idx)) >= 0.1
    back = skin if np.isfinite(skin) else np.inf
    best, best_y = 0, -np.inf
    for q, (area, (cy, cx)) in enumerate(zip(areas, cms, strict=True)):
        if area < 400.0 or abs(cx - mid_x) * g > 35.0 or cy < mid_y - 30.0 / g:
            continue
        if not cortex[q] or (back - cy) * g < 25.0:
            continue
        if cy > best_y:
            best, best_y = q + 1, cy
    if best == 0:
        return None
    comp = lab == best
    cy, cx = (float(v) for v in ndi.center_of_mass(comp))
    post = yy[comp & (np.abs(xx - cx) * g <= 5.0)]
    if post.size == 0:
        return None
    return cx, float(post.max()), float(post.max() - post.min() + 1), cy


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
    r_open = max(1, round(7.0 / g))
    st_open = disk(r_open)
    yy, xx = np.mgrid[0:ny, 0:nx]
    # posterior skin line near the midline per slice (the table, when it touches the back, is not body)
    skin_y = np.full(nz, np.nan)
    for z in range(nz):
        cols = body[z].any(axis=0)
        if cols.any():
            xs = np.nonzero(cols)[0]
            xm = round(xs.mean())
            ys = np.nonzero(body[z][:, max(0, xm - 3) : xm + 4].any(axis=1))[0]
            skin_y[z] = float(ys.max()) if ys.size else np.nan
    for z in range(nz):
        w = wall[z]
        if w.sum() * g * g < 300.0 or not body[z].any():
            continue
        closed = binary_closing_2d(w, st) | w
        filled = _fill_bright_holes(closed, hu[z], 40.0)
        bj, bi = np.nonzero(body[z])
        mid_x, mid_y = float(bi.mean()), float(bj.mean())
        hit = _body_blob(filled, hu[z], st_open, mid_x, mid_y, skin_y[z], g, xx, yy)
        if hit is not None and hit[2] * g > BODY_MAX_DEPTH_MM:
            # deeper than any vertebral body: the canal was filled with the marrow (contrast-enhanced
            # epidural veins lift its median above the marrow threshold) and the arch joined the body;
            # fill again without the hole behind the body's centre
            filled = _fill_bright_holes(closed, hu[z], 40.0, behind_y=hit[3])
            hit = _body_blob(filled, hu[z], st_open, mid_x, mid_y, skin_y[z], g, xx, yy)
            if hit is not None and hit[2] * g > BODY_MAX_DEPTH_MM:
                hit = None
        filled_all[z] = filled
        if hit is None:
            continue
        xb[z], ya[z] = hit[0], hit[1]
        found[z] = True
    if int(found.sum()) * g < 20.0:
        raise NotQualifyingError("spine not found: no vertebral body column in view")
    win = round(15.0 / g)
    tol = 8.0 / g
    xs, good_x = _smooth_track(xb, found, win, tol)
    yas, good_a = _smooth_track(ya, found & good_x, win, tol)
    good = good_x & good_a
    idx = np.nonzero(good)[0]
    if idx.size * g < 20.0:
        raise NotQualifyingError("spine not found: no consistent vertebral body column in view")
    ext = round(12.0 / g)
    z_lo, z_hi = max(0, int(idx.min()) - ext), min(nz - 1, int(idx.max()) + ext)
    ycs = yas + 9.0 / g  # canal centre ~9 mm behind the posterior wall (lumbar canal depth ~15-18 mm)
    return Frame(xs, ycs, yas, good, z_lo, z_hi), filled_all


def _bodies(hu: F32, body: B, frame: Frame, g: float) -> B:
    """Vertebral bodies per slice: solid bone in front of the canal, near the tracked column.

    The wall mask is closed by 4 mm in-plane (thin or osteoporotic cortex leaves gaps) and its marrow-like
    holes filled; only in-plane operations, so the disc gaps between bodies stay open along z. Anything the
    closing glued to the body (an enhanced aorta, the psoas, an osteophyte) is split off by a watershed on
    the distance map (one basin per thick blob), and thin attachments by a 4 mm opening.
    """
    from skimage import morphology, segmentation

    h_maxima: Any = morphology.h_maxima  # untyped library functions
    watershed: Any = segmentation.watershed

    _, ny, nx = hu.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    out = np.zeros(hu.shape, dtype=bool)
    r_open = max(1, round(4.0 / g))
    st_open = disk(r_open)
    st_close = disk(max(1, round(2.0 / g)))
    grow = ndi.generate_binary_structure(2, 1)
    # Each slice works on a crop: the window's bounding box plus a margin wider than any structuring
    # element reaches (closing, opening, regrowth), clipped to the slice. Every result lies inside the
    # window, so the crop gives the same masks as the whole slice (about 20 times fewer pixels).
    margin = 2 * r_open + 2 * st_close.shape[0] + 4
    for z in range(frame.z_lo, frame.z_hi + 1):
        xc, ya = frame.xc[z], frame.ya[z]
        win_full = (yy <= ya + 0.5) & (yy >= ya - 70.0 / g) & (np.abs(xx - xc) <= 40.0 / g)
        rows = np.nonzero(win_full.any(axis=1))[0]
        cols = np.nonzero(win_full.any(axis=0))[0]
        if rows.size == 0:
            continue
        crop = (
            slice(max(0, int(rows[0]) - margin), min(ny, int(rows[-1]) + margin + 1)),
            slice(max(0, int(cols[0]) - margin), min(nx, int(cols[-1]) + margin + 1)),
        )
        win = win_full[crop]
        hu2 = hu[z][crop]
        cy_, cx_ = yy[crop], xx[crop]
        w = (hu2 > WALL_HU) & body[z][crop] & win
        if w.sum() * g * g < 100.0:
            continue
        closed = binary_closing_2d(np.pad(w, 3), st_close)[3:-3, 3:-3] | w
        reg = _fill_bright_holes(closed, hu2, 40.0) & win
        if reg.sum() * g * g < 150.0:
            continue
        dist = ndi.distance_transform_edt(reg)
        # one marker per thick blob: maxima of the distance map standing >= 2.5 mm above their saddle
        # (a neck to the aorta is a deep saddle; the irregular outline of one body is not)
        hmax = h_maxima(dist, 2.5 / g) & (dist >= 4.0 / g)
        markers, n_mark = ndi.label(hmax, structure=np.ones((3, 3), dtype=bool))
        sy, sx = ya - 12.0 / g, xc
        if n_mark > 1:
            basins = watershed(-dist, markers, mask=reg)
            # the basin nearest to the point 12 mm in front of the posterior wall
            dmin = ndi.labeled_comprehension(
                np.hypot(cy_ - sy, cx_ - sx), basins, np.arange(1, n_mark + 1), np.min, float, np.inf
            )
            reg = basins == int(np.argmin(dmin)) + 1
        op = binary_opening_2d(reg, st_open)
        lab, n = ndi.label(op)
        if n == 0:
            continue
        d = ndi.labeled_comprehension(
            np.hypot(cy_ - sy, cx_ - sx), lab, np.arange(1, n + 1), np.min, float, np.inf
        )
        k = int(np.argmin(d)) + 1
        if d[k - 1] * g > 15.0:
            continue
        comp = ndi.binary_dilation(lab == k, structure=grow, iterations=r_open) & reg
        if comp.sum() * g * g >= 150.0:
            out[z][crop] = comp
    return out


@dataclass
class Column:
    """Smoothed body centreline (coarse index units) and its unit tangent (z, y, x) per slice."""

    yb: npt.NDArray[np.float64]
    xb: npt.NDArray[np.float64]
    tangent: npt.NDArray[np.float64]  # (nz, 3)


def _centreline(bodies: B, frame: Frame, g: float) -> Column:
    """Body centreline from slices with a well-formed body (area >= half the local maximum; partial slices
    at the end plates and discs are ignored), interpolated and smoothed over ~20 mm (the lordotic curve
    bends by less than ~10 degrees over that length), with its tangent."""
    nz = bodies.shape[0]
    area = bodies.sum(axis=(1, 2)).astype(float)
    local_max = ndi.maximum_filter1d(area, max(3, round(30.0 / g)), mode="nearest")
    yb = np.full(nz, np.nan)
    for z in range(nz):
        if area[z] > 0 and area[z] >= 0.5 * local_max[z]:
            yb[z] = np.nonzero(bodies[z])[0].mean()
    ok = np.isfinite(yb)
    zz = np.arange(nz)
    if ok.sum() < 2:
        raise NotQualifyingError("spine not found: vertebral bodies not traceable")
    yb = np.interp(zz, zz[ok], yb[ok])
    sigma = 8.0 / g
    yb = ndi.gaussian_filter1d(yb, sigma, mode="nearest")
    xb = ndi.gaussian_filter1d(frame.xc, sigma, mode="nearest")
    t = np.stack([np.ones(nz), np.gradient(yb), np.gradient(xb)], axis=1)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return Column(yb, xb, t)


def _plane_basis(t: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    u = np.array([0.0, 0.0, 1.0]) - t * t[2]
    u /= np.linalg.norm(u)
    return u, np.cross(t, u)


def _axial_profile(hu: F32, col: Column, z_lo: int, z_hi: int, g: float, radius_mm: float = 10.0) -> Any:
    """Mean HU on a disk (radius 10 mm) perpendicular to the column axis, centred on the body, per slice."""
    nz = hu.shape[0]
    r = radius_mm / g
    a = np.arange(-r, r + 1e-6, 0.75)
    aa, bb = np.meshgrid(a, a, indexing="ij")
    keep = aa**2 + bb**2 <= r * r
    pa, pb = aa[keep], bb[keep]
    p = np.full(nz, np.nan)
    for z in range(z_lo, z_hi + 1):
        t = col.tangent[z]
        u, v = _plane_basis(t)
        c = np.array([z, col.yb[z], col.xb[z]])
        pts = c[None, :] + pa[:, None] * u[None, :] + pb[:, None] * v[None, :]
        p[z] = float(ndi.map_coordinates(hu, pts.T, order=1, mode="nearest").mean())
    return p


#: Weight of a band's score against a dip's in the disc chain.
BAND_WEIGHT = 0.7
#: A dip within 8 mm of a band is the disc of a resolved end-plate pair when its depth is at least this
#: fraction of the band's prominence. Chosen between the two real CTs we have (a 42 HU disc dip beside a
#: 101 HU band of end plate and bone island: disc, 0.42; a 37 HU marrow dip beside a 106 HU merged thoracic
#: band: marrow, 0.35): a narrow margin, a figure to revisit with more data.
DIP_VS_BAND = 0.4
#: The end plates around a disc lie a disc's height apart (lumbar 8-12 mm, thoracic 3-6 mm; spine-anatomy.md
#: 1), the end-plate bands around a body's marrow a body's height (thoracic 17-23 mm, lumbar 25-30 mm). A
#: deep dip beside a band whose bright flanks (``_flank_span``) lie at least this far apart may be marrow:
#: the band is kept as a candidate beside it (``_disc_candidates``). The Basel CT's resolved lumbar discs
#: span 12-16 mm, the marrow dips of the LIDC thorax on tilted 2.5 mm slabs 18-24 mm.
MARROW_SPAN_MM = 18.0


def _smoothed(p: npt.NDArray[np.float64], g: float) -> Any:
    """The column profile smoothed over 1 mm (its gaps filled with its median), for its peaks and flanks."""
    return ndi.gaussian_filter1d(np.where(np.isfinite(p), p, np.nanmedian(p)), 1.0 / g, mode="nearest")


def _flanks(
    ps: npt.NDArray[np.float64], z: int, g: float, lo: int = 0, hi: int | None = None
) -> tuple[int, int]:
    """The bright flanks of the dip of the profile ``ps`` at ``z``: from the dip's lowest point (within 4 mm),
    uphill on each side to the first peak, not past ``lo`` and ``hi``. Around a disc these are its two end
    plates, around a body's marrow the two end-plate bands."""
    hi = ps.size - 1 if hi is None else hi
    r = max(1, round(4.0 / g))
    lo_i = max(lo, z - r)
    m = lo_i + int(np.argmin(ps[lo_i : min(hi, z + r) + 1]))
    a = m
    while a > lo and ps[a - 1] >= ps[a]:
        a -= 1
    b = m
    while b < hi and ps[b + 1] >= ps[b]:
        b += 1
    return a, b


def _flank_span(ps: npt.NDArray[np.float64], z: int, g: float) -> float:
    """Distance (mm) between the bright flanks (``_flanks``) of the dip of the profile ``ps`` at ``z``."""
    a, b = _flanks(ps, z, g)
    return float((b - a) * g)


#: Least depth (HU) of a dip of the column profile: below the peak of its darker flank (the brightest point
#: within 6 mm on that side).
DIP_MIN_HU = 12.0


def _dips(p: npt.NDArray[np.float64], z_lo: int, z_hi: int, g: float) -> dict[int, float]:
    """The dips of the column profile ``p`` between ``z_lo`` and ``z_hi``: local maxima of the depth below
    the brightest point within 6 mm on each side (the darker side counts), >= ``DIP_MIN_HU``."""
    nz = p.size
    k0, k1 = 1, max(2, round(6.0 / g))
    d = np.full(nz, -np.inf)
    for z in range(max(0, z_lo) + k1, min(nz - 1, z_hi) - k1 + 1):
        lo, hi = p[z - k1 : z - k0 + 1], p[z + k0 : z + k1 + 1]
        if np.isfinite(lo).any() and np.isfinite(hi).any() and np.isfinite(p[z]):
            d[z] = min(np.nanmax(lo), np.nanmax(hi)) - p[z]
    return {
        z: float(d[z])
        for z in range(nz)
        if np.isfinite(d[z])
        and d[z] >= DIP_MIN_HU
        and d[z] >= d[max(0, z - 1)]
        and d[z] >= d[min(nz - 1, z + 1)]
    }


def _disc_candidates(p: npt.NDArray[np.float64], z_lo: int, z_hi: int, g: float) -> dict[int, float]:
    """Disc candidates along the column profile, with a score in HU.

    A disc complex is end plate, disc, end plate. Where the disc is thick (lumbar discs, 8-12 mm) it is
    resolved as a *dip* flanked within 6 mm by the brighter end plates on both sides. Where it is thin
    (thoracic discs, 3-6 mm) the two end plates merge into one bright *band* at 2-3 mm sampling, with
    marrow 6-16 mm away on both sides; its centre is the disc. Which of the two a disc looks like depends
    on the disc's thickness and the slice thickness, not on the patient's bone density, so both are
    candidates. A band is only taken where no dip lies inside it (a resolved pair of end plates is one
    disc, not two bands). Mid-body dips (the marrow between the end plates of one small body) qualify as
    weak dips, and bright foci in a body (a bone island) as bands; the chain's pitch consistency
    (``_find_discs``) chooses among them.
    """
    dips = _dips(p, z_lo, z_hi, g)
    ps = _smoothed(p, g)
    near, far = max(2, round(5.0 / g)), max(3, round(16.0 / g))
    bands: dict[int, float] = {}
    for z in range(z_lo + near, z_hi - near + 1):
        if not (ps[z] >= ps[z - 1] and ps[z] >= ps[z + 1]):
            continue
        left = ps[max(z_lo, z - far) : z - near + 1]
        right = ps[z + near : min(z_hi, z + far) + 1]
        if left.size == 0 or right.size == 0:
            continue
        score = float(ps[z] - max(left.min(), right.min()))
        if score >= 30.0:
            bands[z] = score
    # a band and a dip within 8 mm: the band is an end plate of a resolved pair (the dip is the disc) when
    # the dip is deep against it; a shallow dip beside a strong band is the marrow of a small body next to
    # a merged band (the band is the disc). A deep dip whose bright flanks lie a body's height apart may be
    # either (a small thoracic body's marrow between two merged bands on thick or tilted slices, or a thick
    # disc): both stay, and the chain's pitch and scores choose.
    for zb, sb in list(bands.items()):
        for zd, sd in list(dips.items()):
            if abs(zb - zd) * g <= 8.0 and zb in bands and zd in dips:
                if sd < DIP_VS_BAND * sb:
                    dips.pop(zd)
                elif _flank_span(ps, zd, g) < MARROW_SPAN_MM:
                    bands.pop(zb)
    # a resolved dip is direct evidence of a disc, a band indirect (an end plate of a resolved pair, or a
    # bone island, is a band too): bands count for less, and the chain's pitch decides between neighbours
    cands = {**{z: BAND_WEIGHT * v for z, v in bands.items()}, **dips}
    # non-maximum suppression within 6 mm
    kept: dict[int, float] = {}
    for z in sorted(cands, key=lambda q: -cands[q]):
        if all(abs(z - k) * g > 6.0 for k in kept):
            kept[z] = cands[z]
    return kept


#: Vertebral pitch (body + disc, mm) from the upper thoracic spine (~17 mm) to the lower lumbar (~40 mm),
#: with room for a large or a collapsed body.
PITCH_MIN_MM, PITCH_MAX_MM = 14.0, 50.0
#: Neighbouring pitches differ by ~5-15 % along a healthy spine (``PITCH_FREE``: no cost); a compression
#: fracture (grade 3: > 40 % height loss) shortens one pitch by up to ~40 %. The cost rises linearly in
#: log(ratio) to ``PITCH_PENALTY`` (HU of score) at ``PITCH_CHANGE``; a change beyond a factor 2.2 (two discs
#: missed) is not allowed.
PITCH_FREE = 1.15
PITCH_CHANGE = 1.6
PITCH_PENALTY = 60.0


def _find_discs(p: npt.NDArray[np.float64], z_lo: int, z_hi: int, g: float) -> list[int]:
    """Intervertebral discs: the best-scoring chain of disc candidates (``_disc_candidates``) with a
    vertebral pitch of 14-50 mm that changes smoothly from one vertebra to the next (dynamic programming
    over pairs of consecutive discs; each disc costs ``DISC_COST`` so that weak mid-body dips never beat
    real discs); gaps left by a missed disc are filled with the best candidate available."""
    cands = _disc_candidates(p, z_lo, z_hi, g)
    if not cands:
        return []
    c = sorted(cands)
    sc = [cands[z] - DISC_COST for z in c]
    n = len(c)
    lo_step, hi_step = PITCH_MIN_MM / g, 2.2 * PITCH_MAX_MM / g
    preds: list[list[int]] = [[j for j in range(i) if lo_step <= c[i] - c[j] <= hi_step] for i in range(n)]

    def jump(j: int, i: int) -> float:
        return 0.0 if (c[i] - c[j]) * g <= PITCH_MAX_MM else PITCH_PENALTY

    def change(k: int, j: int, i: int) -> float:
        r = (c[i] - c[j]) / (c[j] - c[k])
        if r > 2.2 or r < 1.0 / 2.2:
            return np.inf
        excess = (abs(np.log(r)) - np.log(PITCH_FREE)) / (np.log(PITCH_CHANGE) - np.log(PITCH_FREE))
        return float(PITCH_PENALTY * np.clip(excess, 0.0, 1.0))

    # best[(j, i)]: best chain ending with discs j then i; start[i]: chain of i alone
    best: dict[tuple[int, int], float] = {}
    back: dict[tuple[int, int], tuple[int, int] | None] = {}
    for i in range(n):
        for j in preds[i]:
            v, b = sc[j] + sc[i] - jump(j, i), None
            for k in preds[j]:
                prev = best.get((k, j))
                if prev is None:
                    continue
                cand = prev + sc[i] - jump(j, i) - change(k, j, i)
                if cand > v:
                    v, b = cand, (k, j)
            best[(j, i)], back[(j, i)] = v, b
    single = int(np.argmax(sc))
    if not best or sc[single] >= max(best.values()):
        chain = [c[single]]
    else:
        key: tuple[int, int] | None = max(best, key=lambda q: best[q])
        idx: list[int] = []
        while key is not None:
            idx.append(key[1])
            prev_key = back[key]
            if prev_key is None:
                idx.append(key[0])
            key = prev_key
        chain = sorted(c[q] for q in idx)
    return _fill_gaps(_resolved_discs(chain, p, z_lo, z_hi, g), cands, p, z_hi, g)


#: Vertebrae at least this tall (pitch: body and disc; T12 ~28-31 mm, L1 ~33-37 mm, spine-anatomy.md 1)
#: have bodies of at least ~22 mm: the bright flanks around their marrow lie further apart than
#: ``MARROW_SPAN_MM``, those around a resolved disc (its two end plates) closer. Among the small thoracic
#: bodies (17-23 mm) the two overlap on thick or tilted slices, and the spans do not tell them apart.
RESOLVED_PITCH_MM = 28.0
#: How far (mm) from a band the dip of the disc it may be an end plate of is looked for: half a lumbar disc
#: (up to ~12 mm thick, spine-anatomy.md 1.2) and a thick end plate or a bone island beside it.
RESOLVED_REACH_MM = 12.0


def _pitches_free(chain: list[int], i: int, z: int) -> bool:
    """Whether every pitch ratio that the disc ``i`` of ``chain``, put at ``z``, takes part in lies within
    ``PITCH_FREE`` (the spread of a healthy spine). False when the chain has no ratio to judge it by."""
    q = [*chain[:i], z, *chain[i + 1 :]]
    pit = np.diff(q).astype(np.float64)
    ratios = [pit[k + 1] / pit[k] for k in (i - 2, i - 1, i) if k >= 0 and k + 1 < pit.size]
    return bool(ratios) and all(r > 0 and abs(np.log(r)) <= np.log(PITCH_FREE) for r in ratios)


def _resolved_discs(
    chain: list[int], p: npt.NDArray[np.float64], z_lo: int, z_hi: int, g: float
) -> list[int]:
    """Move a disc the chain took on a band to the dip beside it where the band is an end plate of that dip.

    A bright band in the upper or lower part of a body (a thick end plate, a bone island) beside a faint disc
    can outscore the disc's dip (``DIP_VS_BAND`` pops a dip shallow against a strong band), and at the chain's
    end nothing on the far side holds the pitch. Where the vertebrae beside it are large
    (``RESOLVED_PITCH_MM``), a dip within ``RESOLVED_REACH_MM`` whose bright flanks are the band and another
    peak (or the profile's end) a disc's height away (closer than ``MARROW_SPAN_MM``) is the disc of a
    resolved pair of end plates. It replaces the band when it puts every pitch around it within
    ``PITCH_FREE`` of its neighbours' and the band did not; the deepest such dip is taken."""
    if len(chain) < 3:
        return chain
    dips = _dips(p, z_lo, z_hi, g)
    ps = _smoothed(p, g)
    out = list(chain)
    for i, z in enumerate(out):
        if any(abs(z - d) <= 1 for d in dips) or _pitches_free(out, i, z):
            continue
        # the pitches of the vertebrae this disc does not bound
        others = [b - a for k, (a, b) in enumerate(itertools.pairwise(out)) if k < i - 1 or k > i]
        if not others or float(np.median(others)) * g < RESOLVED_PITCH_MM:
            continue
        best: int | None = None
        for d, depth in dips.items():
            if abs(d - z) * g > RESOLVED_REACH_MM or not _pitches_free(out, i, d):
                continue
            a, b = _flanks(ps, d, g, z_lo, z_hi)
            if min(abs(a - z), abs(b - z)) > 1 or (b - a) * g >= MARROW_SPAN_MM:
                continue
            if best is None or depth > dips[best]:
                best = d
        if best is not None:
            out[i] = best
    return out


#: The column above the top disc holds another disc when it is longer than this many pitches of the vertebrae
#: below it (a vertebra and its disc: at most ~1.15 of the pitch below); that disc is looked for at these
#: fractions of their pitch above the top disc.
TOP_PIECE_PITCHES = 1.2
TOP_PITCH_WINDOW = (0.8, 1.2)


def _fill_gaps(
    chain: list[int], cands: dict[int, float], p: npt.NDArray[np.float64], z_hi: int, g: float
) -> list[int]:
    """Fill gaps left by a missed disc with the best candidate (or profile dip) in the middle of the gap."""
    out = list(chain)
    if len(out) < 2:
        return out
    smin = PITCH_MIN_MM
    pitch = float(np.median(np.diff(out))) * g
    top = max(out)
    # the pitch of the top complete vertebra, and the median of the top three (a fractured one among them
    # does not move it): the column above is judged against the shorter, the disc looked for at the median
    last = (out[-1] - out[-2]) * g
    near_pitch = float(np.median(np.diff(out[-4:]))) * g
    found = None
    if (z_hi - top) * g > TOP_PIECE_PITCHES * min(last, near_pitch):
        # the column above the top disc is longer than a vertebra and its disc can be (neighbouring pitches
        # differ by ~5-15 %): a disc lies in it, about one pitch of the vertebra below above the top disc. A
        # weak one (a disc smeared by thick or tilted slices beside a bright end plate or a band in the
        # body, which the chain's cost and the band beside it kept out) is looked for where the pitch puts
        # it: a dip of the profile there (with its 6 mm of context), else a candidate band
        lo_z = top + TOP_PITCH_WINDOW[0] * near_pitch / g
        hi_z = top + TOP_PITCH_WINDOW[1] * near_pitch / g
        dips = {z: v for z, v in _dips(p, top, z_hi, g).items() if lo_z <= z <= hi_z}
        near = [z for z in cands if lo_z <= z <= hi_z]
        if dips:
            # a dip is direct evidence of a disc; a band (an end plate, a bone island) only where none is
            found = max(dips, key=lambda z: dips[z])
        elif near:
            found = max(near, key=lambda z: cands[z])
    if found is not None:
        out.append(found)
        out.sort()
    elif (z_hi - top) * g > 1.6 * pitch:
        # above the top disc: another vertebra's worth of column means a missed disc up there
        above = [z for z in cands if top + pitch * 0.6 / g <= z <= z_hi - 10.0 / g]
        if above:
            out.append(max(above, key=lambda z: cands[z]))
            out.sort()
    changed = True
    while changed:
        changed = False
        for a, b in itertools.pairwise(out):
            local = [r - q for q, r in itertools.pairwise(out) if (q, r) != (a, b)]
            ref = float(np.median(local)) * g if local else pitch
            if (b - a) * g > max(1.6 * ref, 2 * smin):
                mid = [z for z in cands if a + smin / g <= z <= b - smin / g]
                if mid:
                    out.append(max(mid, key=lambda z: cands[z]))
                    out.sort()
                    changed = True
                    break
    return out


def _n_above(discs: list[int], col: Column, z: Any, y: Any, x: Any) -> Any:
    """How many disc planes each point lies above (cranial to)."""
    n = np.zeros(np.shape(z), dtype=np.int32)
    for dz in discs:
        t = col.tangent[dz]
        n += ((z - dz) * t[0] + (y - col.yb[dz]) * t[1] + (x - col.xb[dz]) * t[2] > 0).astype(np.int32)
    return n


def _cut_by_edge(
    discs: list[int], col: Column, k: int, zr: tuple[int, int], yr: tuple[int, int], nz: int, g: float
) -> bool:
    """Whether the vertebra between disc planes ``k - 1`` and ``k`` (``discs`` ascending) is cut by the top or
    bottom of the scan: a side with no disc plane in view ends at the scan's edge when the body reaches
    within ``EDGE_MM`` of it (bodies are not traced on the outermost slices), and a tilted disc plane that
    leaves the scan across the body's depth cuts the body's corner off (its end plate is not in view)."""
    z0, z1 = zr
    edge = EDGE_MM / g
    if z0 == 0 or z1 == nz - 1:
        return True
    for side, dz in ((-1, discs[k - 1] if k >= 1 else None), (1, discs[k] if k < len(discs) else None)):
        if dz is None:
            if (z0 <= edge) if side < 0 else (nz - 1 - z1 <= edge):
                return True
            continue
        t = col.tangent[dz]
        # the plane's z at the front and back of the body (at the axis' x)
        zs = [dz - (y - col.yb[dz]) * t[1] / t[0] for y in yr]
        if (min(zs) < 0.5) if side < 0 else (max(zs) > nz - 1.5):
            return True
    return False


def _segments_from_discs(bodies: B, discs: list[int], col: Column, g: float) -> list[Segment]:
    """Split the body mask by the disc planes (perpendicular to the column axis, so tilted discs split
    cleanly), close each body along the axis (mid-body slices with a faint cortex) and fill holes."""
    from dicomnode.bmd.grid import fill_holes_2d

    nz = bodies.shape[0]
    zz, yy, xx = np.nonzero(bodies)
    n_above = _n_above(discs, col, zz, yy, xx)
    segs: list[Segment] = []
    r = max(1, round(6.0 / g))
    for k in range(len(discs) + 1):
        sel = n_above == k
        if sel.sum() * g**3 < 1500.0:
            continue
        z0, z1 = int(zz[sel].min()), int(zz[sel].max())
        y0, y1 = int(yy[sel].min()), int(yy[sel].max())
        x0, x1 = int(xx[sel].min()), int(xx[sel].max())
        bz0, bz1 = max(0, z0 - r), min(nz, z1 + r + 1)
        sub = np.zeros((bz1 - bz0, y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
        sub[zz[sel] - bz0, yy[sel] - y0, xx[sel] - x0] = True
        closed = ndi.binary_closing(
            np.pad(sub, ((r, r), (0, 0), (0, 0))), structure=np.ones((2 * r + 1, 1, 1), bool)
        )
        sub = closed[r:-r] | sub
        # keep the closing inside this vertebra's slab between its two disc planes
        sz_, sy_, sx_ = np.nonzero(sub)
        wrong = _n_above(discs, col, sz_ + bz0, sy_ + y0, sx_ + x0) != k
        sub[sz_[wrong], sy_[wrong], sx_[wrong]] = False
        sub = fill_holes_2d(sub)
        m = np.zeros_like(bodies)
        m[bz0:bz1, y0 : y1 + 1, x0 : x1 + 1] = sub
        zs = np.nonzero(sub.any(axis=(1, 2)))[0] + bz0
        z0, z1 = int(zs.min()), int(zs.max())
        cut = _cut_by_edge(discs, col, k, (z0, z1), (y0, y1), nz, g)
        segs.append(Segment(0, z0, z1, m, truncated=cut, slab=k))
    segs.sort(key=lambda s: -s.zc)  # cranial first (z grows superior)
    for i, s in enumerate(segs):
        s.label = i + 1
    return segs


def _refine_segments(hu: F32, segs: list[Segment], discs: list[int], col: Column, g: float) -> None:
    """Second pass per vertebra: the axial cross-section of a vertebral body is convex but for its shallow
    posterior concavity, so each slice of the body becomes the convex hull of what the first pass found
    on it. A thin cortex left open at the basivertebral foramen, or broken into arcs on a mid-body slice,
    gets its full cross-section back; nothing outside the first pass's reach is added (the hull never
    crosses a disc plane: voxels past the body's own planes are dropped)."""
    from skimage import morphology

    convex_hull_image: Any = morphology.convex_hull_image  # untyped library function

    for sg in segs:
        zz, yy, xx = np.nonzero(sg.mask)
        if zz.size == 0:
            continue
        y0, y1 = int(yy.min()), int(yy.max()) + 1
        x0, x1 = int(xx.min()), int(xx.max()) + 1
        z0, z1 = sg.z0, sg.z1 + 1
        sub = sg.mask[z0:z1, y0:y1, x0:x1].copy()
        hu_sub = hu[z0:z1, y0:y1, x0:x1]
        for k in range(z1 - z0):
            m = sub[k]
            if m.sum() < 3:
                continue
            # the body is what its cortex encloses: an enhanced vessel pressed against the front is bright
            # but has no cortex. Cortex = well above the slice's own marrow (>= 250 HU, >= median + 150).
            # The part outside the cortex hull is dropped only when it looks like a vessel lumen: >= 40 mm2
            # and homogeneous (robust SD < 35 HU, noise only), unlike partial-volume cortex at a body's edge.
            hull = convex_hull_image(m)
            cortex = m & (hu_sub[k] > max(250.0, float(np.median(hu_sub[k][m])) + 150.0))
            if cortex.sum() >= 3:
                hull_c = convex_hull_image(cortex)
                extra = m & ~hull_c
                if extra.sum() * g * g >= 40.0 and hull_c.sum() >= 0.5 * m.sum():
                    ev = hu_sub[k][extra]
                    if 1.4826 * float(np.median(np.abs(ev - np.median(ev)))) < 35.0:
                        hull = hull_c
            sub[k] = hull
        nz_, ny_, nx_ = np.nonzero(sub & ~sg.mask[z0:z1, y0:y1, x0:x1])
        if nz_.size:
            wrong = _n_above(discs, col, nz_ + z0, ny_ + y0, nx_ + x0) != sg.slab
            sub[nz_[wrong], ny_[wrong], nx_[wrong]] = False
        sg.mask[z0:z1, y0:y1, x0:x1] = sub


def _drop_organ_below_the_ribs(
    real: npt.NDArray[np.bool_],
    med_z: npt.NDArray[np.float64],
    med_y: npt.NDArray[np.float64],
    med_x: npt.NDArray[np.float64],
    frame: Frame,
    g: float,
) -> None:
    """Unmark (in ``real``) the lowest rib-like piece of a side when its head end lies far in front of the
    rib heads above it on that side.

    The rib heads form a column beside the spine: found 30 mm out, each lies at or behind the canal's front,
    where the neck runs back to its transverse process (9-30 mm behind it from T4 down on both real CTs and
    their copies), within ~10 mm of its neighbours'. Below the ribs, in the arterial phase, the thin enhanced
    cortex of a kidney passes for thin bone, and its artery brings it within reach of the spine: such a piece
    credited to L1 made it a rib-bearing vertebra (its head end 16 mm in front of the canal's front).
    ``med_*`` are per neck piece: its head end (crop z, whole-grid y and x)."""
    nz = frame.xc.size
    zi = np.clip(np.round(med_z).astype(np.intp) + frame.z_lo, 0, nz - 1)
    front = (med_y - frame.ya[zi]) * g  # mm behind the canal's front (negative: in front of it)
    left = med_x > frame.xc[zi]
    pieces = np.nonzero(real)[0]
    for side in (True, False):
        own = sorted((int(p) for p in pieces if left[p] == side), key=lambda p: float(med_z[p]))
        if len(own) < 3:
            continue
        low, above = own[0], own[1:4]
        ref = float(np.median(front[above]))
        if front[low] < ref - RIB_HEAD_FRONT_MM:
            real[low] = False
            log.debug(
                "lowest rib-like piece on the %s: head end %.0f mm in front of the heads above it: not a rib",
                "left" if side else "right",
                ref - front[low],
            )


def _rib_evidence(
    hu: F32,
    body: B,
    frame: Frame,
    segs: list[Segment],
    g: float,
    tangent_of: Callable[[int], npt.NDArray[np.float64]],
    heads_out: list[RibHead] | None = None,
) -> list[str]:
    """Attach to each vertebra the rib bone that passes next to it; return notes.

    Rib = thin bone (``RIB_MAX_THICK_MM``) outside a ``RIB_HEAD_CORE_MM`` core that reaches
    ``RIB_MIN_REACH_MM`` off the axis (lumbar transverse processes end before). Its neck (30-62 mm off the
    axis at canal depth, one connected piece per rib) is credited to the vertebra nearest to its head along
    the column axis (``tangent_of(z)``: the axis at working-grid slice ``z``), when the head reaches the
    spine (``RIB_HEAD_MAX_MM``).
    """
    notes: list[str] = []
    nz, ny, nx = hu.shape
    zl, zh = frame.z_lo, frame.z_hi + 1
    sub = hu[zl:zh]
    xc = frame.xc[zl:zh, None, None]
    xx = np.arange(nx)[None, None, :]
    adx = np.abs(xx - xc) * g  # (nzc, 1, nx)
    bone = (sub > BONE_HU) & body[zl:zh] & (adx >= RIB_HEAD_CORE_MM)
    lab, n = ndi.label(bone, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0 or not segs:
        return notes
    vol = np.bincount(lab.ravel(), minlength=n + 1)[1:] * g**3
    # ribs are thin (5-10 mm): a component that is mostly thicker than a 10 mm ball is an enhanced organ
    # (spleen, kidney cortex, a vessel) above the bone threshold, or the pelvis
    rb = max(1, round(RIB_MAX_THICK_MM / (2.0 * g)))
    ball = np.sum(np.square(np.mgrid[-rb : rb + 1, -rb : rb + 1, -rb : rb + 1]), axis=0) <= rb * rb
    thick = np.bincount(lab[sparse_binary_opening(bone, ball)], minlength=n + 1)[1:] * g**3
    objs = ndi.find_objects(lab)
    x_mid = float(np.nanmedian(frame.xc[zl:zh]))
    ok = np.zeros(n + 1, dtype=bool)
    top_touch = np.zeros(n + 1, dtype=bool)
    for q, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        reach = max(abs(sl[2].start - x_mid), abs(sl[2].stop - 1 - x_mid)) * g
        ok[q] = reach >= RIB_MIN_REACH_MM and vol[q - 1] > 300.0 and thick[q - 1] < 0.25 * vol[q - 1]
        top_touch[q] = zl + sl[0].stop >= nz
    yy = np.arange(ny)[None, :, None]
    dy = (yy - frame.yc[zl:zh, None, None]) * g
    # rib necks: the medial 30-62 mm of each rib at canal depth; one connected piece per rib (ribs lie apart
    # there, whatever joins them further out)
    neck = ok[lab] & (adx <= 62.0) & (dy >= -30.0) & (dy <= 40.0)
    if not neck.any():
        return notes
    neck_lab, n_neck = ndi.label(neck, structure=np.ones((3, 3, 3), dtype=bool))
    nz_, ny_, nx_ = np.nonzero(neck_lab)
    piece = neck_lab[nz_, ny_, nx_]
    dxv = np.broadcast_to(adx, lab.shape)[nz_, ny_, nx_]
    # each rib is credited to the vertebra at its medial end (the head articulates there): the rib body
    # descends steeply as it runs out (the 12th rib lies at the next vertebra's level 45-60 mm out), so
    # voxels further out would credit the vertebra below. A piece whose medial end stays further out than
    # ``RIB_HEAD_MAX_MM`` does not reach a joint with the spine (a rib cut by the field of view, a lateral
    # bone fragment).
    min_dx = ndi.minimum(dxv, piece, np.arange(1, n_neck + 1))
    min_dx = np.concatenate([[np.inf], np.asarray(min_dx, dtype=float)])
    # the head is the medial and cranial extreme of the rib (ribs run down and out from their heads)
    head_score = dxv - RIB_HEAD_SLOPE * nz_ * g
    min_score = np.concatenate(
        [[np.inf], np.asarray(ndi.minimum(head_score, piece, np.arange(1, n_neck + 1)), dtype=float)]
    )
    medial = head_score <= min_score[piece] + 4.0
    med_n = np.bincount(piece[medial], minlength=n_neck + 1).astype(float)
    med_z = np.bincount(piece[medial], weights=nz_[medial], minlength=n_neck + 1) / np.maximum(med_n, 1)
    med_y = np.bincount(piece[medial], weights=ny_[medial], minlength=n_neck + 1) / np.maximum(med_n, 1)
    med_x = np.bincount(piece[medial], weights=nx_[medial], minlength=n_neck + 1) / np.maximum(med_n, 1)
    real = (min_dx <= RIB_HEAD_MAX_MM) & (med_n > 0)
    _drop_organ_below_the_ribs(real, med_z, med_y, med_x, frame, g)
    keep = real[piece]
    az, ay, ax = nz_[keep], ny_[keep], nx_[keep]
    if az.size == 0:
        return notes
    azf = az + zl
    # each rib goes to the vertebra whose body centre is nearest to its head along the column axis: the head
    # lies beside the body (lower ribs) or at the disc below it (demi-facets higher up), behind the body's
    # centre, so the distance is taken along the column's own axis (kyphosis and lordosis tilt it)
    pieces = np.nonzero(real)[0]
    heads = np.round(np.stack([med_z[pieces], med_y[pieces], med_x[pieces]], axis=1)) + np.array([zl, 0, 0])
    cents = np.array([_centroid(sg) for sg in segs])
    tang = np.array([tangent_of(round(float(c[0]))) for c in cents])
    dist = np.abs(np.einsum("hsk,sk->hs", heads[:, None, :] - cents[None, :, :], tang))
    vertebra_of = np.full(n_neck + 1, -1, dtype=np.intp)
    vertebra_of[pieces] = np.argmin(dist, axis=1)
    nearest = vertebra_of[piece[keep]]
    if heads_out is not None:
        top_z = np.full(n_neck + 1, -1)
        np.maximum.at(top_z, piece, nz_ + zl)
        for pc, head in zip(pieces, heads, strict=True):
            hz = int(np.clip(head[0], 0, nz - 1))
            heads_out.append(
                RibHead(
                    float(head[0]),
                    float(head[1]),
                    float(head[2]),
                    bool(head[2] > frame.xc[hz]),
                    bool(top_z[pc] >= nz - 2),
                    int(vertebra_of[pc]),
                )
            )
    for pc, head in zip(pieces, heads, strict=True):
        log.debug(
            "rib piece %d: head z %.0f mm, %.0f mm from the axis -> vertebra #%d",
            pc,
            head[0] * g,
            min_dx[pc],
            vertebra_of[pc] + 1,
        )
    side_left = (ax - frame.xc[azf]) > 0
    comp_of = lab[az, ay, ax]
    body_y = np.full(nz, np.nan)
    for z in range(zl, zh):
        rows = np.nonzero(body[z].any(axis=1))[0]
        if rows.size:
            body_y[z] = 0.5 * (rows.min() + rows.max())
    for s_i, s in enumerate(segs):
        sel = nearest == s_i
        if not sel.any():
            continue
        # a rib entering from the top edge next to this vertebra has its head outside the field of view
        usable = [int(c) for c in np.unique(comp_of[sel]) if not (top_touch[c] and azf[sel].max() >= nz - 3)]
        use = sel & np.isin(comp_of, usable)
        s.rib_l = float((use & side_left).sum()) * g**3
        s.rib_r = float((use & ~side_left).sum()) * g**3
        # ignore tiny contacts: a rib cross-section over 15 mm is several hundred mm3
        if s.rib_l < 150.0:
            s.rib_l = 0.0
        if s.rib_r < 150.0:
            s.rib_r = 0.0
        if s.has_rib:
            # angular reach around the trunk centre (0 posterior, pi anterior) of the rib components
            reach_angle = 0.0
            for c in usable:
                sl = objs[c - 1]
                if sl is None:
                    continue
                cz, cy, cx = np.nonzero(lab[sl] == c)
                cz = cz + sl[0].start + zl
                cy = cy + sl[1].start
                cx = cx + sl[2].start
                ang = np.arctan2(np.abs(cx - frame.xc[cz]), (cy - body_y[cz]))
                reach_angle = max(reach_angle, float(np.percentile(ang, 99)))
            s.rib_reach = reach_angle
            # per side: the length of the rib whose neck lies at this vertebra (the component with most
            # neck voxels here)
            for left in (True, False):
                side_sel = use & (side_left if left else ~side_left)
                if (float(side_sel.sum()) * g**3) < 150.0:
                    continue
                comps, counts = np.unique(comp_of[side_sel], return_counts=True)
                c = int(comps[int(np.argmax(counts))])
                sl = objs[c - 1]
                if sl is None:
                    continue
                length = _rib_length(lab[sl] == c, adx[sl[0], :, sl[2]], g)
                if left:
                    s.rib_len_l = length
                else:
                    s.rib_len_r = length
    return notes


@dataclass
class TopCount:
    """Rib pairs counted down from the first rib (only when the first rib is surely in view)."""

    pairs: int | None  # None: no count from the top (upper thorax not in view, or the count is irregular)
    note: str
    lowest_segments: tuple[int, int] = (-1, -1)  # vertebrae the lowest pair's heads are credited to


def _count_from_top(
    heads: list[RibHead],
    hu: F32,
    body: B,
    frame: Frame,
    col: Column,
    offset: tuple[int, int],
    g: float,
) -> TopCount:
    """Count the rib pairs from the first rib down (the top anchor of the naming).

    The first rib articulates with T1 only (spine-anatomy.md 2.1), so when the whole upper thorax is in view
    the number of rib pairs is counted, and the lowest pair is the 12th only when twelve are counted. The
    count is made only when it cannot have started below the first rib: the top of the scan lies above the
    lung apices (no lung in its top ``TOP_FREE_MM``) and no rib reaching the spine is cut by the top edge
    (the first rib's head rises above the apex). Rib heads are ordered along the column's own axis (arc
    length of the body centreline, the head projected on the axis), per side; the two sides must give the
    same number of ribs, pair up level by level and be evenly spaced (a 3-D spacing of more than
    ``TOP_GAP_RATIO`` times its neighbours' is a missed rib, and no count is made).
    """
    nz = hu.shape[0]
    k = max(2, int(np.ceil(TOP_FREE_MM / g)))
    top = slice(nz - k, nz)
    xx = np.arange(hu.shape[2])[None, None, :]
    lateral = np.abs(xx - frame.xc[top, None, None]) * g >= 25.0
    lung = (hu[top] < -400.0) & body[top] & lateral
    lung_mm2 = float(lung.sum(axis=(1, 2)).max()) * g * g if lung.size else 0.0
    if lung_mm2 > 100.0:
        return TopCount(None, "")
    if not heads:
        return TopCount(None, "")
    if any(h.top_cut for h in heads):
        return TopCount(None, "a rib is cut by the top edge of the scan: no count from the top")
    y0, x0 = offset
    d = np.stack([np.ones(nz), np.gradient(col.yb), np.gradient(col.xb)], axis=1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(d[1:], axis=1))]) * g
    sides: dict[bool, list[tuple[float, RibHead]]] = {True: [], False: []}
    for h in heads:
        z = int(np.clip(round(h.z), 0, nz - 1))
        c = np.array([z, col.yb[z] + y0, col.xb[z] + x0])
        s_ = arc[z] + float(np.dot(np.array([h.z, h.y, h.x]) - c, col.tangent[z])) * g
        sides[h.left].append((s_, h))
    per_side: list[list[tuple[float, RibHead]]] = []
    for side in (True, False):
        lst = sorted(sides[side], key=lambda t: t[0])
        merged: list[tuple[float, RibHead]] = []
        for item in lst:
            if merged and g * float(np.linalg.norm(_xyz(item[1]) - _xyz(merged[-1][1]))) < TOP_MERGE_MM:
                continue  # one rib in two pieces: keep the lower head
            merged.append(item)
        per_side.append(merged)
    left, right = per_side
    log.debug(
        "rib heads along the column (mm): left %s, right %s",
        [round(a) for a, _ in left],
        [round(a) for a, _ in right],
    )
    # one side's lowest rib may be missed (a short 12th rib breaks up on the working grid) or absent (a
    # unilateral 11th or 13th pair): the ribs pair up from the top, and the longer side's extra rib must lie
    # below the other side's lowest, one regular spacing under its own neighbour; it is then counted with
    # the pairs (13 is no agreement with the T12 anchor)
    lone: RibHead | None = None
    lone_side = ""
    if abs(len(left) - len(right)) == 1 and min(len(left), len(right)) >= 3:
        longer = left if len(left) > len(right) else right
        lone_side = "left" if longer is left else "right"
        lone_item, rest = longer[0], longer[1:]
        above = np.array([_xyz(h) for _, h in rest[:3]]) * g  # its side's three heads above it
        first_gap = float(np.linalg.norm((_xyz(lone_item[1]) - _xyz(rest[0][1])) * g))
        ref_gap = float(np.median(np.linalg.norm(np.diff(above, axis=0), axis=1)))
        if 1.0 / TOP_GAP_RATIO <= first_gap / max(ref_gap, 1e-6) <= TOP_GAP_RATIO:
            lone = lone_item[1]
            if longer is left:
                left = rest
            else:
                right = rest
    if len(left) != len(right):
        return TopCount(
            None, f"counted from the top, {len(left)} left and {len(right)} right ribs: no count from the top"
        )
    n = len(left)
    if n < 3:
        return TopCount(None, "")
    # spacing between consecutive heads of a side and the offset of a pair, in 3-D (the axis is least sure
    # at the top of the scan, where the column bends into the neck): a pair's heads differ mostly left-right
    pl = np.array([_xyz(h) for _, h in left]) * g
    pr = np.array([_xyz(h) for _, h in right]) * g
    sp = 0.5 * (np.linalg.norm(np.diff(pl, axis=0), axis=1) + np.linalg.norm(np.diff(pr, axis=0), axis=1))
    # the (z, y) offset of each pair (along the column and front-back) less the offset common to all pairs
    # (a rotated trunk, the head placed deeper on one side): a pair shifted by one rib is off by a spacing
    dzy = (pl - pr)[:, :2]
    off = np.linalg.norm(dzy - np.median(dzy, axis=0), axis=1)
    worst_gap, worst_off = 1.0, 0.0
    for i in range(sp.size):
        near = [sp[j] for j in range(max(0, i - 2), min(sp.size, i + 3)) if j != i]
        ref = float(np.median(near)) if near else float(sp[i])
        r = float(sp[i]) / max(ref, 1e-6)
        worst_gap = r if abs(np.log(r)) > abs(np.log(worst_gap)) else worst_gap
    for i in range(n):
        near_sp = sp[max(0, i - 1) : i + 1]
        worst_off = max(worst_off, float(off[i]) / max(float(np.mean(near_sp)), 1e-6))
    if lone is not None:
        level = float(np.median([a - b for (a, _), (b, _) in zip(left, right, strict=True)]))
        if abs(level) > TOP_PAIR_RATIO * float(np.median(sp)):
            # the pairs sit a rib apart along the column: the shorter side lacks its first rib, not its lowest
            return TopCount(
                None,
                f"counted from the top, {n + 1} {lone_side} and {n} on the other side, paired one rib apart: "
                "no count from the top",
            )
    if not 1.0 / TOP_GAP_RATIO <= worst_gap <= TOP_GAP_RATIO or worst_off > TOP_PAIR_RATIO:
        return TopCount(
            None,
            f"rib heads counted from the top are irregular (spacing {sp.min():.0f}-{sp.max():.0f} mm, one "
            f"{worst_gap:.2f} of its neighbours'; left-right offset up to {worst_off:.2f} of the spacing): "
            "no count from the top",
        )
    if lone is not None:
        return TopCount(
            n + 1,
            f"the upper thorax is in view (top of the scan above the lung apices): {n + 1} ribs counted down "
            f"from the first rib, the lowest on the {lone_side} only (its pair not found)",
            lowest_segments=(lone.segment, lone.segment),
        )
    lowest = (left[0][1], right[0][1])
    return TopCount(
        n,
        f"the upper thorax is in view (top of the scan above the lung apices): {n} rib pairs counted down "
        "from the first rib",
        lowest_segments=(lowest[0].segment, lowest[1].segment),
    )


def _xyz(h: RibHead) -> npt.NDArray[np.float64]:
    """A rib head's (z, y, x) in working-grid index units."""
    return np.array([h.z, h.y, h.x])


def _centroid(sg: Segment) -> npt.NDArray[np.float64]:
    """Centre (z, y, x) of a segment's mask, working-grid index units."""
    sub = sg.mask[sg.z0 : sg.z1 + 1]
    c = np.asarray(ndi.center_of_mass(sub), dtype=np.float64)
    out: npt.NDArray[np.float64] = c + np.array([sg.z0, 0.0, 0.0])
    return out


def _rib_length(comp: B, adx: npt.NDArray[np.float64], g: float) -> float:
    """Length (mm) of one rib from its medial end: the longest geodesic path inside the rib's voxels from
    the voxels nearest to the spine axis (``adx``: distance from the axis, mm, broadcastable to ``comp``).
    Follows the rib whichever way it runs (the lower ribs run steeply down and out), unlike a length
    measured around the trunk."""
    from skimage.graph import MCP_Geometric

    d = np.broadcast_to(adx, comp.shape)
    dv = d[comp]
    if dv.size < 3:
        return 0.0
    starts = np.argwhere(comp & (d <= float(dv.min()) + 3.0))
    mcp: Any = MCP_Geometric(np.where(comp, 1.0, np.inf), fully_connected=True)
    cost, _ = mcp.find_costs([tuple(int(v) for v in p) for p in starts])
    reach = np.asarray(cost)[comp]
    reach = reach[np.isfinite(reach)]
    return float(reach.max() * g) if reach.size else 0.0


def _sacral_slices(
    hu: F32, filled: B, bodies: B, frame: Frame, g: float, lateral: list[LateralBone] | None = None
) -> npt.NDArray[np.int8]:
    """Per slice: 2 = sacrum-like on both sides, 1 = on one side, 0 = not. ``lateral`` (when given) receives
    the solid bone joined to the body 28-60 mm beside it on each slice (``_ala_volumes`` weighs it per
    vertebra between the disc planes).

    Sacrum-like: bone joined to the vertebral body reaches >= 90 mm off the axis (sacrum joined to the
    iliac bones across the sacroiliac joint; lumbar transverse processes end at ~50 mm and the iliac
    crest is usually separated from L5 by the iliolumbar space), or solid bone spreads 28-60 mm beside the
    body at body depth over >= 450 mm2 (sacral alae). Ribs also reach far laterally; they are handled by
    requiring the sacrum to be the lowest vertebra, below every rib-bearing one.
    """
    nz, ny, nx = hu.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    out = np.zeros(nz, dtype=np.int8)
    st = disk(1)
    for z in range(frame.z_lo, frame.z_hi + 1):
        xc, ya = frame.xc[z], frame.ya[z]
        b = bodies[z]
        if not b.any():
            continue
        dxm = (xx - xc) * g
        f = binary_closing_2d((hu[z] > BONE_HU) | b, st) | b
        lab, _ = ndi.label(f)
        ids = np.unique(lab[b])
        comp = np.isin(lab, ids[ids > 0])
        reach_l = float(dxm[comp].max()) if comp.any() else 0.0
        reach_r = float(-dxm[comp].min()) if comp.any() else 0.0
        f2 = binary_closing_2d(filled[z], st) | filled[z] | b
        lab2, _ = ndi.label(f2)
        ids2 = np.unique(lab2[b])
        comp2 = np.isin(lab2, ids2[ids2 > 0])
        band = (yy >= ya - 35.0 / g) & (yy <= ya + 15.0 / g)
        side_l = comp2 & band & (dxm >= 28.0) & (dxm <= 60.0)
        side_r = comp2 & band & (dxm <= -28.0) & (dxm >= -60.0)
        ala_l = side_l.sum() * g * g >= 450.0
        ala_r = side_r.sum() * g * g >= 450.0
        if lateral is not None:
            for sgn, m in ((1, side_l), (-1, side_r)):
                jj, ii = np.nonzero(m)
                if jj.size:
                    lateral.append(LateralBone(z, sgn, jj, ii))
        left = reach_l >= 90.0 or ala_l
        right = reach_r >= 90.0 or ala_r
        out[z] = int(left) + int(right)
    # the alae and the sacroiliac joints run on over many slices: a one-slice gap between two sacral slices is
    # noise or partial volume at the threshold, not the end of the sacrum
    gap = np.minimum(out[:-2], out[2:])
    out[1:-1] = np.maximum(out[1:-1], gap)
    return out


@dataclass(frozen=True)
class LateralBone:
    """Solid bone joined to the vertebral body on one working slice, 28-60 mm to one side of it."""

    z: int
    side: int  # +1 left, -1 right
    yy: npt.NDArray[np.intp]
    xx: npt.NDArray[np.intp]


def _ala_volumes(
    lateral: list[LateralBone], discs: list[int], col: Column, g: float
) -> dict[int, tuple[float, float]]:
    """Volume (mm3) of the lateral bone joined to each vertebra, left and right, per slab between the disc
    planes (keyed like ``Segment.slab``). Weighed between the disc planes rather than by slice: the
    lumbosacral disc is steep, and a slice through the top of S1's alae also cuts the bottom of L5."""
    acc: dict[tuple[int, int], float] = {}
    for lb in lateral:
        k = _n_above(discs, col, np.full(lb.yy.shape, lb.z), lb.yy, lb.xx)
        for kk, n in zip(*np.unique(k, return_counts=True), strict=True):
            acc[(int(kk), lb.side)] = acc.get((int(kk), lb.side), 0.0) + float(n) * g**3
    slabs = {k for k, _ in acc}
    return {k: (acc.get((k, 1), 0.0), acc.get((k, -1), 0.0)) for k in slabs}


def _find_sacrum(segs: list[Segment], ala: dict[int, tuple[float, float]]) -> tuple[int | None, bool, str]:
    """The sacrum: walking up from the lowest vertebra (at most four), the highest of a run of pieces with
    sacral evidence (S1-S2 remnant discs split the sacrum into pieces). The run may pass one piece without
    alae when the piece above it has alae on both sides (S1's): below the sacrum a tilted plane splits
    the lower sacrum into pieces and pelvic bone joined to one of them looks like an ala (Basel tilted 10
    degrees about anterior-posterior: a 124 cm3 piece with 13.9 / 6.0 cm3 beside it, under one without,
    under S1 with 11.3 / 13.3 cm3).

    Sacral evidence is the volume of solid bone joined to the piece 28-60 mm beside it, between its own
    disc planes: the alae of S1 (a lateral mass about 30 mm wide, deep and tall, joined to the ilium at the
    sacroiliac joint) give ``ALA_MIN_MM3`` or more on a side; a lumbar transverse process (about 10 x 10 mm
    in section) gives a fraction of that. A volume is a sum over slices, so noise or thick slices that
    break the alae on a few slices lower it a little instead of removing it. Strong evidence: both sides.
    """
    found: tuple[int, bool, float, float] | None = None
    gap = False  # one piece without alae passed since the last piece with them
    for i in range(len(segs) - 1, max(-1, len(segs) - 5), -1):
        s = segs[i]
        if s.has_rib:
            break
        vl, vr = ala.get(s.slab, (0.0, 0.0))
        strong = min(vl, vr) >= ALA_MIN_MM3
        if max(vl, vr) >= ALA_MIN_MM3 and (strong or not gap):
            found, gap = (i, strong, vl, vr), False
        elif found is None:
            continue
        elif not gap:
            # a piece without alae between two with them (a lower sacral segment split off by a tilted plane,
            # or pelvic bone below the sacrum taken as a piece with alae): the piece above counts only with
            # alae on both sides, like S1's; L5 lies on S1 itself, never above a piece without alae
            gap = True
        else:
            break
    if found is None:
        return None, False, ""
    i, strong, vl, vr = found
    side = "both sides" if strong else "one side only"
    return (
        i,
        strong,
        f"sacrum: vertebra #{i + 1} with alae joined to it on {side} ({vl / 1000:.1f} cm3 left, "
        f"{vr / 1000:.1f} cm3 right; >= {ALA_MIN_MM3 / 1000:.0f} cm3 is an ala)",
    )


def _lowest_rib_lengths(segs: list[Segment], first: int, t12: int) -> tuple[float, float, float]:
    """Length (mm, the longer side) of the lowest rib pair, of the pair above it and of the pair above that
    (0 when not in view)."""

    def length(i: int) -> float:
        return max(segs[i].rib_len_l, segs[i].rib_len_r) if i >= first else 0.0

    return length(t12), length(t12 - 1), length(t12 - 2)


def _lowest_rib_note(segs: list[Segment], first: int, t12: int) -> str:
    """Why the lowest rib pair may not be the 12th (empty when its length marks it as a 12th pair).

    With the ribs as the only anchor the lowest rib-bearing vertebra is called T12. That is wrong with a
    lumbar rib on L1 (1.3-5.8 %) or with 11 rib pairs (8 %; spine-anatomy.md 2.3). The lower ribs taper: the
    11th is about four fifths of the 10th, the 12th about half the 11th, and a rib shorter than 38 mm is not
    a thoracic rib (Yun 2018: a thoracolumbar transitional vertebra or a lumbar rib). So the lowest pair is
    taken as the 12th when it is at least ``RIB_SHORT_MM`` long (geodesic length from its head) and, when the
    pair above is in view, between ``RIB_SHORT_RATIO`` and ``RIB_ELEVENTH_RATIO`` of it, and when the pair
    above that is in view too, the pair above the lowest is an 11th by its taper (< ``RIB_TENTH_RATIO`` of the
    pair above it); with no pair above in view, only a pair in the range of a full 12th rib (>=
    ``RIB_LONE_MIN_MM``). Shorter: a lumbar rib or a hypoplastic 12th rib; longer against the pair above, or
    under a pair that does not taper like an 11th: an 11th rib with the 12th absent. Either way the names stay
    the rib-based ones, flagged uncertain.

    A 13th pair as long as a 12th (0.37 % of people have 13 pairs) cannot be told from a 12th by the ribs at
    the bottom; only a count from the first rib or the sacrum finds it.
    """
    low, above, above2 = _lowest_rib_lengths(segs, first, t12)
    if low < RIB_SHORT_MM:
        return (
            f"lowest rib pair is short ({low:.0f} mm from its head, < {RIB_SHORT_MM:.0f} mm): a "
            "lumbar rib on L1 or a hypoplastic 12th rib"
        )
    if above > 0.0 and low < RIB_SHORT_RATIO * above:
        return (
            f"lowest rib pair is short against the pair above ({low:.0f} mm vs {above:.0f} mm, ratio "
            f"{_trunc(low / above, 2)} < {_trunc(RIB_SHORT_RATIO, 2)}): a lumbar rib on L1 or a hypoplastic "
            "12th rib"
        )
    if above > 0.0 and low >= RIB_ELEVENTH_RATIO * above:
        return (
            f"lowest rib pair is long against the pair above ({low:.0f} mm vs {above:.0f} mm, ratio "
            f"{_trunc(low / above, 2)} >= {_trunc(RIB_ELEVENTH_RATIO, 2)}, where a 12th is about half the "
            "11th): an 11th rib, 11 rib pairs possible"
        )
    if above > 0.0 and above2 > 0.0 and above >= RIB_TENTH_RATIO * above2:
        return (
            f"the pair above the lowest rib pair does not taper like an 11th ({above:.0f} mm vs {above2:.0f} "
            f"mm above it, ratio {_trunc(above / above2, 2)} >= {RIB_TENTH_RATIO}; an 11th is about 0.79 of "
            "the 10th, a 10th about 0.91 of the 9th): the lowest pair may be an 11th, 11 rib pairs possible"
        )
    if above <= 0.0 and low < RIB_LONE_MIN_MM:
        return (
            f"lowest rib pair {low:.0f} mm long with no rib pair above it in view to compare (< "
            f"{RIB_LONE_MIN_MM:.0f} mm): a 12th rib or a lumbar rib on L1 cannot be told apart"
        )
    return ""


def _trunc(x: float, nd: int) -> str:
    """``x`` truncated (not rounded) to ``nd`` decimals, so a value below a threshold never prints as it."""
    f = 10**nd
    return f"{np.trunc(x * f) / f:.{nd}f}"


@dataclass(frozen=True)
class Naming:
    names: dict[int, str]  # segment label -> level
    uncertain: bool
    evidence: tuple[str, ...]


def _name(
    segs: list[Segment],
    sacrum: int | None,
    sacrum_strong: bool,
    sacrum_note: str,
    top: TopCount | None = None,
) -> Naming:
    ev: list[str] = []
    n = len(segs)
    # rib anchor: the run of rib-bearing vertebrae from the top
    t12: int | None = None
    rib_weak = False  # the vertebra below the lowest rib is not seen whole
    rib_doubt = False  # the lowest rib pair may not be the 12th (answered by a count from the first rib)
    rib_short = ""  # why the lowest rib pair may not be the 12th (judged when the ribs are the only anchor)
    top_agrees = False
    top_disagrees = False
    first = next((i for i, s in enumerate(segs) if s.has_rib), None)
    if first is not None:
        i = first
        while i + 1 < n and segs[i + 1].has_rib:
            i += 1
        t12 = i
        s = segs[t12]
        rib_short = _lowest_rib_note(segs, first, t12)
        if not (s.rib_l > 0 and s.rib_r > 0):
            # the partner of a 12th may be missed (a short, thin rib breaks up on thick slices), but a rib
            # credited to the vertebra below its own (a disc missed or misplaced above it) looks the same
            rib_doubt = True
            ev.append("lowest rib seen on one side only")
        if t12 == n - 1:
            rib_weak = True
        elif t12 + 1 == n - 1 or segs[t12 + 1].truncated:
            # the rib-free vertebra below must be seen whole, with its lower disc, to call it L1
            rib_weak = True
            ev.append("the vertebra below the lowest rib is not fully in view")
        if s.rib_reach > np.radians(100.0):
            rib_doubt = True
            ev.append(
                f"lowest rib reaches {np.degrees(s.rib_reach):.0f} deg around the trunk (an 11th rib does; "
                "a 12th usually ends behind the flank): 11 rib pairs possible"
            )
        elif s.rib_reach and s.rib_reach < np.radians(35.0):
            rib_doubt = True
            ev.append(f"lowest rib is a stub ({np.degrees(s.rib_reach):.0f} deg): lumbar rib possible")
        ev.append(
            f"ribs articulate down to vertebra #{t12 + 1} of {n} in view (left {s.rib_l:.0f} mm3, right "
            f"{s.rib_r:.0f} mm3): T12 anchor"
        )
        if top is not None and top.pairs is not None:
            on_t12 = top.lowest_segments == (t12, t12)
            if top.pairs == 12 and on_t12:
                top_agrees = True
                ev.append(f"{top.note}: the 12th pair is on vertebra #{t12 + 1}, the T12 anchor agrees")
            else:
                top_disagrees = True
                where = (
                    "the lowest pair's heads are not both on the lowest rib-bearing vertebra"
                    if not on_t12
                    else f"{top.pairs} pairs, not 12 (11 or 13 rib pairs, or a rib missed)"
                )
                ev.append(f"{top.note}: {where}; the count from the top and the lowest rib disagree")
    if top is not None and top.pairs is None and top.note:
        ev.append(top.note)
    # sacrum anchor: the vertebra above the sacrum is L5
    l5: int | None = None
    sac_weak = False
    if sacrum is not None and sacrum >= 1:
        l5 = sacrum - 1
        ev.append(f"{sacrum_note}; vertebra #{l5 + 1} above it: L5 anchor")
        if not sacrum_strong:
            sac_weak = True
        if segs[l5].truncated:
            sac_weak = True
    names: dict[int, str] = {}
    uncertain = False
    base: int | None = None  # NORMAL_LEVELS index of segment 0
    i_t12 = NORMAL_LEVELS.index("T12")
    i_l5 = NORMAL_LEVELS.index("L5")
    if t12 is not None and l5 is not None:
        gap = l5 - t12  # T12 -> L5 is five steps with five lumbar vertebrae
        if gap == 5:
            base = i_t12 - t12
            uncertain = ((rib_weak or rib_doubt) and sac_weak) or top_disagrees
            ev.append("rib and sacrum anchors agree (5 lumbar vertebrae)")
        else:
            base = i_l5 - l5
            uncertain = True
            lumbar = gap
            ev.append(
                f"rib and sacrum anchors disagree ({lumbar} rib-free vertebrae above the sacrum, not 5: "
                "11/13 rib pairs or a transitional vertebra); named from the sacrum, all levels uncertain"
            )
    elif t12 is not None:
        base = i_t12 - t12
        # the count from the first rib answers whether the lowest pair is the 12th (short, one-sided or
        # long-reaching lowest ribs are then no reason for doubt)
        uncertain = rib_weak or top_disagrees or (rib_doubt and not top_agrees)
        if rib_short and not top_agrees:
            uncertain = True
            ev.append(rib_short)
        elif not rib_short and first is not None:
            low, up, _ = _lowest_rib_lengths(segs, first, t12)
            ev.append(
                f"lowest rib pair {low:.0f} mm long"
                + (f", {low / up:.2f} of the pair above ({up:.0f} mm)" if up > 0.0 else "")
                + ": the length of a 12th rib"
            )
        elif rib_short:
            ev.append(f"{rib_short.split(':')[0]}: the count from the first rib makes it the 12th")
        ev.append("named from the ribs (sacrum not in view)")
    elif l5 is not None:
        base = i_l5 - l5
        uncertain = sac_weak
        if segs[l5].sacral_mm >= LSTV_MIN_MM:
            uncertain = True
            ev.append(
                f"vertebra #{l5 + 1} above the sacrum has bone joined to it reaching the ala / ilium over "
                f"{segs[l5].sacral_mm:.0f} mm: lumbosacral transitional vertebra possible (sacralised L5 or "
                "lumbarised S1), so the sacrum alone cannot fix L5"
            )
        elif segs[l5].ala_mm3 >= LSTV_ALA_MM3:
            uncertain = True
            ev.append(
                f"vertebra #{l5 + 1} above the sacrum has {segs[l5].ala_mm3 / 1000:.1f} cm3 of bone beside "
                f"it (>= {LSTV_ALA_MM3 / 1000:.1f} cm3: transverse processes large enough to be a "
                "transitional vertebra's), so the sacrum alone cannot fix L5"
            )
        ev.append("named from the sacrum (no rib-bearing vertebra in view)")
    else:
        uncertain = True
        # no anchor: assume the first complete vertebra below any rib is L1 (lowest ribs are out of view)
        first_full = next((i for i, s in enumerate(segs) if not s.truncated), 0)
        base = NORMAL_LEVELS.index("L1") - first_full
        ev.append(
            "neither ribs nor sacrum in view: levels guessed (top complete vertebra = L1), all uncertain"
        )
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

    def segment(self, canonical: Volume, context: ClassicalContext | None = None) -> SpineSegmentation:
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
        if context is None:
            grid = make_coarse(canonical)
            context = ClassicalContext(grid, body_mask(grid.hu, grid.g), grid.hu)
        g = context.grid.g
        hu = context.hu_cal
        body = context.body
        if body.sum() * g**3 < 1.0e6:
            raise NotQualifyingError("no trunk in view (body volume below 1 litre)")
        # the column lies within 90 mm of the trunk's midline and behind its centre: work on that crop
        _, yy_, xx_ = np.nonzero(body[:: max(1, body.shape[0] // 40)])
        mx, my = float(xx_.mean()), float(yy_.mean())
        x0 = max(0, int(mx - 90.0 / g))
        x1 = min(hu.shape[2], int(mx + 90.0 / g) + 1)
        y0 = max(0, int(my - 70.0 / g))
        hu_c, body_c = hu[:, y0:, x0:x1], body[:, y0:, x0:x1]
        frame_c, filled = _find_canal(hu_c, body_c, g)
        bodies = _bodies(hu_c, body_c, frame_c, g)
        col = _centreline(bodies, frame_c, g)
        prof = _axial_profile(hu_c, col, frame_c.z_lo, frame_c.z_hi, g)
        discs = _find_discs(prof, frame_c.z_lo, frame_c.z_hi, g)
        lateral: list[LateralBone] = []
        sac = _sacral_slices(hu_c, filled, bodies, frame_c, g, lateral)
        sac_run = _caudal_run(sac > 0, g)
        if sac_run is not None:
            _, hi = sac_run
            # a missed lumbosacral disc: a body continues > 45 mm above the sacral slices with no disc
            above_top = [d for d in discs if d > hi]
            below = [d for d in discs if d <= hi + round(10.0 / g)]
            next_disc = min(above_top) if above_top else frame_c.z_hi
            if not below and (next_disc - hi) * g > 45.0:
                discs = sorted([*discs, hi + 1])
        segs = _segments_from_discs(bodies, discs, col, g)
        _refine_segments(hu_c, segs, discs, col, g)
        if len(segs) < 2:
            raise NotQualifyingError(f"spine not found: {len(segs)} vertebral body candidate(s) in view")
        for sg in segs:  # back to the whole working grid
            full_m = np.zeros(hu.shape, dtype=bool)
            full_m[:, y0:, x0:x1] = sg.mask
            sg.mask = full_m
        frame = Frame(
            frame_c.xc + x0, frame_c.yc + y0, frame_c.ya + y0, frame_c.found, frame_c.z_lo, frame_c.z_hi
        )
        context.frame = frame
        rib_heads: list[RibHead] = []
        notes = _rib_evidence(
            hu,
            body,
            frame,
            segs,
            g,
            tangent_of=lambda z: col.tangent[int(np.clip(z, 0, len(col.tangent) - 1))],
            heads_out=rib_heads,
        )
        # ribs belong to the run of rib-bearing vertebrae from the top; rib-like bone further down (iliac
        # crest next to L4/L5, a stray fragment) is not a rib
        first = next((i for i, sg in enumerate(segs) if sg.has_rib), None)
        # rib-bearing vertebrae are the uppermost ones: a run that starts below rib-free vertebrae (other
        # than ones cut by the field of view, and one whose ribs were missed) is pelvis or other lateral bone
        allowed_first = next((i for i, sg in enumerate(segs) if not sg.truncated), len(segs)) + 1
        if first is not None and first > allowed_first:
            notes.append(f"rib-like bone first at vertebra #{first + 1}, below rib-free ones: not ribs")
            for sg in segs:
                sg.rib_l = sg.rib_r = 0.0
            first = None
        if first is not None:
            # one rib-free vertebra between rib-bearing ones is a missed rib pair (a thoracic rib head sits
            # on the disc between two bodies and may be credited to either), not the end of the thorax
            i = first
            while i + 1 < len(segs):
                if segs[i + 1].has_rib:
                    i += 1
                elif i + 2 < len(segs) and segs[i + 2].has_rib and not segs[i + 1].truncated:
                    segs[i + 1].rib_inferred = True
                    notes.append(f"vertebra #{i + 2}: rib pair missed between rib-bearing neighbours")
                    i += 2
                else:
                    break
            stray = [sg for sg in segs[i + 1 :] if sg.has_rib]
            if stray:
                notes.append(
                    f"rib-like bone next to {len(stray)} vertebra(e) below the rib-free ones ignored"
                )
            for sg in stray:
                sg.rib_l = sg.rib_r = 0.0
                sg.rib_inferred = False
        # the count from the first rib uses the rib heads down to the lowest rib-bearing vertebra (rib-like
        # bone below it, e.g. the iliac crests of a chest-abdomen-pelvis CT, is not a rib)
        last = max((i for i, sg in enumerate(segs) if sg.has_rib), default=-1)
        top = _count_from_top([h for h in rib_heads if h.segment <= last], hu, body, frame, col, (y0, x0), g)
        ala = _ala_volumes(lateral, discs, col, g)
        for sg in segs:
            # upper two thirds only: the alae rise beside the lower end of a tilted L5
            sg.sacral_mm = float((sac[sg.z0 + (sg.z1 - sg.z0) // 3 : sg.z1 + 1] > 0).sum()) * g
            sg.ala_mm3 = max(ala.get(sg.slab, (0.0, 0.0)))
        sacrum, sac_strong, sac_note = _find_sacrum(segs, ala)
        naming = _name(segs, sacrum, sac_strong, sac_note, top)
        context.segments = segs
        # vertebrae inside the sacrum are not vertebrae for our purpose
        coarse_labels = np.zeros(hu.shape, dtype=np.uint8)
        levels: list[str] = []
        truncated: set[str] = set()
        unreliable: dict[str, str] = {}
        heights = [(sg.z1 - sg.z0 + 1) * g for sg in segs if not sg.truncated]
        med_h = float(np.median(heights)) if heights else 0.0
        axes: dict[str, tuple[float, float, float]] = {}
        for s in segs:
            lvl = naming.names.get(s.label)
            if lvl is None:
                continue
            if sacrum is not None and s.label - 1 >= sacrum:
                continue
            levels.append(lvl)
            coarse_labels[s.mask] = len(levels)
            t = col.tangent[round(np.clip(s.zc, 0, len(col.tangent) - 1))]
            axes[lvl] = (float(t[2]), float(t[1]), float(t[0]))  # (x, y, z) in canonical mm directions
            if s.truncated:
                truncated.add(lvl)
            elif med_h and (s.z1 - s.z0 + 1) * g > 1.6 * med_h and s.label == 1:
                # the top piece spans two vertebrae: its upper disc was not resolved (thin thoracic disc)
                unreliable[lvl] = "vertebral boundaries unclear (upper disc not resolved)"

        if not levels:
            raise NotQualifyingError("no vertebra could be named")
        full, label_box = _labels_to_full(context.grid, coarse_labels, len(levels))
        ev = list(notes) + list(naming.evidence)
        log.debug("classical segmentation: %s", "; ".join(ev))
        return SpineSegmentation(
            levels=tuple(levels),
            body_labels=full,
            level_uncertain=naming.uncertain,
            evidence=tuple(ev),
            truncated=frozenset(truncated),
            unreliable=unreliable,
            hints={"frame": frame, "axes": axes, "label_box": label_box},
        )


def _caudal_run(sac: npt.NDArray[np.bool_], g: float) -> tuple[int, int] | None:
    """The caudal-most run of sacral slices at least 8 mm long."""
    if not sac.any():
        return None
    lab, n = ndi.label(sac)
    runs = []
    for q in range(1, n + 1):
        zs = np.nonzero(lab == q)[0]
        if (zs.max() - zs.min() + 1) * g >= 8.0:
            runs.append((int(zs.min()), int(zs.max())))
    return min(runs, key=lambda r: r[0]) if runs else None


def _labels_to_full(
    grid: CoarseGrid, labels: npt.NDArray[np.uint8], n: int
) -> tuple[npt.NDArray[np.uint8], tuple[slice, slice, slice] | None]:
    """The coarse labels 1..n on the canonical grid (linear interpolation of each label's mask, 0.5
    threshold; a voxel already taken keeps its label), and a canonical box outside which all is 0 (None
    when no label is present).

    Each label is interpolated from a crop of the working grid around it (its box plus the 4 mm margin,
    the interpolation's reach and a spare voxel): the same samples as from the whole grid, for a
    fraction of the work."""
    from dicomnode.bmd.grid import full_bbox_of_coarse

    out = np.zeros(grid.full_shape, dtype=np.uint8)
    objs = ndi.find_objects(labels, max_label=n)
    steps = (grid.step[2], grid.step[1], grid.step[0])
    # coarse voxels a sample of the bbox may read beyond the label's own box: the 4 mm margin, the
    # rounding of the bbox to whole canonical voxels (< 1 canonical voxel = 1/step coarse), the linear
    # interpolation's upper neighbour, and one spare
    pad = [int(np.ceil(4.0 / grid.g + 1.0 / st)) + 2 for st in steps]
    union: list[list[int]] | None = None
    for q in range(1, n + 1):
        box = objs[q - 1] if q - 1 < len(objs) else None
        if box is None:
            continue
        crop = tuple(
            slice(max(0, box[a].start - pad[a]), min(labels.shape[a], box[a].stop + pad[a])) for a in range(3)
        )
        origin = (crop[0].start, crop[1].start, crop[2].start)
        m = labels[crop] == q
        bbox = full_bbox_of_coarse(grid, m, 4.0, origin=origin)
        fm, _ = coarse_to_full(grid, m, bbox, origin=origin)
        sub = out[bbox]
        sub[fm & (sub == 0)] = q
        if union is None:
            union = [[b.start, b.stop] for b in bbox]
        else:
            for a in range(3):
                union[a] = [min(union[a][0], bbox[a].start), max(union[a][1], bbox[a].stop)]
    if union is None:
        return out, None
    return out, (slice(*union[0]), slice(*union[1]), slice(*union[2]))


__all__ = ["AnalysisError", "ClassicalBackend", "ClassicalContext"]
