"""Per-vertebra QC (field of view, ROI size, metal/cement, compression fracture, outliers), the ACR
category on the L1-L2 pair (or the nearest valid pair), L1 HU flags and patient demographics.

Thresholds and their sources:

* ACR-SPR-SSR QCT: mean trabecular vBMD of two lumbar vertebrae (usually L1-L2): > 120 mg/cm3 normal,
  80-120 osteopenia, < 80 osteoporosis (clinical.md 2.1).
* L1 HU (Pickhardt et al., Ann Intern Med 2013, clinical.md 1.1): <= 110 HU > 90 % specific for
  osteoporosis; <= 160 HU ~90 % sensitive; > 200 HU NPV 99 %. These are raw HU at 120 kV.
* Compression fracture: height ratio (min/max of anterior, middle, posterior) < 0.8, i.e. >= 20 % height
  loss = Genant grade >= 1 (Genant semiquantitative; TotalSegmentator spine report uses the same 0.8);
  also a body < 80 % of its neighbours' mean height. Heights come from the image's end-plate profiles
  with sub-voxel edges (``roi.profile_heights``; a line fitted over the depth rejects a single odd
  profile, so no neighbour confirmation is needed for the wedge). Grade >= 2 (ratio < 0.75 by more than
  ``FRACTURE_Z`` = 2 standard errors of the ratio, widened to Student's t for the few residuals the error
  is estimated from: ``fracture_z``) leaves the average (compression raises apparent density,
  clinical.md 4.4); a ratio below 0.75 within that uncertainty is reported as "grade 1 or 2 within the
  measurement uncertainty" and kept; grade 1 is reported in QC only (physiological wedging at T12-L1,
  reverse wedge of L5). The standard error comes from the data: the residual spread of the profile
  heights around their fitted line (``roi.HeightFit``), plus the slice quantisation of the end plates
  that the residuals cannot show (see ``ratio_se``). Ratios are printed truncated to 3 decimals (never
  "0.80 < 0.8").
* Outlier: calibrated trabecular HU more than 30 % and more than 30 HU away from the mean of both
  neighbours (sclerotic lesion, haemangioma, mislabelled structure).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dicomnode.bmd import calibration as cal
from dicomnode.bmd.roi import METAL_MIN_MM3, PROFILE_BEYOND_MM, RoiStats
from dicomnode.bmd.segmentation import SpineSegmentation
from dicomnode.domain import (
    REPORTED_LEVELS,
    Calibration,
    ContrastPhase,
    PatientInfo,
    RoiOutline,
    Summary,
    VertebraResult,
)
from dicomnode.imaging.volume import Volume
from dicomnode.vocab import acr_category as category  # the ACR QCT category, defined once

FRACTURE_RATIO = 0.8
#: Exclusion from the average from Genant grade 2 (>= 25 % height loss); grade 1 (20-25 %) is reported only,
#: because physiological wedging at T12-L1 and L5 produces the same ratios (poor grade-1 specificity).
FRACTURE_EXCLUDE_RATIO = 0.75
#: Genant grade 3 (> 40 % height loss).
GRADE3_RATIO = 0.6
#: A ratio must lie this many standard errors below the grade-2 line to exclude the level (one-sided ~2.3 %
#: false exclusions of a grade-1 body when the errors are normal).
FRACTURE_Z = 2.0
#: The body outline's own height ratio (``roi.body_heights``; biased towards 1 by partial volume: a true 0.70
#: wedge reads ~0.88 at 2 mm slices) at or above which it contradicts a grade 2-3 call from the profiles.
MASK_REGULAR_RATIO = 0.95
#: End-plate profiles that read a body taller than this multiple of its tallest neighbour met something
#: beyond its end plates: consecutive vertebral bodies differ by at most ~6.5 % in height (the steepest step,
#: T9 to L1; Palm et al., Sci Rep 2025, spine-anatomy.md 1.1), three such steps is not anatomy. A wedge
#: fracture keeps its posterior height (its tallest) near its neighbours', a crush fracture is shorter.
TALLER_THAN_NEIGHBOURS = 1.2
#: A body taller than this multiple of the body below it is two bodies in one segment: a disc between them
#: was missed (a thin disc between faint end plates, blurred by thick slices). Vertebral bodies grow taller
#: from the thorax down to L3-L4, by at most ~6.5 % a step (``TALLER_THAN_NEIGHBOURS``); a body with a piece
#: of the next one on top reads 1.3-2 times the one below, and its ROI takes in the end plates between them.
TWO_BODIES = 1.3
#: Height ratios below this are taken as a failed outline, not a fracture (Genant grade 3 starts at 0.6).
IMPLAUSIBLE_RATIO = 0.25
#: SD of one height's slice quantisation, in slice thicknesses: each of its two end-plate edges lies anywhere
#: in the slice that straddles it (uniform, SD 1/sqrt(12) each, independent: sqrt(2/12)).
QUANT_SD_SLICES = float(np.sqrt(2.0 / 12.0))
OUTLIER_FRACTION = 0.30
OUTLIER_MIN_HU = 30.0

#: Pairs tried in order when L1 or L2 is not usable (nearest to L1-L2 first).
PAIRS: tuple[tuple[str, str], ...] = (("L1", "L2"), ("L2", "L3"), ("T12", "L1"), ("L3", "L4"), ("T11", "T12"))


def _trunc3(x: float) -> str:
    """``x`` truncated (not rounded) to 3 decimals: a ratio below a threshold never prints as equal to it."""
    return f"{np.trunc(x * 1000.0) / 1000.0:.3f}"


def ratio_se(
    heights: Sequence[float],
    se: Sequence[float] | None,
    i_min: int,
    i_max: int,
    slice_mm: float,
) -> float:
    """Standard error of the height ratio ``heights[i_min] / heights[i_max]`` (first-order propagation).

    * with profile standard errors ``se`` (``roi.HeightFit``): the two heights' errors, independent, plus
      the quantisation common to all profiles (a flat end plate parallel to the slices is misplaced by the
      same amount in every profile; the residuals cannot see it). A common shift ``d`` of both heights moves
      the ratio by ``d (1 - r) / h_max``, with ``d`` of SD ``QUANT_SD_SLICES`` slices;
    * without (mask-based heights): each height carries the full quantisation SD, independently.
    """
    h_lo, h_hi = float(heights[i_min]), float(heights[i_max])
    r = h_lo / h_hi
    q = QUANT_SD_SLICES * slice_mm
    if se is None:
        return r * float(np.hypot(q / h_lo, q / h_hi))
    fit = r * float(np.hypot(float(se[i_min]) / h_lo, float(se[i_max]) / h_hi))
    return float(np.hypot(fit, q * (1.0 - r) / h_hi))


def l1_hu_flags(hu: float) -> tuple[str, ...]:
    """Meaning of an L1 trabecular HU value against Pickhardt 2013's 120 kV thresholds."""
    flags = []
    if hu <= 110.0:
        flags.append("L1 <= 110 HU: >90% specific for osteoporosis (Pickhardt 2013)")
    if hu <= 160.0:
        flags.append("L1 <= 160 HU: below the ~90%-sensitive osteoporosis threshold (Pickhardt 2013)")
    if hu > 200.0:
        flags.append("L1 > 200 HU: osteoporosis very unlikely (NPV 99%, Pickhardt 2013)")
    return tuple(flags)


def fracture_z(dof: int | None) -> float:
    """How many standard errors a ratio must lie below the grade-2 line to exclude the level: ``FRACTURE_Z``
    for a normal error of known size, widened to Student's t at the same one-sided level when the standard
    error was estimated from ``dof`` residuals of the profile line (5-7 profiles leave 3-5: t is 3.31-2.65
    where z is 2). A line through five scattered profiles (LIDC's L2 at the scan's bottom edge on 2 mm
    slabs: 20.4 36.6 26.4 31.7 30.1 mm) has a standard error as uncertain as its ratio, and read 0.51 by
    more than 2 of them."""
    if dof is None or dof < 1:
        return FRACTURE_Z
    from scipy import stats

    return float(stats.t.ppf(stats.norm.cdf(FRACTURE_Z), dof))


def reference_height(st: RoiStats, truncated: bool) -> float | None:
    """A vertebra's tallest height as its neighbours' reference (the < 80 % of neighbours rule): only from
    its end-plate profiles, when their heights do not step part-way through the depth (one end plate's edge
    met another structure). An outline-only height follows the segmentation (it met a merged disc or the
    next body) and can be far too tall; a body cut by the field of view has no height."""
    if truncated or st.heights_mm is None or st.heights_se_mm is None or st.height_step_mm is not None:
        return None
    return max(st.heights_mm)


def _outliers(
    hu: dict[str, float], beside: dict[str, float] | None = None, order: tuple[str, ...] = ()
) -> list[tuple[str, float]]:
    """The levels whose trabecular HU lies far from the other levels' median (more than ``OUTLIER_MIN_HU``
    and ``OUTLIER_FRACTION`` of that median), with their difference: the most deviant first, each set aside
    before the next is judged, while at least three levels are left to judge against.

    Measured against the median of all the others rather than the mean of the two next to it, one wrong level
    (a ROI on a body the segmentation cut obliquely, 195 HU beside 80-110) is not the reason its right
    neighbour is excluded, and a level at either end of the measured range is judged too.

    A deviation is a step, not a lone level, when the level and a body next to it (``order``: the level names
    from top to bottom) read alike and together end the measured column, with every other judged level beyond
    them on one side, and the step goes the way trabecular density goes along the spine: lower caudally (it
    falls from T10 to L1, and the cut-offs for one category are lower at T12 than at T11: sources below).
    Alike: within the bounds of each other, and the body next to it nearer to the level than to the others'
    median. At the end of the judged range the others all lie on one side, so a step between the thoracic and
    lumbar bodies (LIDC: T11-T12 98-115 HU, L1-L2 62-73 HU) otherwise reads as a lone low L1.
    The body next to it may be judged or in ``beside``: measured but not judged, for a reason about its shape
    or the scan's edge rather than its bone. A step's levels are kept and leave the median the others are
    judged against: the levels beyond a step are judged among themselves (else the step's high thoracic
    levels lift the median and the lumbar ones below read as outliers). Two agreeing levels inside the range,
    or a caudal end that reads higher (two sclerotic bodies), stay outliers.
    """
    left = dict(hu)
    beside = beside or {}
    pos = {lv: i for i, lv in enumerate(order)}

    def far(a: float, b: float) -> bool:
        return abs(a - b) > OUTLIER_MIN_HU and abs(a - b) > OUTLIER_FRACTION * abs(b)

    out: list[tuple[str, float]] = []
    stepped: set[str] = set()  # levels of a step: kept, and no longer part of the others' median

    def step(lv: str, d: float) -> bool:
        if lv not in pos or any(k not in pos for k in left):
            return False
        measured = {**beside, **left}
        for o in (k for k in measured if k in pos and abs(pos[k] - pos[lv]) == 1):
            # o reads like lv, nearer to it than to the others' median: it shares the step
            if far(left[lv], measured[o]) or abs(left[lv] - measured[o]) >= abs(d) / 2:
                continue
            # the judged levels beyond the step (a step's levels already found are part of it)
            others = [pos[k] for k in left if k not in (lv, o) and k not in stepped]
            if not others:
                continue
            lo, hi = min(pos[lv], pos[o]), max(pos[lv], pos[o])
            if (d < 0 and all(p < lo for p in others)) or (d > 0 and all(p > hi for p in others)):
                return True
        return False

    while len(left) - len(stepped) >= 3:
        pool = {k: v for k, v in left.items() if k not in stepped}
        dev = {lv: v - float(np.median([o for k, o in pool.items() if k != lv])) for lv, v in pool.items()}
        beyond = {k: far(pool[k], pool[k] - dev[k]) for k in pool}
        # the most deviant level; none beyond the bounds: done
        lv = max(dev, key=lambda k: abs(dev[k]))
        if not beyond[lv]:
            break
        if step(lv, dev[lv]):
            # the levels on the other side of a step are judged among themselves
            stepped.add(lv)
            continue
        out.append((lv, dev[lv]))
        del left[lv]
    return out


# Trabecular density falls along the spine from the lower thoracic to the first lumbar bodies: "Vertebral body
# trabecular density at the thoracolumbar junction using quantitative computed tomography" (26 post-mortem
# spines: a significant decrease from T10 to L1); Xue et al., Asian Spine J 2024;18(3):336-345,
# doi:10.31616/asj.2023.0438 (470 patients: the cut-offs for osteoporosis and for normal BMD are 105 and
# 147 HU at T11, 86 and 136 HU at T12).


def build_vertebrae(
    *,
    volume: Volume,
    canon: Volume,
    seg: SpineSegmentation,
    stats: Mapping[str, RoiStats],
    fit: cal.TissueFit,
    correction: float,
    vbmd_ok: bool,
    min_roi_mm3: float,
    outline: Callable[[Volume, Volume, RoiStats, int], RoiOutline | None],
) -> list[VertebraResult]:
    """One ``VertebraResult`` per named level (cranial to caudal) with QC applied."""
    order = {lv: i for i, lv in enumerate(REPORTED_LEVELS)}
    slice_mm = float(canon.spacing[2])
    levels = [lv for lv in seg.levels if lv in stats]
    reasons: dict[str, list[str]] = {lv: [] for lv in levels}
    qcs: dict[str, list[str]] = {lv: [] for lv in levels}
    ratio: dict[str, float | None] = {}

    def _max_h(lv: str | None) -> float | None:
        return None if lv is None else reference_height(stats[lv], lv in seg.truncated)

    # how many of a level's reasons are about its shape or the scan's edge, not its trabecular bone
    shape_only: dict[str, int] = {lv: 0 for lv in levels}
    for i, lv in enumerate(levels):
        st = stats[lv]
        if lv in seg.truncated:
            reasons[lv].append("vertebral body cut by the field of view")
            shape_only[lv] += 1
        elif st.near_edge:
            reasons[lv].append(
                f"vertebral body ends within {PROFILE_BEYOND_MM:.0f} mm of the scan's edge (its end plate "
                "and the disc beyond are not in view)"
            )
            shape_only[lv] += 1
        if lv in seg.unreliable:
            reasons[lv].append(seg.unreliable[lv])
        if st.metal_mm3 >= METAL_MIN_MM3:
            reasons[lv].append(f"metal or cement in the body ({st.metal_mm3:.0f} mm3 above 2000 HU)")
        if st.volume_mm3 < min_roi_mm3:
            reasons[lv].append(f"trabecular ROI too small ({st.volume_mm3:.0f} mm3 < {min_roi_mm3:.0f} mm3)")
        h = st.heights_mm
        ratio[lv] = None
        if h is None or lv in seg.truncated or max(h) <= 0:
            continue
        # L5 is physiologically shorter at the back (lumbosacral wedge): judge it on anterior and middle
        cand = (0, 1) if lv == "L5" else (0, 1, 2)
        i_min = min(cand, key=lambda k: h[k])
        i_max = int(np.argmax(h))
        r = h[i_min] / h[i_max]
        ratio[lv] = r
        nb = [
            x
            for x in (
                _max_h(levels[i - 1] if i > 0 else None),
                _max_h(levels[i + 1] if i + 1 < len(levels) else None),
            )
            if x is not None
        ]
        # exclude only when the ratio is below the grade-2 line by more than FRACTURE_Z of its own standard
        # error (noisy profiles on thick slices scatter the fitted line: a regular body can read 0.65 there)
        se_r = ratio_se(h, st.heights_se_mm, i_min, i_max, slice_mm)
        z = fracture_z(st.heights_dof)
        surely_below = r + z * se_r < FRACTURE_EXCLUDE_RATIO
        unc = f"SE {se_r:.3f}"
        mh = st.mask_heights_mm
        r_mask = min(mh) / max(mh) if mh is not None and max(mh) > 0 else None
        if r < IMPLAUSIBLE_RATIO:
            # a body at a fraction of its height is vertebra plana, a rarity in screening: far more often the
            # outline met the disc or the next body. Excluded, but not called a fracture.
            reasons[lv].append(
                f"vertebral body outline unreliable (height ratio {_trunc3(r)}, heights "
                f"{'/'.join(f'{x:.0f}' for x in h)} mm): not measured"
            )
            shape_only[lv] += 1
        elif st.heights_se_mm is None and r < FRACTURE_RATIO:
            # the end-plate profiles failed and the heights are the working-grid outline's, which follows
            # the segmentation rather than the end plates (it read a regular Basel L1 at 0.46 on a copy with
            # a smaller field of view): a deformity is flagged for review, never excluded on it alone
            qcs[lv].append(
                f"height ratio {_trunc3(r)} from the body outline only (end-plate profiles not found): "
                "fracture not assessed, check the sagittal view"
            )
        elif surely_below and r_mask is not None and r_mask >= MASK_REGULAR_RATIO:
            # the end-plate profiles read a grade 2-3 deformity but the body's own outline is regular: one
            # of the two height estimates met something else (a thin disc merged with its end plates, a
            # bone island, the next body). Not called a fracture; the level is kept and flagged.
            qcs[lv].append(
                f"height ratio unclear (end-plate profiles {_trunc3(r)}, body outline {_trunc3(r_mask)}): "
                "fracture not assessed, check the sagittal view"
            )
        elif r < FRACTURE_RATIO and st.height_step_mm is not None:
            # the profiles' heights step part-way through the depth by more than the slices can make: one end
            # plate's edge jumped to another structure (past a thin disc smeared by the slices or a tilt, onto
            # the next body's end plate), and the ratio between the two sides of the step is no evidence of a
            # wedge, whose heights change gradually. Not called a fracture; the level is kept and flagged.
            qcs[lv].append(
                f"height ratio unclear (end-plate profiles {_trunc3(r)}, but their heights step by "
                f"{st.height_step_mm:.1f} mm part-way through the depth, more than the slices explain): "
                "fracture not assessed, check the sagittal view"
            )
        elif surely_below and nb and max(h) > TALLER_THAN_NEIGHBOURS * max(nb):
            # a compression fracture shortens a body; profiles that read it much taller than either neighbour
            # ran past one of its end plates (into the disc or the next body), and the ratio they give is no
            # evidence of a wedge. Not called a fracture; the level is kept and flagged.
            qcs[lv].append(
                f"height ratio unclear (end-plate profiles {_trunc3(r)}, but their tallest height "
                f"{max(h):.1f} mm exceeds the neighbours' {max(nb):.1f} mm by more than "
                f"{round(100 * (TALLER_THAN_NEIGHBOURS - 1))} %): fracture not assessed, check the sagittal "
                "view"
            )
        elif surely_below:
            grade = 2 if r >= GRADE3_RATIO else 3
            reasons[lv].append(
                f"suspected compression fracture (height ratio {_trunc3(r)} < {FRACTURE_EXCLUDE_RATIO} "
                f"by more than {z:.3g} SE ({se_r:.3f}), Genant grade {grade}): excluded"
            )
        elif r < FRACTURE_EXCLUDE_RATIO:
            qcs[lv].append(
                f"possible mild deformity (height ratio {_trunc3(r)} < {FRACTURE_RATIO}, {unc}: Genant "
                "grade 1 or 2 within the measurement uncertainty; physiological wedging looks alike): kept"
            )
        elif r < FRACTURE_RATIO:
            qcs[lv].append(
                f"possible mild deformity (height ratio {_trunc3(r)} < {FRACTURE_RATIO}, Genant grade 1; "
                "physiological wedging looks alike): kept"
            )
        elif (
            st.heights_se_mm is not None
            and st.height_step_mm is None
            and nb
            and max(h) < FRACTURE_RATIO * float(np.mean(nb))
        ):
            reasons[lv].append(
                f"suspected compression fracture (height {max(h):.1f} mm < 80% of neighbours' "
                f"{np.mean(nb):.1f} mm)"
            )

    # two bodies in one segment: the top body of the column in view (nothing whole above it: every vertebra
    # above it, reported or not, is cut by the scan's edge), taller than the body below it by any height
    # estimate (a merged body's end-plate profiles and outline both run past the missed disc). Only there: a
    # disc missed between two bodies inside the column leaves a gap in the chain of discs that is filled
    # (``classical._fill_gaps``), but above the top disc the column's extent is not known; and a body below
    # that is a fragment (a false disc split it) would make any body above it look tall.
    def _tallest(lv: str) -> float | None:
        st = stats[lv]
        hs = [max(h) for h in (st.heights_mm, st.mask_heights_mm) if h is not None and max(h) > 0]
        return max(hs) if hs and lv not in seg.truncated and not st.near_edge else None

    def _cut(lv: str) -> bool:
        return lv in seg.truncated or (lv in stats and stats[lv].near_edge)

    tallest = [_tallest(lv) for lv in levels]  # ``levels`` runs cranial to caudal, as ``seg.levels``
    top = next((i for i, h in enumerate(tallest) if h is not None), None)
    if top is not None and top + 1 < len(levels):
        h_top, h_below = tallest[top], tallest[top + 1]
        above = seg.levels[: seg.levels.index(levels[top])]
        fractured = any("fracture" in r for r in reasons[levels[top + 1]])  # short because it is crushed
        if (
            h_top is not None
            and h_below is not None
            and h_top > TWO_BODIES * h_below
            and not fractured
            and all(_cut(lv) for lv in above)
        ):
            reasons[levels[top]].append(
                f"vertebral body {h_top:.0f} mm tall, more than {TWO_BODIES:g} times the body below it "
                f"({h_below:.0f} mm): two bodies in one segment (a disc missed), not measured"
            )
    # outliers against the other levels (calibrated HU), among otherwise valid levels
    cal_hu = {lv: fit.apply(stats[lv].mean) for lv in levels if np.isfinite(stats[lv].mean)}
    valid = [lv for lv in levels if not reasons[lv] and lv in cal_hu]
    # bodies set aside only for their shape or the scan's edge (cut by the field of view, ending near the
    # edge, an outline that met something else), with a ROI of full size: their trabecular bone is measured
    beside = {
        lv: cal_hu[lv]
        for lv in levels
        if lv in cal_hu
        and lv not in valid
        and len(reasons[lv]) == shape_only[lv]
        and stats[lv].volume_mm3 >= min_roi_mm3
    }
    for lv, d in _outliers({lv: cal_hu[lv] for lv in valid}, beside, tuple(seg.levels)):
        qcs[lv].append(f"trabecular HU {d:+.0f} HU from the other measured levels' median")
        reasons[lv].append("outlier against neighbours (lesion, sclerosis or mislabelled structure?)")
    out: list[VertebraResult] = []
    for lv in sorted(levels, key=lambda v: order.get(v, 99)):
        st = stats[lv]
        excl = bool(reasons[lv])
        v_bmd = None
        if vbmd_ok and np.isfinite(st.mean) and not excl:
            v_bmd = float(cal.vbmd_from_hu(fit.apply(st.mean), correction))
        if seg.level_uncertain:
            qcs[lv].append("level naming uncertain")
        mid_k: int | None = None
        oline = None
        if np.isfinite(st.centroid_ijk[2]):
            mid_k = round(st.centroid_ijk[2])
            oline = outline(volume, canon, st, mid_k)
        cen = (
            tuple(float(c) for c in canon.index_to_lps(st.centroid_ijk))
            if np.isfinite(st.centroid_ijk[0])
            else (np.nan, np.nan, np.nan)
        )
        out.append(
            VertebraResult(
                level=lv,
                level_uncertain=seg.level_uncertain,
                excluded=excl,
                qc=tuple(qcs[lv]) + tuple(reasons[lv]),
                trabecular_hu_mean=st.mean,
                trabecular_hu_median=st.median,
                trabecular_hu_sd=st.sd,
                roi_volume_mm3=st.volume_mm3,
                roi_centroid_lps_mm=(cen[0], cen[1], cen[2]),
                vbmd_mg_cm3=v_bmd,
                exclusion_reason="; ".join(reasons[lv]) if excl else None,
                height_ratio=ratio.get(lv),
                mid_slice_index=mid_k,
                outline=oline,
            )
        )
    return out


def summarise(
    rows: Sequence[VertebraResult],
    phase: ContrastPhase,
    calib: Calibration,
    notes: list[str],
    uncertain: bool,
) -> Summary:
    """ACR category on L1-L2 (or the nearest valid pair), L1 HU and its flags, notes."""
    by = {r.level: r for r in rows}
    notes = list(notes)
    used: tuple[str, ...] = ()
    vb: float | None = None
    for a, b in PAIRS:
        ra, rb = by.get(a), by.get(b)
        if ra and rb and ra.vbmd_mg_cm3 is not None and rb.vbmd_mg_cm3 is not None:
            used = (a, b)
            vb = 0.5 * (ra.vbmd_mg_cm3 + rb.vbmd_mg_cm3)
            break
    if used and used != ("L1", "L2") and not uncertain:
        why = [
            f"{lv}: {by[lv].exclusion_reason}" if lv in by else f"{lv}: not in view"
            for lv in ("L1", "L2")
            if lv not in by or by[lv].vbmd_mg_cm3 is None
        ]
        notes.append(
            f"L1-L2 not both usable ({'; '.join(why) or 'not in view'}); category on {used[0]}-{used[1]}"
        )
    if not used and not uncertain:
        singles = [r for r in rows if r.vbmd_mg_cm3 is not None and r.level in ("L1", "L2", "L3")]
        if singles:
            used = (singles[0].level,)
            vb = singles[0].vbmd_mg_cm3
            notes.append(f"no valid pair of adjacent lumbar vertebrae; category on {used[0]} alone")
        else:
            notes.append("no vBMD available for classification")
    l1 = by.get("L1")
    l1_hu = l1.trabecular_hu_mean if l1 is not None and not l1.excluded else None
    if l1 is not None and l1.excluded:
        notes.append(f"L1 excluded: {l1.exclusion_reason}")
    if uncertain:
        # a category, an L1 value or L1 thresholds for vertebrae that may be misnamed would be a diagnosis
        # about the wrong bone: withheld, the per-vertebra values stay (marked uncertain)
        notes.append(
            "vertebral level naming uncertain (see the naming evidence): no category and no L1 figures; "
            "per-vertebra values are shown, marked uncertain"
        )
        vb, l1_hu, used = None, None, ()
    return Summary(
        l1_hu=l1_hu,
        vbmd_l1_l2_mg_cm3=vb,
        category=category(vb) if vb is not None else None,
        levels_used=used,
        contrast_phase=phase,
        calibration=calib,
        l1_hu_flags=l1_hu_flags(l1_hu) if l1_hu is not None else (),
        notes=tuple(dict.fromkeys(notes)),
    )


def _age_from_string(v: str) -> float | None:
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", v.upper())
    if not m:
        return None
    n = float(m.group(1))
    unit = m.group(2) or "Y"
    return {"Y": n, "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}[unit]


def _date(v: Any) -> _dt.date | None:
    s = str(v or "").strip()[:8]
    try:
        return _dt.datetime.strptime(s, "%Y%m%d").date()
    except ValueError:
        return None


def patient_info(header: Mapping[str, Any]) -> PatientInfo:
    """Age (years) from PatientAge, else birth date and study date; sex M/F/O; missing -> None."""
    age: float | None = None
    pa = header.get("PatientAge")
    if isinstance(pa, int | float) and not isinstance(pa, bool):
        age = float(pa)
    elif pa:
        age = _age_from_string(str(pa))
    if age is None:
        b = _date(header.get("PatientBirthDate"))
        s = _date(header.get("StudyDate") or header.get("SeriesDate") or header.get("AcquisitionDate"))
        if b and s and s >= b:
            age = round((s - b).days / 365.25, 1)
    sex_raw = str(header.get("PatientSex") or "").strip().upper()
    sex = sex_raw if sex_raw in ("M", "F", "O") else None
    return PatientInfo(age_years=age, sex=sex)
