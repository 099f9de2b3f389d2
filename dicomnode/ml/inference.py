"""Apply bundles to a series: segmentation (levels) and vBMD, added to the engine's ``AnalysisResult``.

The node's one measurement entry point is :func:`dicomnode.pipeline.measure.make_measure`: the engine
(``dicomnode.bmd.analyze_volume``, with a segmentation bundle as its backend when configured), then
:func:`apply_bmd_bundle` for a vBMD bundle.

Every entry point first calls :func:`~dicomnode.ml.bundle.check_input_spec`, so a bundle is never applied to
a series its spec cannot meet.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from dicomnode.domain import (
    REPORTED_LEVELS,
    AnalysisResult,
    AnalysisStatus,
)
from dicomnode.errors import BundleError
from dicomnode.imaging.volume import Volume
from dicomnode.ml.bundle import LoadedBundle, check_input_spec
from dicomnode.ml.datasets import LEVEL_CLASSES, SEG_SACRUM, SEG_VERTEBRA
from dicomnode.ml.preprocess import Prepared, crop, pad_to_multiple, prepare, resample_back
from dicomnode.vocab import acr_category

log = logging.getLogger(__name__)

#: Vertebral bodies smaller than this (mm3) are treated as spurious and dropped.
MIN_BODY_MM3 = 1500.0


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Level labels (0 background, 1..7 = T11..L5) on the canonical grid of ``canonical``."""

    labels: npt.NDArray[np.int16]
    canonical: Volume
    notes: tuple[str, ...] = ()

    def levels(self) -> tuple[str, ...]:
        present = set(np.unique(self.labels).tolist())
        return tuple(lvl for lvl in REPORTED_LEVELS if LEVEL_CLASSES[lvl] in present)

    def centroid_lps(self, level: str) -> tuple[float, float, float] | None:
        kji = np.argwhere(self.labels == LEVEL_CLASSES[level])
        if len(kji) == 0:
            return None
        p = self.canonical.index_to_lps(kji.mean(axis=0)[::-1])
        return (float(p[0]), float(p[1]), float(p[2]))


def _spec_check(bundle: LoadedBundle, task: str) -> None:
    if bundle.manifest.task != task:
        raise BundleError(f"bundle {bundle.name} is a {bundle.manifest.task} bundle, not {task}")


def _coarse_probabilities(bundle: LoadedBundle, prep: Prepared, overlap: float) -> npt.NDArray[np.float32]:
    from monai.inferers.utils import sliding_window_inference

    spec = bundle.input_spec
    arr, shape = pad_to_multiple(prep.array, 8)
    x = torch.from_numpy(arr[None, None]).to(bundle.device)
    with torch.no_grad():
        logits = sliding_window_inference(
            x,
            tuple(spec.patch_size),
            sw_batch_size=1,
            predictor=bundle.network,
            overlap=overlap,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)  # a plain predictor gives a plain tensor
        probs = torch.softmax(logits, dim=1)[0, :, : shape[0], : shape[1], : shape[2]].cpu().numpy()
    return np.asarray(probs, dtype=np.float32)


def _upsampled_argmax(probs: npt.NDArray[np.float32], prep: Prepared) -> npt.NDArray[np.int16]:
    best = np.zeros(prep.grid.source_shape, np.float32)
    labels = np.zeros(prep.grid.source_shape, np.int16)
    for c in range(probs.shape[0]):  # class by class keeps memory at two canonical-size arrays
        p = resample_back(probs[c], prep.grid, order=1)
        better = p > best
        best[better] = p[better]
        labels[better] = c
    return labels


def segment_levels_prepared(
    bundle: LoadedBundle, prep: Prepared, overlap: float = 0.25
) -> tuple[npt.NDArray[np.int16], list[str]]:
    """Level labels (0, 1..7 = T11..L5) on the canonical grid.

    The bodies are split and named on the network's coarse grid (cheap), then each canonical body voxel
    (from the upsampled probabilities) takes the level of its coarse neighbourhood. Naming on the full grid
    would need distance transforms of a 512 x 512 x 300 volume (gigabytes, most of a minute).

    Parameters
    ----------
    bundle : LoadedBundle
        Segmentation bundle.
    prep : Prepared
        Prepared with the bundle's spec.
    overlap : float
        Sliding-window overlap.

    Returns
    -------
    (labels, notes)
        Level classes on the canonical grid and notes from the naming.
    """
    probs = _coarse_probabilities(bundle, prep, overlap)
    coarse = np.argmax(probs, axis=0).astype(np.int16)
    grid_vol = Volume(data=np.zeros((1, 1, 1), np.float32), affine=prep.grid.affine)
    coarse_levels, notes = label_levels(coarse, grid_vol)
    # let each level reach one coarse voxel into the background, so fine boundary voxels find a level
    grown = ndimage.grey_dilation(coarse_levels, size=(3, 3, 3))
    coarse_levels = np.where(coarse_levels > 0, coarse_levels, grown).astype(np.int16)
    fine_levels = resample_back(coarse_levels, prep.grid, order=0)
    classes = _upsampled_argmax(probs, prep)
    out = np.where(classes == SEG_VERTEBRA, fine_levels, 0).astype(np.int16)
    return out, notes


def split_bodies(
    mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float]
) -> tuple[npt.NDArray[np.int32], int]:
    """Connected vertebral bodies, separated where a thin bridge joins two across a disc.

    The mask is eroded by increasing distances (0, 2, 4, 6 mm); the erosion giving the most body-sized cores
    wins (the smallest on ties), and every mask voxel then joins its nearest core.

    Parameters
    ----------
    mask : ndarray of bool
        Vertebral-body voxels (canonical grid).
    spacing : (float, float, float)
        Voxel size along i, j, k.

    Returns
    -------
    (components, n)
        Component ids (0 outside the mask) and their count.
    """
    if not mask.any():
        return np.zeros(mask.shape, np.int32), 0
    sampling = (spacing[2], spacing[1], spacing[0])
    dist = ndimage.distance_transform_edt(mask, sampling=sampling)
    voxel_mm3 = float(np.prod(spacing))
    best: tuple[int, npt.NDArray[np.int32], int] | None = None
    for r in (0.0, 2.0, 4.0, 6.0):
        core, n = ndimage.label(dist > r, structure=np.ones((3, 3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(core.ravel())[1:] * voxel_mm3
        big = int(np.sum(sizes >= MIN_BODY_MM3 / 5.0))
        if best is None or big > best[0]:
            best = (big, core.astype(np.int32), n)
    assert best is not None
    _, core, n = best
    if n == 0:
        return np.zeros(mask.shape, np.int32), 0
    # every mask voxel takes the id of its nearest core voxel
    _, idx = ndimage.distance_transform_edt(core == 0, sampling=sampling, return_indices=True)
    nearest = core[idx[0], idx[1], idx[2]]
    comp = np.where(mask, nearest, 0).astype(np.int32)
    return comp, n


def label_levels(
    classes: npt.NDArray[np.integer], canonical: Volume
) -> tuple[npt.NDArray[np.int16], list[str]]:
    """Name the vertebral bodies T11..L5 by their order above the sacrum.

    Each connected vertebral-body component (26-connected, at least ``MIN_BODY_MM3``) is one vertebra; the
    lowest one above the sacrum's top is L5, the next L4 and so on up to T11. Without a sacrum in view the
    lowest body is taken as L5 and a note says the labels are uncertain.

    Parameters
    ----------
    classes : ndarray
        Network classes on the canonical grid (0 background, 1 vertebral body, 2 sacrum).
    canonical : Volume
        The canonical volume (for voxel size and the superior axis).

    Returns
    -------
    (labels, notes)
        Level classes (0, 1..7 = T11..L5) and human-readable notes.
    """
    notes: list[str] = []
    sp = canonical.spacing
    voxel_mm3 = float(sp[0] * sp[1] * sp[2])
    comp, n = split_bodies(classes == SEG_VERTEBRA, sp)
    out = np.zeros(classes.shape, np.int16)
    if n == 0:
        return out, ["no vertebral body segmented"]
    idx = np.arange(1, n + 1)
    ones = np.ones(classes.shape, np.float32)
    sizes = np.asarray(ndimage.sum_labels(ones, comp, index=idx)) * voxel_mm3
    kz = np.asarray(ndimage.mean(np.indices(classes.shape)[0], comp, index=idx))  # k grows superiorly
    bodies = [(float(kz[i]), int(idx[i])) for i in range(n) if sizes[i] >= MIN_BODY_MM3]
    dropped = n - len(bodies)
    if dropped:
        notes.append(f"{dropped} small vertebral fragment(s) ignored")
    sac = classes == SEG_SACRUM
    if sac.any():
        scomp, sn = ndimage.label(sac)
        ssizes = np.asarray(ndimage.sum_labels(ones, scomp, index=np.arange(1, sn + 1)))
        ks = np.argwhere(scomp == int(np.argmax(ssizes)) + 1)[:, 0]
        floor = max(float(ks.mean()), float(ks.max()) - 2.0)
        bodies = [b for b in bodies if b[0] > floor]
    else:
        notes.append("no sacrum in view: lowest vertebral body assumed to be L5 (levels uncertain)")
    bodies.sort()  # caudal first
    for lvl, (_, cid) in zip(reversed(REPORTED_LEVELS), bodies, strict=False):
        out[comp == cid] = LEVEL_CLASSES[lvl]
    return out, notes


def segment(bundle: LoadedBundle, volume: Volume) -> Segmentation:
    """Vertebral levels of a series with a segmentation bundle.

    Parameters
    ----------
    bundle : LoadedBundle
        Task ``segmentation``.
    volume : Volume
        HU volume.

    Returns
    -------
    Segmentation
        Labels on the canonical grid.

    Raises
    ------
    BundleError
        Wrong bundle task or the series does not meet the input spec.
    """
    _spec_check(bundle, "segmentation")
    check_input_spec(bundle, volume)
    spec = bundle.input_spec
    prep = prepare(volume, spec.spacing_mm, spec.intensity_window, spec.intensity_normalisation)
    labels, level_notes = segment_levels_prepared(bundle, prep)
    notes = list(prep.notes) + level_notes
    return Segmentation(labels, prep.canonical, tuple(notes))


def predict_vbmd_prepared(
    bundle: LoadedBundle, prep: Prepared, centroids_lps: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """vBMD (mg/cm3) per level from crops of a prepared array around each vertebral-body centroid.

    Parameters
    ----------
    bundle : LoadedBundle
        Task ``bmd``.
    prep : Prepared
        Prepared with the bundle's spec.
    centroids_lps : mapping
        Level -> body centroid (LPS mm).

    Returns
    -------
    dict
        Level -> vBMD.
    """
    size = tuple(int(s) for s in bundle.input_spec.patch_size)
    if len(size) != 3:
        raise BundleError(f"bundle {bundle.name}: 3D patch expected, got {size}")
    inv = np.linalg.inv(prep.grid.affine)
    levels = list(centroids_lps)
    if not levels:
        return {}
    crops = []
    for lvl in levels:
        ijk = np.asarray(centroids_lps[lvl], float) @ inv[:3, :3].T + inv[:3, 3]
        crops.append(crop(prep.array, (ijk[2], ijk[1], ijk[0]), (size[0], size[1], size[2])))
    x = torch.from_numpy(np.stack(crops)[:, None]).to(bundle.device)
    with torch.no_grad():
        out = bundle.network(x).cpu().numpy()
    return {lvl: float(out[i, 0]) for i, lvl in enumerate(levels)}


def predict_vbmd(
    bundle: LoadedBundle, volume: Volume, centroids_lps: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """vBMD per level with a ``bmd`` bundle (checks the input spec first)."""
    _spec_check(bundle, "bmd")
    check_input_spec(bundle, volume)
    spec = bundle.input_spec
    prep = prepare(volume, spec.spacing_mm, spec.intensity_window, spec.intensity_normalisation)
    return predict_vbmd_prepared(bundle, prep, centroids_lps)


@dataclass(frozen=True)
class SagittalPrediction:
    """What a sagittal bundle says about a series: vBMD of its reference levels, TBS when it has one."""

    vbmd_mg_cm3: float
    tbs: float | None
    levels: tuple[str, ...]  # the bundle's reference levels: what the value is the vBMD of
    centre_lps: tuple[float, float, float]
    notes: tuple[str, ...] = ()


def sagittal_centre(
    bundle: LoadedBundle, centroids_lps: Mapping[str, Sequence[float]]
) -> tuple[tuple[float, float, float], tuple[str, ...]] | None:
    """The reformat centre of a sagittal bundle: the mean centroid of its reference levels.

    A reference level without a (finite) centroid, e.g. one the engine excluded, is placed between its
    neighbours (or extrapolated from the two nearest on one side): vertebrae are stacked about evenly, and
    centring on the levels found alone would shift the reformat by half a vertebra from where training
    centred it.

    Parameters
    ----------
    bundle : LoadedBundle
        Task ``sagittal_bmd_tbs``.
    centroids_lps : mapping
        Level -> vertebral-body (or trabecular ROI) centroid, LPS mm.

    Returns
    -------
    (centre, notes) or None
        None when a reference level can be neither found nor placed from its neighbours.
    """
    wanted = [str(lvl) for lvl in (bundle.manifest.output.get("reference_levels") or ["L1", "L2"])]
    order = list(REPORTED_LEVELS)
    known: dict[int, npt.NDArray[np.float64]] = {}
    for lvl, c in centroids_lps.items():
        p = np.asarray(c, float)
        if lvl in order and p.shape == (3,) and np.isfinite(p).all():
            known[order.index(lvl)] = p
    points: list[npt.NDArray[np.float64]] = []
    notes: list[str] = []
    for lvl in wanted:
        m = order.index(lvl) if lvl in order else -1
        if m in known:
            points.append(known[m])
            continue
        below = sorted(i for i in known if i < m)
        above = sorted(i for i in known if i > m)
        if m < 0 or len(below) + len(above) < 2:
            return None
        if below and above:
            a, b = below[-1], above[0]
        elif below:
            a, b = below[-2], below[-1]
        else:
            a, b = above[0], above[1]
        t = (m - a) / (b - a)
        points.append(known[a] + t * (known[b] - known[a]))
        notes.append(f"reformat centre: {lvl} placed from {order[a]} and {order[b]}")
    c = np.mean(points, axis=0)
    return (float(c[0]), float(c[1]), float(c[2])), tuple(notes)


def predict_sagittal(
    bundle: LoadedBundle, volume: Volume, centroids_lps: Mapping[str, Sequence[float]]
) -> SagittalPrediction | None:
    """vBMD (and TBS, when the bundle was trained with it) of a series with a ``sagittal_bmd_tbs`` bundle.

    The mid-sagittal reformat is centred on the mean centroid of the bundle's reference levels
    (``output.reference_levels``, e.g. L1 and L2) and made exactly as in training
    (:func:`dicomnode.ml.preprocess.sagittal_planes` with the bundle's input spec).

    Parameters
    ----------
    bundle : LoadedBundle
        Task ``sagittal_bmd_tbs``.
    volume : Volume
        HU volume.
    centroids_lps : mapping
        Level -> vertebral-body centroid (LPS mm), from a segmentation or the classical engine's ROIs.

    Returns
    -------
    SagittalPrediction or None
        None when the reference levels can be neither found in ``centroids_lps`` nor placed from their
        neighbours (see :func:`sagittal_centre`).

    Raises
    ------
    BundleError
        Wrong bundle task or the series does not meet the input spec.
    """
    from dicomnode.ml.preprocess import sagittal_planes

    _spec_check(bundle, "sagittal_bmd_tbs")
    check_input_spec(bundle, volume)
    spec = bundle.input_spec
    if len(spec.patch_size) != 2:
        raise BundleError(f"bundle {bundle.name}: 2D reformat size expected, got {tuple(spec.patch_size)}")
    found = sagittal_centre(bundle, centroids_lps)
    if found is None:
        return None
    centre, centre_notes = found
    levels = tuple(str(lvl) for lvl in (bundle.manifest.output.get("reference_levels") or ["L1", "L2"]))
    planes, notes = sagittal_planes(
        volume,
        centre,
        (int(spec.patch_size[0]), int(spec.patch_size[1])),
        spec.spacing_mm[1],
        spec.spacing_mm[0],
        (spec.intensity_window[0], spec.intensity_window[1]),
        spec.intensity_normalisation,
    )
    x = torch.from_numpy(planes[:, None]).to(bundle.device)
    with torch.no_grad():
        out = bundle.network(x).cpu().numpy()[0]
    outputs = list(bundle.manifest.output.get("outputs") or ["vbmd_mg_cm3"])
    tbs = float(out[outputs.index("tbs")]) if "tbs" in outputs and len(out) > outputs.index("tbs") else None
    return SagittalPrediction(float(out[0]), tbs, levels, centre, (*centre_notes, *notes))


def dice_per_level(
    truth: npt.NDArray[np.integer], pred: npt.NDArray[np.integer], levels: Sequence[str] = REPORTED_LEVELS
) -> dict[str, float]:
    """Dice of each level present in the truth (our classes).

    Parameters
    ----------
    truth, pred : ndarray of int
        Label images on the same grid.
    levels : sequence of str
        Levels to score.

    Returns
    -------
    dict
        Level -> Dice (levels absent from the truth are left out).
    """
    out = {}
    for lvl in levels:
        c = LEVEL_CLASSES[lvl]
        t = truth == c
        nt = int(t.sum())
        if nt == 0:
            continue
        p = pred == c
        out[lvl] = 2.0 * float(np.sum(t & p)) / (nt + float(p.sum()))
    return out


def apply_bmd_bundle(
    result: AnalysisResult, volume: Volume, bundle: LoadedBundle, mode: str = "both"
) -> AnalysisResult:
    """Add (``both``) or substitute (``bundle``) a bmd bundle's vBMD in an existing analysis result.

    The bundle is applied at each measured vertebra's ROI centroid. With ``both`` the calibrated-ROI values
    stay and the summary notes give the model's L1-L2 vBMD and the difference (agreement); with ``bundle``
    the per-level vBMD, the L1-L2 mean and the category come from the model. A ``sagittal_bmd_tbs`` bundle
    gives one value per series (its reference levels' vBMD, from a mid-sagittal reformat centred on their
    ROI centroids): with ``bundle`` it replaces the L1-L2 mean and the category while the per-level values
    stay the calibrated ROI's (a note says so); its TBS, when it has one, goes into the notes. Either way
    ``algorithm_name`` / ``algorithm_version`` gain ``+<bundle name>`` / ``+<bundle version>`` and the
    warnings carry the bundle's checksum.

    Parameters
    ----------
    result : AnalysisResult
        Status ``ok`` result (e.g. from ``dicomnode.bmd.analyze_volume``).
    volume : Volume
        The analysed volume.
    bundle : LoadedBundle
        Task ``bmd``.
    mode : str
        ``both`` or ``bundle``.

    Returns
    -------
    AnalysisResult
        A new result (the input is unchanged); results that are not ``ok`` come back as they are.

    Raises
    ------
    BundleError
        Wrong bundle task or the series does not meet its input spec.
    """
    if mode not in ("both", "bundle"):
        raise BundleError(f"bmd estimator mode {mode!r} unknown (use 'bundle' or 'both')")
    if result.status is not AnalysisStatus.OK or result.summary is None:
        return result
    if bundle.manifest.task == "sagittal_bmd_tbs":
        return _apply_sagittal(result, volume, bundle, mode)
    usable = [v for v in result.vertebrae if not v.excluded]
    model = predict_vbmd(bundle, volume, {v.level: v.roi_centroid_lps_mm for v in usable})
    used = tuple(lvl for lvl in ("L1", "L2") if lvl in model)
    model_mean = float(np.mean([model[lvl] for lvl in used])) if used else None
    notes = list(result.summary.notes)
    ident = bundle.manifest.identification
    if mode == "both":
        if model_mean is not None:
            roi = result.summary.vbmd_l1_l2_mg_cm3
            diff = f"; model - ROI = {model_mean - roi:+.1f} mg/cm3" if roi is not None else ""
            notes.append(f"{bundle.name} {bundle.version}: L1-L2 vBMD {model_mean:.1f} mg/cm3{diff}")
        summary = replace(result.summary, notes=tuple(notes))
        vertebrae = result.vertebrae
    else:
        vertebrae = tuple(replace(v, vbmd_mg_cm3=model.get(v.level, v.vbmd_mg_cm3)) for v in result.vertebrae)
        notes.append(f"vBMD by {ident}")
        summary = replace(
            result.summary,
            vbmd_l1_l2_mg_cm3=model_mean,
            category=acr_category(model_mean) if model_mean is not None else None,
            levels_used=used,
            notes=tuple(notes),
        )
    return replace(
        result,
        vertebrae=vertebrae,
        summary=summary,
        algorithm_name=f"{result.algorithm_name}+{bundle.name}",
        algorithm_version=f"{result.algorithm_version}+{bundle.version}",
        warnings=(*result.warnings, f"model bundle {ident}"),
    )


def _apply_sagittal(
    result: AnalysisResult, volume: Volume, bundle: LoadedBundle, mode: str
) -> AnalysisResult:
    """:func:`apply_bmd_bundle` for a ``sagittal_bmd_tbs`` bundle (one vBMD, maybe a TBS, per series)."""
    assert result.summary is not None
    # excluded vertebrae too: their vBMD is not reported, but where they are still centres the reformat
    pred = predict_sagittal(bundle, volume, {v.level: v.roi_centroid_lps_mm for v in result.vertebrae})
    notes = list(result.summary.notes)
    ident = bundle.manifest.identification
    summary = result.summary
    if pred is None:
        notes.append(f"{bundle.name} {bundle.version}: no reference level measured, no model vBMD")
        summary = replace(summary, notes=tuple(notes))
    else:
        span = "-".join((pred.levels[0], pred.levels[-1])) if len(pred.levels) > 1 else pred.levels[0]
        tbs = f"; TBS {pred.tbs:.3f}" if pred.tbs is not None else ""
        centring = [f"{bundle.name}: {n}" for n in pred.notes]  # after the value note, which leads
        if mode == "both":
            roi = summary.vbmd_l1_l2_mg_cm3
            roi_levels = tuple(summary.levels_used)
            on = "" if roi_levels in ((), pred.levels) else f" (ROI on {'-'.join(roi_levels)})"
            diff = f"; model - ROI = {pred.vbmd_mg_cm3 - roi:+.1f} mg/cm3{on}" if roi is not None else ""
            notes.append(
                f"{bundle.name} {bundle.version}: {span} vBMD {pred.vbmd_mg_cm3:.1f} mg/cm3 "
                f"(mid-sagittal reformat){diff}{tbs}"
            )
            summary = replace(summary, notes=(*notes, *centring))
        else:
            notes.append(f"vBMD by {ident} (mid-sagittal reformat, {span}){tbs}")
            notes.append("per-level vBMD: calibrated ROI (the sagittal model gives one value per series)")
            summary = replace(
                summary,
                vbmd_l1_l2_mg_cm3=pred.vbmd_mg_cm3,
                category=acr_category(pred.vbmd_mg_cm3),
                levels_used=pred.levels,
                notes=(*notes, *centring),
            )
    return replace(
        result,
        summary=summary,
        algorithm_name=f"{result.algorithm_name}+{bundle.name}",
        algorithm_version=f"{result.algorithm_version}+{bundle.version}",
        warnings=(*result.warnings, f"model bundle {ident}"),
    )
