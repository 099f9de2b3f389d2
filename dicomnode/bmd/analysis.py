"""``analyze_volume``: vertebrae -> trabecular ROIs -> internal calibration -> vBMD -> category and QC.

See :mod:`dicomnode.bmd.classical` (detection and naming), :mod:`dicomnode.bmd.roi` (ROI),
:mod:`dicomnode.bmd.calibration` (HU -> vBMD, contrast) and :mod:`dicomnode.bmd.qc` (classification, QC).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

import dicomnode
from dicomnode.bmd import calibration as cal
from dicomnode.bmd import qc
from dicomnode.bmd.classical import ClassicalBackend, ClassicalContext
from dicomnode.bmd.grid import CoarseGrid, body_mask, make_coarse
from dicomnode.bmd.roi import Box, RoiStats, outline_on_slice, padded_box, trabecular_roi
from dicomnode.bmd.segmentation import SegmentationBackend, SpineSegmentation, get_backend
from dicomnode.bmd.tissues import (
    SpineFrame,
    depth_from_skin,
    measure_air,
    measure_aorta,
    measure_fat,
    measure_muscle,
    measure_psoas,
    outline_hull,
)
from dicomnode.domain import (
    REPORTED_LEVELS,
    AnalysisResult,
    AnalysisStatus,
    ContrastPhase,
)
from dicomnode.errors import AnalysisError, DicomnodeError, NotQualifyingError
from dicomnode.imaging.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BmdOptions:
    """Measurement settings (mm everywhere).

    Attributes
    ----------
    erosion_mm
        Distance kept from the outer body surface (cortex and partial volume), and from the cortex's inner
        edge where the image shows it (``roi._inner_outline``); TotalSegmentator's spine report erodes 4 mm.
    endplate_margin_mm
        Distance kept from the end plates along the cranio-caudal axis (at least erosion + half a slice).
    min_roi_volume_mm3
        Smaller ROIs are excluded (too few voxels for a stable mean): 500 mm3 is at least 100 voxels on the
        coarsest common grid (1 x 1 x 5 mm), a standard error of the mean of at most ~6 HU at a trabecular
        SD of 60 HU, ~2 HU on a 0.8 x 0.8 x 2.5 mm grid. The ROI keeps ``erosion_mm`` inside the cortex's
        inner edge and its oval is sized from the trabecular compartment, not the body mask: a median
        1.5-1.6 cm3 at L1 on the two real CTs' re-encoded copies (``benchmarks/roi_replay.py``).
    contrast_correction
        ``"offset"`` subtracts the population contrast offset, ``"abstain"`` gives no vBMD after contrast.
    backend
        Segmentation backend name (:func:`dicomnode.bmd.get_backend`).
    """

    erosion_mm: float = dicomnode.DEFAULT_EROSION_MM
    endplate_margin_mm: float = 5.0
    min_roi_volume_mm3: float = 500.0
    contrast_correction: Literal["offset", "abstain"] = "offset"
    backend: str = "classical"


class LabelMasks(Mapping[str, npt.NDArray[np.bool_]]):
    """Read-only mapping level -> boolean mask, computed on access from one label volume.

    Keeps memory at one ``uint8`` volume instead of one boolean volume per level. ``boxes`` (optional) gives
    per level a box of the label volume outside which that level's label does not occur: a mask is then
    compared inside its box only (the rest is the zeros of a fresh array), and :meth:`box` tells a reader
    (the overlays) where to look.
    """

    def __init__(
        self,
        labels: npt.NDArray[np.uint8],
        levels: Mapping[str, int],
        boxes: Mapping[str, Box] | None = None,
    ) -> None:
        self.labels = labels
        self._levels = dict(levels)
        self._boxes = {k: v for k, v in (boxes or {}).items() if k in self._levels}

    def __getitem__(self, level: str) -> npt.NDArray[np.bool_]:
        q = self._levels[level]
        box = self._boxes.get(level)
        if box is None:
            return np.asarray(self.labels == q)
        out = np.zeros(self.labels.shape, dtype=bool)
        out[box] = self.labels[box] == q
        return out

    def box(self, level: str) -> Box | None:
        """A box outside which ``level``'s mask is all False (None: unknown, the whole volume)."""
        return self._boxes.get(level)

    def __iter__(self) -> Iterator[str]:
        return iter(self._levels)

    def __len__(self) -> int:
        return len(self._levels)


@dataclass(frozen=True, eq=False)
class BmdOutput:
    """Everything the report needs: the result, the canonical volume and the masks on its grid."""

    result: AnalysisResult
    canonical: Volume
    body_masks: Mapping[str, npt.NDArray[np.bool_]]
    roi_masks: Mapping[str, npt.NDArray[np.bool_]]
    segmentation: SpineSegmentation | None = None


def _find_objects(labels: npt.NDArray[np.uint8], label_box: object = None) -> list[Box | None]:
    """``ndi.find_objects(labels)``; read inside ``label_box`` only when the backend gave one (the hint
    ``label_box``: a box outside which every label is 0), which gives the same boxes for a fraction of
    the work."""
    if not (
        isinstance(label_box, tuple) and len(label_box) == 3 and all(isinstance(b, slice) for b in label_box)
    ):
        return list(ndi.find_objects(labels))
    starts = [int(b.indices(n)[0]) for b, n in zip(label_box, labels.shape, strict=True)]
    out: list[Box | None] = []
    for o in ndi.find_objects(labels[label_box]):
        if o is None:
            out.append(None)
        else:
            out.append(
                (
                    slice(o[0].start + starts[0], o[0].stop + starts[0]),
                    slice(o[1].start + starts[1], o[1].stop + starts[1]),
                    slice(o[2].start + starts[2], o[2].stop + starts[2]),
                )
            )
    return out


def _frame_from_labels(
    seg: SpineSegmentation, canon: Volume, grid: CoarseGrid
) -> tuple[SpineFrame, int, int]:
    """Per coarse slice: body centre x, front/back y and half width (mm), from the body labels sampled
    onto the working grid (nearest neighbour; cheap even for 512 x 512 x 500 volumes)."""
    g = grid.g
    nz, ny, nx = grid.hu.shape
    ks = np.clip(np.round(np.arange(nz) * grid.step[2]).astype(int), 0, canon.shape[0] - 1)
    js = np.clip(np.round(np.arange(ny) * grid.step[1]).astype(int), 0, canon.shape[1] - 1)
    is_ = np.clip(np.round(np.arange(nx) * grid.step[0]).astype(int), 0, canon.shape[2] - 1)
    lab = seg.body_labels[np.ix_(ks, js, is_)]
    x = np.full(nz, np.nan)
    yf = np.full(nz, np.nan)
    yb = np.full(nz, np.nan)
    hw = np.full(nz, np.nan)
    zs = np.nonzero(lab.any(axis=(1, 2)))[0]
    for z in zs:
        jj, ii = np.nonzero(lab[z])
        x[z] = ii.mean() * g
        yf[z] = np.percentile(jj, 2) * g
        yb[z] = np.percentile(jj, 98) * g
        hw[z] = 0.5 * (np.percentile(ii, 98) - np.percentile(ii, 2)) * g
    ok = np.isfinite(x)
    idx = np.nonzero(ok)[0]
    if idx.size:
        zz = np.arange(nz)
        x = np.where(ok, x, np.interp(zz, idx, x[idx]))
        yf = np.where(ok, yf, np.interp(zz, idx, yf[idx]))
        yb = np.where(ok, yb, np.interp(zz, idx, yb[idx]))
        hw = np.where(ok, hw, np.interp(zz, idx, hw[idx]))
    yc = yb + 10.0  # canal centre ~10 mm behind the posterior wall
    # tissue slab: L1-L4 when named, else the whole labelled range
    lumbar = [i + 1 for i, lv in enumerate(seg.levels) if lv in ("L1", "L2", "L3", "L4")]
    present = np.zeros(len(seg.levels) + 2, dtype=bool)
    present[lumbar] = True
    sel = present[np.minimum(lab, len(seg.levels) + 1)].any(axis=(1, 2)) if lumbar else lab.any(axis=(1, 2))
    kk = np.nonzero(sel)[0]
    if kk.size == 0:
        kk = zs
    z_lo = int(kk.min()) if kk.size else 0
    z_hi = int(kk.max()) if kk.size else nz - 1
    return SpineFrame(x, yf, yc, z_lo, z_hi, yb, hw), z_lo, z_hi


def analyze_volume(volume: Volume, options: BmdOptions | None = None) -> BmdOutput:
    """Measure trabecular bone of T11-L5 in one CT volume and convert it to vBMD.

    Parameters
    ----------
    volume
        A HU volume with LPS geometry (any orientation; analysis runs on ``volume.canonical()``).
    options
        Measurement settings; defaults when None.

    Returns
    -------
    BmdOutput
        Result (status ok), canonical volume, body and ROI masks per level on the canonical grid.

    Raises
    ------
    NotQualifyingError
        The lumbar spine is not in view or no spine is found.
    AnalysisError
        The measurement failed otherwise (no usable vertebra, degenerate volume).
    """
    opts = options or BmdOptions()
    try:
        return _analyze(volume, opts)
    except DicomnodeError:
        raise
    except (ValueError, IndexError, MemoryError, FloatingPointError) as exc:  # pragma: no cover - safety net
        msg = " ".join(str(exc).split())[:200]
        raise AnalysisError(f"BMD analysis failed: {type(exc).__name__}: {msg}") from exc


def _analyze(volume: Volume, opts: BmdOptions) -> BmdOutput:
    if volume.data.ndim != 3 or min(volume.shape) < 2:
        raise NotQualifyingError(f"not a 3-D volume (shape {volume.shape})")
    canon = volume.canonical()
    sx, sy, sz = canon.spacing
    extent_z = canon.shape[0] * sz
    if extent_z < 40.0:
        raise NotQualifyingError(f"z coverage {extent_z:.0f} mm is too short for a lumbar vertebra")
    if sz > 10.0 or max(sx, sy) > 5.0:
        raise NotQualifyingError(
            f"voxels too coarse for trabecular measurement ({sx:.1f}x{sy:.1f}x{sz:.1f} mm)"
        )
    grid = make_coarse(canon)
    g = grid.g
    body = body_mask(grid.hu, g)
    if body.sum() * g**3 < 1.0e6:
        raise NotQualifyingError("no trunk in view (body volume below 1 litre)")

    # 1. air and fat first: they need no anatomy, and they put the detection thresholds on a common scale.
    # Tissues are sampled on every third working slice (6 mm apart): plenty of voxels, a third of the work.
    tz = np.zeros(grid.hu.shape[0], dtype=bool)
    tz[::3] = True
    depth = np.zeros(grid.hu.shape, dtype=np.float32)
    hull = outline_hull(body[tz])
    depth[tz] = depth_from_skin(body[tz], g, hull=hull)
    air = measure_air(grid.hu[tz], body[tz], g, hull=hull)
    fat = measure_fat(grid.hu[tz], body[tz], depth[tz])
    pre = cal.fit_tissue_map({"air": air, "fat": fat}, ContrastPhase.UNKNOWN)
    hu_cal = (grid.hu * np.float32(pre.gain) + np.float32(pre.offset)).astype(np.float32)

    # 2. vertebral bodies and their names
    backend: SegmentationBackend
    if opts.backend == "classical":
        backend = ClassicalBackend()
        seg = backend.segment(canon, context=ClassicalContext(grid, body, hu_cal))
    else:
        backend = get_backend(opts.backend)
        seg = backend.segment(canon)
    frame, _, _ = _frame_from_labels(seg, canon, grid)

    # 3. muscle and aorta, contrast phase, final calibration
    # psoas first (keeps its density with age); paraspinal muscle when the psoas is not measurable
    tframe = SpineFrame(
        frame.x_mm[tz],
        frame.y_front_mm[tz],
        frame.y_canal_mm[tz],
        int(np.ceil(frame.z_lo / 3)),
        frame.z_hi // 3,
        None if frame.y_back_mm is None else frame.y_back_mm[tz],
        None if frame.half_width_mm is None else frame.half_width_mm[tz],
    )
    # muscle and blood windows are in reference HU: measure on the air/fat-calibrated image, then map the
    # values back to the scanner's HU for the final fit (so the windows do not clip a shifted tissue)
    hu_t, body_t, depth_t = hu_cal[tz], body[tz], depth[tz]
    muscle_c = measure_psoas(hu_t, body_t, depth_t, tframe, g)
    if muscle_c is None:
        muscle_c = measure_muscle(hu_t, body_t, depth_t, tframe, g)
    aorta_cal = measure_aorta(hu_t, body_t, tframe, g)
    muscle = pre.invert(muscle_c) if muscle_c is not None else None
    aorta = pre.invert(aorta_cal) if aorta_cal is not None else None
    phase, phase_notes = cal.decide_phase(volume.header, aorta_cal)
    fit = cal.fit_tissue_map({"air": air, "fat": fat, "muscle": muscle, "blood": aorta}, phase)
    kvp, kernel, acq_flags = cal.acquisition_flags(volume.header)
    notes: list[str] = []
    vbmd_ok = True
    correction = 0.0
    if phase == ContrastPhase.NATIVE:
        pass
    elif phase == ContrastPhase.UNKNOWN:
        notes.append("contrast phase unknown: vBMD not corrected for contrast")
        acq_flags.append("contrast phase unknown")
    elif opts.contrast_correction == "abstain":
        vbmd_ok = False
        notes.append(f"{phase.value} phase: vBMD withheld (contrast correction = abstain)")
    else:
        correction = cal.CONTRAST_OFFSET_HU[phase]
        notes.append(
            f"{phase.value} phase: {correction:g} HU population contrast offset subtracted before conversion "
            "(individual spread ~19 HU; interpret near cut-offs with care)"
        )
        acq_flags.append(f"contrast-enhanced ({phase.value}), offset-corrected")
    calib = cal.build_calibration(fit, kvp, kernel, correction, acq_flags, vbmd_ok)
    notes.extend(phase_notes)

    # 4. per-level ROIs at full resolution
    objs = _find_objects(seg.body_labels, seg.hints.get("label_box"))
    roi_labels = np.zeros(canon.shape, dtype=np.uint8)
    stats: dict[str, RoiStats] = {}
    body_boxes: dict[str, Box] = {}
    roi_boxes: dict[str, Box] = {}
    for q, lvl in enumerate(seg.levels, start=1):
        found = objs[q - 1] if q - 1 < len(objs) else None
        if found is None:
            continue
        body_boxes[lvl] = found
        box = padded_box(found, canon.shape)
        roi_boxes[lvl] = box
        body_q = seg.body_labels[box] == q
        axis = seg.hints.get("axes", {}).get(lvl) if isinstance(seg.hints.get("axes"), dict) else None
        st = trabecular_roi(canon, body_q, box, opts.erosion_mm, opts.endplate_margin_mm, axis)
        stats[lvl] = st
        sub = roi_labels[box]
        sub[st.roi] = q

    rows = qc.build_vertebrae(
        volume=volume,
        canon=canon,
        seg=seg,
        stats=stats,
        fit=fit,
        correction=correction,
        vbmd_ok=vbmd_ok,
        min_roi_mm3=opts.min_roi_volume_mm3,
        outline=outline_on_slice,
    )
    reported = tuple(r for r in rows if r.level in REPORTED_LEVELS)
    if not any(r.level.startswith("L") for r in reported):
        seen = ", ".join(seg.levels) or "none"
        if seg.level_uncertain:
            # the names are a guess: a lumbar vertebra in view may carry a thoracic name
            raise NotQualifyingError(
                f"no vertebra named lumbar, and the naming is uncertain (vertebrae found: {seen})"
            )
        raise NotQualifyingError(f"lumbar spine not in view (vertebrae found: {seen})")
    if all(r.excluded for r in reported):
        reasons = "; ".join(f"{r.level}: {r.exclusion_reason}" for r in reported)
        raise AnalysisError(f"no usable vertebra T11-L5 ({reasons})"[:300])
    summary = qc.summarise(reported, phase, calib, notes + list(seg.evidence), seg.level_uncertain)
    header = volume.header
    result = AnalysisResult(
        status=AnalysisStatus.OK,
        reason=None,
        study_instance_uid=str(header.get("StudyInstanceUID") or ""),
        series_instance_uid=str(header.get("SeriesInstanceUID") or ""),
        vertebrae=reported,
        summary=summary,
        patient=qc.patient_info(header),
        algorithm_name=dicomnode.ALGORITHM_NAME,
        algorithm_version=f"{dicomnode.__version__}+{backend.name}.{backend.version}",
        warnings=tuple(calib.flags),
    )
    index = {lvl: q for q, lvl in enumerate(seg.levels, start=1)}
    return BmdOutput(
        result=result,
        canonical=canon,
        body_masks=LabelMasks(seg.body_labels, index, body_boxes),
        roi_masks=LabelMasks(roi_labels, {k: v for k, v in index.items() if k in stats}, roi_boxes),
        segmentation=seg,
    )
