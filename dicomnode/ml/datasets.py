"""Training data: label schemes, NIfTI I/O, phantom export into the training layouts.

Layouts ``dicomnode train`` reads:

* segmentation: a folder with ``images/<id>.nii.gz`` and ``labels/<id>.nii.gz`` (same grid), and optionally
  ``cases.csv`` (``id,patient_id``; without it every case is its own patient), or a CSV
  ``id,patient_id,image,label`` (paths relative to the CSV).
* bmd: a CSV ``id,patient_id,image,level,bmd_mg_cm3`` plus either ``label`` (a level mask, scheme as for
  segmentation) or ``cx,cy,cz`` (vertebral body centroid, LPS mm); ``image`` is a NIfTI file or a DICOM
  series folder.
* sagittal-bmd: the bmd CSV; each image is one sample whose target is the mean ``bmd_mg_cm3`` of its
  reference-level rows (default L1, L2), and an optional ``tbs`` column adds a TBS target.

Label schemes understood (mapped to our classes 0 = background, 1..7 = T11..L5 vertebral bodies):
TotalSegmentator v2 (L5 = 27 ... T11 = 33), VerSe (T11 = 18, T12 = 19, L1 = 20 ... L5 = 24) and ours.
Other labels (other vertebrae, organs) become background.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.domain import REPORTED_LEVELS
from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume

log = logging.getLogger(__name__)

#: Our level classes: 0 background, then REPORTED_LEVELS in order (T11 = 1 ... L5 = 7).
LEVEL_CLASSES: dict[str, int] = {lvl: i + 1 for i, lvl in enumerate(REPORTED_LEVELS)}
#: Extra ids of our exported masks: any other vertebra (e.g. T10), and the sacrum/S1 (the labelling anchor).
OTHER_VERTEBRA_ID = 8
SACRUM_ID = 9

#: What the segmentation network predicts: background, vertebral body (any level), sacrum. Level names come
#: from the order of the bodies above the sacrum (see ``dicomnode.ml.inference.label_levels``); learning
#: seven look-alike classes directly needs far more data and compute than a local training run has.
SEG_BACKGROUND, SEG_VERTEBRA, SEG_SACRUM = 0, 1, 2
N_SEG_CLASSES = 3


@dataclass(frozen=True)
class LabelScheme:
    levels: Mapping[int, str]  # source id -> reported level
    vertebrae: frozenset[int]  # every vertebra id (any level)
    sacrum: frozenset[int]  # sacrum / S1 ids


#: Label schemes understood by ``dicomnode train``.
LABEL_SCHEMES: dict[str, LabelScheme] = {
    "dicomnode": LabelScheme(
        {i + 1: lvl for i, lvl in enumerate(REPORTED_LEVELS)},
        frozenset(range(1, OTHER_VERTEBRA_ID + 1)),
        frozenset({SACRUM_ID}),
    ),
    # TotalSegmentator v2 task "total" (map_to_binary.py): 25 sacrum, 26 S1, 27 L5 ... 33 T11 ... 50 C1
    "totalseg": LabelScheme(
        {33: "T11", 32: "T12", 31: "L1", 30: "L2", 29: "L3", 28: "L4", 27: "L5"},
        frozenset(range(27, 51)),
        frozenset({25, 26}),
    ),
    # VerSe: C1-C7 = 1-7, T1-T12 = 8-19, L1-L5 = 20-24, L6 25, sacrum 26, T13 28
    "verse": LabelScheme(
        {18: "T11", 19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5"},
        frozenset(set(range(1, 26)) | {28}),
        frozenset({26}),
    ),
}


def detect_scheme(labels: npt.NDArray[Any]) -> str:
    """Guess the label scheme of a mask from the ids present (explicit ``--label-scheme`` is safer).

    Parameters
    ----------
    labels : ndarray of int
        A label image.

    Returns
    -------
    str
        ``dicomnode`` when every id is 1..9, ``verse`` when every id is <= 28 and some lumbar VerSe id
        (20-24) is present, else ``totalseg``.
    """
    present = {int(v) for v in np.unique(labels)} - {0}
    if present and present <= set(range(1, SACRUM_ID + 1)):
        return "dicomnode"
    if present and max(present) <= 28 and present & set(range(20, 25)):
        return "verse"
    return "totalseg"


def _lut(labels: npt.NDArray[Any], table: Mapping[int, int]) -> npt.NDArray[np.int64]:
    src = np.asarray(labels).astype(np.int64)
    size = max(int(src.max(initial=0)), max(table, default=0)) + 1
    lut = np.zeros(size, dtype=np.int64)
    for sid, cls in table.items():
        lut[sid] = cls
    return lut[np.clip(src, 0, size - 1)]


def _scheme(labels: npt.NDArray[Any], scheme: str) -> LabelScheme:
    if scheme == "auto":
        scheme = detect_scheme(labels)
    if scheme not in LABEL_SCHEMES:
        raise InputError(f"unknown label scheme {scheme!r}")
    return LABEL_SCHEMES[scheme]


def map_labels(labels: npt.NDArray[Any], scheme: str = "auto") -> npt.NDArray[np.int64]:
    """Map a mask in ``scheme`` to our level classes (0 background, 1..7 = T11..L5; the rest 0).

    Parameters
    ----------
    labels : ndarray of int
        Source label ids.
    scheme : str
        ``auto``, ``dicomnode``, ``totalseg`` or ``verse``.

    Returns
    -------
    ndarray of int64
        Same shape, our classes.
    """
    sch = _scheme(labels, scheme)
    return _lut(labels, {sid: LEVEL_CLASSES[lvl] for sid, lvl in sch.levels.items()})


def map_seg_targets(labels: npt.NDArray[Any], scheme: str = "auto") -> npt.NDArray[np.int64]:
    """Map a mask in ``scheme`` to the segmentation network's targets (0 background, 1 vertebra, 2 sacrum)."""
    sch = _scheme(labels, scheme)
    table = {sid: SEG_VERTEBRA for sid in sch.vertebrae}
    table.update({sid: SEG_SACRUM for sid in sch.sacrum})
    return _lut(labels, table)


# ------------------------------------------------------------------------------------------------ NIfTI

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Read a NIfTI image as (array indexed [k, j, i], LPS affine), the Volume convention.

    Parameters
    ----------
    path : Path
        ``.nii`` or ``.nii.gz``.

    Returns
    -------
    (data, affine)
        Data as stored (no scaling beyond the NIfTI slope), affine mapping (i, j, k) to LPS mm.
    """
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for broken files
        raise InputError(f"{path}: cannot read NIfTI: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape}")
    affine = _RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), affine


def write_nifti(path: Path, data: npt.NDArray[Any], affine_lps: npt.NDArray[np.float64]) -> None:
    """Write an array indexed [k, j, i] with an LPS affine as NIfTI (RAS affine, as NIfTI requires)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib_any: Any = nib  # nibabel has no type hints for its image classes
    img = nib_any.Nifti1Image(np.transpose(np.asarray(data), (2, 1, 0)), _RAS_TO_LPS @ affine_lps)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))


def load_image(path: Path) -> Volume:
    """Load a CT image for training: NIfTI directly, DICOM through ``dicomnode.imaging``.

    Parameters
    ----------
    path : Path
        NIfTI file or DICOM series folder/file.

    Returns
    -------
    Volume
        HU volume with LPS geometry.
    """
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        data, affine = read_nifti(path)
        return Volume(data=data.astype(np.float32), affine=affine, source=(str(path),))
    try:
        from dicomnode.imaging import loader
    except ImportError as exc:  # the DICOM loader is another module's; say so plainly
        raise InputError(f"{path}: DICOM input needs dicomnode.imaging.loader ({exc})") from None
    loaded: Any = loader.load_path(path)
    volume = getattr(loaded, "volume", None)
    series = tuple(getattr(loaded, "series", ()) or ())
    if volume is None and len(series) == 1:
        volume = loader.load_series(series[0])
    elif volume is None and len(series) > 1:
        raise InputError(f"{path}: holds {len(series)} series; point the dataset at one series folder")
    if not isinstance(volume, Volume):
        raise InputError(f"{path}: no CT volume could be loaded")
    return volume


# ------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True, eq=False)
class SpineCase:
    """One training case: a CT volume, its level mask (our classes, same grid) and per-level vBMD."""

    case_id: str
    patient_id: str
    volume: Volume
    #: 1..7 = T11..L5 bodies, 8 = other vertebral bodies, 9 = sacrum (the "dicomnode" scheme)
    labels: npt.NDArray[np.int16]
    vbmd: Mapping[str, float]


def _phantom_module() -> Any:
    try:
        from dicomnode import phantom
    except ImportError:
        return None
    return phantom if hasattr(phantom, "make_phantom") and hasattr(phantom, "PhantomSpec") else None


def phantom_available() -> bool:
    """True when ``dicomnode.phantom.make_phantom`` exists."""
    return _phantom_module() is not None


def phantom_case(
    seed: int,
    patient_id: str | None = None,
    vbmd_range: tuple[float, float] = (40.0, 200.0),
    matrix: int = 96,
    spacing_mm: float = 3.0,
    **spec_kwargs: Any,
) -> SpineCase:
    """One case from ``dicomnode.phantom.make_phantom``: a small, coarse scan T10-S1 for training.

    The per-level vBMD is drawn from ``vbmd_range`` (patient level, +/- 8 mg/cm3 per level) with ``seed``;
    the phantom draws its own scanner gain/offset and noise from the same seed.

    Parameters
    ----------
    seed : int
        Phantom seed.
    patient_id : str, optional
        Defaults to ``P<seed>``.
    vbmd_range : (float, float)
        Range of the patient-level vBMD (mg/cm3).
    matrix, spacing_mm : int, float
        In-plane matrix and pixel size (also used as slice thickness).
    **spec_kwargs
        More ``PhantomSpec`` fields.

    Returns
    -------
    SpineCase
        The case, labels in the "dicomnode" scheme (1..7 T11..L5, 8 other vertebrae, 9 S1).
    """
    ph = _phantom_module()
    if ph is None:
        raise InputError("dicomnode.phantom.make_phantom is not available")
    rng = np.random.default_rng(10_000 + seed)
    base = rng.uniform(*vbmd_range)
    levels = ("T10", *REPORTED_LEVELS, "S1")
    bmd = {lvl: float(np.clip(base + rng.uniform(-8.0, 8.0), 5.0, 260.0)) for lvl in levels}
    kw: dict[str, Any] = {"matrix": matrix, "spacing_mm": spacing_mm, "thickness_mm": spacing_mm, "bmd": bmd}
    kw.update(spec_kwargs)
    result = ph.make_phantom(ph.PhantomSpec(seed=seed, **kw))
    names: Mapping[int, str] = result.truth.label_names
    src = np.asarray(result.body_labels)
    labels = np.zeros(src.shape, np.int16)
    for lid, lvl in names.items():
        cls = LEVEL_CLASSES.get(lvl, SACRUM_ID if lvl == "S1" else OTHER_VERTEBRA_ID)
        labels[src == int(lid)] = cls
    vbmd = {lt.level: float(lt.vbmd_mg_cm3) for lt in result.truth.levels if lt.level in LEVEL_CLASSES}
    return SpineCase(f"phantom{seed:04d}", patient_id or f"P{seed:04d}", result.volume, labels, vbmd)


def synthetic_case(
    seed: int,
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    fov_mm: tuple[float, float] = (200.0, 200.0),
    vbmd_range: tuple[float, float] = (40.0, 200.0),
    noise_hu: tuple[float, float] = (8.0, 20.0),
    patient_id: str | None = None,
) -> SpineCase:
    """A small, fast stand-in for the full phantom: trunk, T10-S1 spine with ribs, vBMD-driven HU.

    It follows the same reference-scanner physics as ``dicomnode.phantom.tissue`` (trabecular
    HU = 20 + 1.2 * vBMD, per-scan gain 0.94-1.06 and offset -15..15 HU) so a network trained on one can be
    checked on the other. Used by tests and benchmarks when a quick case is enough.

    Parameters
    ----------
    seed : int
        Everything random derives from it.
    spacing_mm : (float, float, float)
        Voxel size along i, j, k.
    fov_mm : (float, float)
        In-plane field of view (L-R, A-P).
    vbmd_range : (float, float)
        Patient-level trabecular vBMD is drawn from it; levels vary +/- 8 mg/cm3 around it.
    noise_hu : (float, float)
        Range of the Gaussian noise SD.
    patient_id : str, optional
        Defaults to ``S<seed>``.

    Returns
    -------
    SpineCase
        Canonical LPS volume in HU, vertebral-body labels T11..L5 (1..7), vBMD per level.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing_mm
    levels = ("T10", *REPORTED_LEVELS, "S1")
    heights = {lvl: 20.0 + 1.0 * n for n, lvl in enumerate(levels)}
    discs = {lvl: 5.0 + 0.7 * n for n, lvl in enumerate(levels)}
    size_scale = rng.uniform(0.9, 1.1)
    # stack bodies from S1 upwards; z = 0 at the top of S1
    tops: dict[str, tuple[float, float]] = {}
    z = 0.0
    for lvl in reversed(levels):
        h = heights[lvl] * size_scale * (1.6 if lvl == "S1" else 1.0)
        if lvl == "S1":
            tops[lvl] = (-h, 0.0)
            z = 0.0
        else:
            z += discs[lvl] * size_scale
            tops[lvl] = (z, z + h)
            z += h
    z_top_spine = z
    # field of view: from mid-T10 (+/- jitter) down into the sacrum
    z_hi = tops["T10"][0] + rng.uniform(0.2, 0.9) * (tops["T10"][1] - tops["T10"][0])
    z_lo = -rng.uniform(15.0, 35.0)
    nk = math.ceil((z_hi - z_lo) / sz)
    ni = round(fov_mm[0] / sx)
    nj = round(fov_mm[1] / sy)
    x = (np.arange(ni) - (ni - 1) / 2.0) * sx  # +x = patient left
    y = (np.arange(nj) - (nj - 1) / 2.0) * sy  # +y = posterior
    zs = z_lo + np.arange(nk) * sz
    Z, Y, X = np.meshgrid(zs, y, x, indexing="ij")

    trunk_a = rng.uniform(85.0, 95.0)
    trunk_b = rng.uniform(70.0, 85.0)
    trunk_cy = rng.uniform(-8.0, 8.0)
    fat_mm = rng.uniform(10.0, 25.0)
    hu = np.full(Z.shape, -1000.0, np.float32)
    r_trunk = (X / trunk_a) ** 2 + ((Y - trunk_cy) / trunk_b) ** 2
    hu[r_trunk <= 1.0] = -100.0  # subcutaneous fat
    inner = (X / (trunk_a - fat_mm)) ** 2 + ((Y - trunk_cy) / (trunk_b - fat_mm)) ** 2 <= 1.0
    hu[inner] = 45.0  # organs
    # visceral fat islands
    for _ in range(6):
        cx, cy, cz = rng.uniform(-50, 50), rng.uniform(-50, 10), rng.uniform(z_lo, z_hi)
        r = rng.uniform(10, 25)
        hu[((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2 <= r * r) & inner] = -95.0
    spine_y = trunk_cy + (trunk_b - fat_mm) * 0.35
    lateral = rng.uniform(-6.0, 6.0)
    spine_x = lateral * np.sin((Z - z_lo) / 150.0)
    # paraspinal and psoas muscle
    para = ((X - spine_x) / 45.0) ** 2 + ((Y - spine_y - 35.0) / 22.0) ** 2 <= 1.0
    hu[para & inner] = 50.0
    for side in (-1.0, 1.0):
        psoas = ((X - spine_x - side * 32.0) / 14.0) ** 2 + ((Y - spine_y + 2.0) / 14.0) ** 2 <= 1.0
        hu[psoas & (tops["L1"][1] > Z) & inner] = 50.0
    # aorta anterior to the spine
    aorta = (X - spine_x - 12.0) ** 2 + (Y - spine_y + 32.0) ** 2 <= 11.0**2
    hu[aorta] = 40.0

    base = rng.uniform(*vbmd_range)
    vbmd = {lvl: float(np.clip(base + rng.uniform(-8.0, 8.0), 5.0, 260.0)) for lvl in REPORTED_LEVELS}
    labels = np.zeros(Z.shape, np.int16)
    for lvl in levels:
        z0, z1 = tops[lvl]
        n = levels.index(lvl)
        a = (17.0 + 1.2 * n) * size_scale  # half width
        b = (13.0 + 0.8 * n) * size_scale  # half depth
        zc = (z0 + z1) / 2.0
        hz = (z1 - z0) / 2.0
        ex = (X - spine_x) / a
        ey = (Y - spine_y) / b
        rr = ex**2 + ey**2
        body = (rr <= 1.0) & (np.abs(Z - zc) <= hz)
        if lvl == "S1":  # sacrum: a wide wedge
            wide = ((X - spine_x) / (a * 2.2)) ** 2 + ((Y - spine_y - 8.0) / b) ** 2 <= 1.0
            body = wide & (z1 >= Z) & (z0 <= Z)
        shell_a, shell_b = a - 2.0, b - 2.0
        core = (((X - spine_x) / shell_a) ** 2 + ((Y - spine_y) / shell_b) ** 2 <= 1.0) & (
            np.abs(Z - zc) <= hz - 1.5
        )
        hu[body] = 750.0  # cortex and end-plates
        trab = vbmd.get(lvl, base)
        hu[body & core] = 20.0 + 1.2 * trab
        # posterior elements: canal + arch
        canal_y = spine_y + b + 9.0
        arch = ((X - spine_x) ** 2 + (Y - canal_y) ** 2 <= 15.0**2) & (np.abs(Z - zc) <= hz * 0.8)
        canal = (X - spine_x) ** 2 + (Y - canal_y) ** 2 <= 8.0**2
        if lvl != "S1":
            hu[arch & ~canal] = 300.0
        hu[canal & (z_top_spine > Z) & (z0 < Z)] = 10.0
        if lvl in ("T10", "T11", "T12"):  # ribs: the anchor that tells T12 from L1
            for side in (-1.0, 1.0):
                rib_len = 70.0 if lvl != "T12" else 45.0
                rx = X - spine_x - side * (a + 5.0)
                rib = (
                    (side * rx >= 0)
                    & (side * rx <= rib_len)
                    & ((Y - spine_y - 10.0 + 0.3 * np.abs(rx)) ** 2 + (Z - zc) ** 2 <= 5.0**2)
                )
                hu[rib & (r_trunk <= 1.0)] = 400.0
        labels[body] = LEVEL_CLASSES.get(lvl, SACRUM_ID if lvl == "S1" else OTHER_VERTEBRA_ID)
        # disc below
        if lvl != "S1":
            disc = (rr <= 1.0) & (z0 > Z) & (z0 - discs[lvl] * size_scale <= Z)
            hu[disc] = 90.0
    # iliac wings at the sacrum
    for side in (-1.0, 1.0):
        ilium = (((X - spine_x - side * 70.0) / 12.0) ** 2 + ((Y - spine_y) / 35.0) ** 2 <= 1.0) & (Z < 10.0)
        hu[ilium & (r_trunk <= 1.0)] = 350.0
    hu = ndimage.gaussian_filter(hu, sigma=0.6).astype(np.float32)  # partial volume
    gain = rng.uniform(0.94, 1.06)
    offset = rng.uniform(-15.0, 15.0)
    hu = gain * hu + offset + rng.normal(0.0, rng.uniform(*noise_hu), hu.shape).astype(np.float32)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = (x[0], y[0], zs[0])
    volume = Volume(
        data=hu.astype(np.float32),
        affine=affine,
        header={
            "Modality": "CT",
            "StudyInstanceUID": f"2.25.{1000 + seed}",
            "SeriesInstanceUID": f"2.25.{9000 + seed}",
        },
        source=(f"synthetic:{seed}",),
    )
    return SpineCase(f"synth{seed:04d}", patient_id or f"S{seed:04d}", volume, labels, vbmd)


def make_cases(seeds: Iterable[int], source: str = "auto", **kwargs: Any) -> list[SpineCase]:
    """Cases from the full phantom (``source='phantom'``), the quick generator (``'synthetic'``) or
    whichever exists (``'auto'``: the phantom when available).
    """
    use_phantom = source == "phantom" or (source == "auto" and phantom_available())
    return [phantom_case(s, **kwargs) if use_phantom else synthetic_case(s, **kwargs) for s in seeds]


# ---------------------------------------------------------------------------------------------- export


def export_segmentation(cases: Sequence[SpineCase], out: Path) -> Path:
    """Write ``images/``, ``labels/`` ("dicomnode" label scheme) and ``cases.csv`` (``id,patient_id``).

    Returns
    -------
    Path
        ``out``.
    """
    rows = []
    for c in cases:
        write_nifti(out / "images" / f"{c.case_id}.nii.gz", c.volume.data.astype(np.int16), c.volume.affine)
        write_nifti(out / "labels" / f"{c.case_id}.nii.gz", c.labels.astype(np.uint8), c.volume.affine)
        rows.append((c.case_id, c.patient_id))
    with (out / "cases.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "patient_id"])
        w.writerows(rows)
    return out


def export_bmd(cases: Sequence[SpineCase], out: Path, with_masks: bool = True) -> Path:
    """Write NIfTI images (+ masks) and ``bmd.csv``, one row per vertebra with a reference vBMD.

    With ``with_masks=False`` the CSV carries centroids (``cx,cy,cz`` LPS mm) instead of a mask path.

    Returns
    -------
    Path
        The CSV path.
    """
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "bmd.csv"
    header = ["id", "patient_id", "image", "level", "bmd_mg_cm3"]
    header += ["label"] if with_masks else ["cx", "cy", "cz"]
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for c in cases:
            img = Path("images") / f"{c.case_id}.nii.gz"
            lab = Path("labels") / f"{c.case_id}.nii.gz"
            write_nifti(out / img, c.volume.data.astype(np.int16), c.volume.affine)
            if with_masks:
                write_nifti(out / lab, c.labels.astype(np.uint8), c.volume.affine)
            for lvl, value in c.vbmd.items():
                cls = LEVEL_CLASSES.get(lvl)
                if cls is None or not np.any(c.labels == cls):
                    continue
                row: list[Any] = [f"{c.case_id}_{lvl}", c.patient_id, str(img), lvl, f"{value:.3f}"]
                if with_masks:
                    row.append(str(lab))
                else:
                    kji = np.argwhere(c.labels == cls).mean(axis=0)
                    lps = c.volume.index_to_lps(kji[::-1])
                    row += [f"{v:.3f}" for v in lps]
                w.writerow(row)
    return csv_path
