"""``make_phantom``: a synthetic abdominal CT with known truth (vertebral levels, vBMD, geometry).

The volume is rendered slice by slice on the canonical LPS grid (i -> L, j -> P, k -> S): each slice is a
class image painted from analytic shapes (see :mod:`dicomnode.phantom.render`), mapped to HU through a
look-up table built from :mod:`dicomnode.phantom.tissue` (reference HU -> contrast -> scanner map), averaged
over sub-slices across the slice thickness (partial volume along z), blurred in-plane by a Gaussian PSF and
given Gaussian noise. It is then re-gridded (flips only) to the requested patient orientation, so the
anatomy keeps its LPS position whatever the orientation.

Truth labels come from the class image of the centre sub-slice: body label per level, whole-vertebra label
per level, and a trabecular "core" label that keeps a margin from the cortex, end plates and basivertebral
vein large enough that the blur and the slice profile never mix other tissue into it (so the mean HU in
the core equals the truth HU up to noise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume
from dicomnode.imaging.writer import normalise_position, reorient_arrays
from dicomnode.phantom import tissue
from dicomnode.phantom.anatomy import PHANTOM_LEVELS, Vertebra, build_ribs, build_spine
from dicomnode.phantom.render import (
    AIR,
    ARTERY,
    BOWEL,
    CSF,
    DISC,
    FAT,
    KIDNEY,
    LEVEL_BASE,
    LIVER,
    LUNG,
    MUSCLE,
    P_CORE,
    P_CORTEX,
    P_MARGIN,
    P_POST,
    P_VEIN,
    PELVIS_CORTEX,
    PELVIS_MARROW,
    RIB_CORTEX,
    RIB_MARROW,
    TABLE,
    VEIN,
    VFAT,
    SliceCanvas,
    Trunk,
    paint_pelvis,
    paint_ribs,
    paint_soft_tissue,
    paint_vertebra,
)

CONTRAST_PHASES = ("native", "arterial", "portal_venous")


def _default_bmd() -> dict[str, float]:
    # a gentle cranio-caudal gradient so a level mix-up shows in the numbers (3 mg/cm3 per level)
    out: dict[str, float] = {}
    for n, level in enumerate(PHANTOM_LEVELS):
        out[level] = 130.0 - 3.0 * (n - PHANTOM_LEVELS.index("T8"))
    return out


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines one phantom scan. Defaults: a 512 x 512 abdominal CT, 0.7 mm, 1 mm slices.

    ``z_levels`` (top, bottom) crops from the middle of the disc above ``top`` to the middle of the disc
    below ``bottom`` (for ``S1``: the whole sacrum and pelvis); ``z_mm`` (low, high) overrides it;
    ``n_slices`` fixes the slice count around the centre of that range.
    """

    matrix: int = 512
    spacing_mm: float = 0.7
    thickness_mm: float = 1.0
    slice_spacing_mm: float | None = None  # default: thickness
    z_levels: tuple[str, str] = ("T10", "S1")
    z_mm: tuple[float, float] | None = None
    n_slices: int | None = None
    orientation: str = "HFS"
    flip_rows: bool = False
    flip_cols: bool = False
    bmd: Mapping[str, float] = field(default_factory=dict)  # per-level vBMD (mg/cm3), overrides bmd_all
    bmd_all: float | None = None
    rib_pairs: int = 12
    contrast: str = "native"
    noise_sd: float = 10.0
    noise_fwhm_mm: float = 0.0  # > 0: in-plane correlated noise (white noise blurred, rescaled to noise_sd)
    #: SD (HU) of a zero-mean trabecular texture (correlated field, ~1.5 mm grain) inside trabecular bone;
    #: 0 = homogeneous marrow. Truth HU stays the expected value.
    texture_sd: float = 0.0
    seed: int = 0
    kvp: float = 120.0
    gain: float | None = None  # scanner map; None = drawn from tissue.GAIN_RANGE with the seed
    offset: float | None = None
    curvature: float = 1.0  # 0 = straight spine, 1 = typical kypho-lordosis
    fractures: Mapping[str, float] = field(default_factory=dict)  # level -> anterior height loss (0..0.8)
    table: bool = True
    psf_fwhm_mm: float = 1.0
    fat_mm: float = 20.0
    l1_center_lps: tuple[float, float, float] = (3.0, 20.0, -250.0)
    fov_center_xy: tuple[float, float] | None = None  # default: centre of the trunk
    kernel: str = "STANDARD"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhantomSpec:
        """Rebuild a spec from ``PhantomTruth.spec`` / ``truth.json["spec"]`` (lists back to tuples)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown phantom spec field(s): {', '.join(sorted(unknown))}")
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


@dataclass(frozen=True)
class LevelTruth:
    """Truth for one vertebral level (LPS mm, mg/cm3, HU before noise)."""

    level: str
    label: int  # value in Phantom.body_labels / vertebra_labels / core_labels
    centroid_lps_mm: tuple[float, float, float]  # geometric centre of the body
    axis_lps: tuple[float, float, float]  # unit cranial axis of the body
    body_bbox_lps_mm: tuple[tuple[float, float, float], tuple[float, float, float]]  # (min, max) corners
    in_volume: bool  # the body centre lies inside the scanned z range
    body_voxels: int  # voxels labelled body in this volume (0 when cropped away)
    core_voxels: int
    vbmd_mg_cm3: float
    trabecular_hu_ref: float  # reference scanner, native
    trabecular_hu_true: float  # after contrast and scanner map, before noise
    height_anterior_mm: float
    height_middle_mm: float
    height_posterior_mm: float
    fracture: float  # fraction of anterior height removed (0 = none)
    width_mm: float
    depth_mm: float
    bears_rib: bool


@dataclass(frozen=True)
class PhantomTruth:
    """Everything the phantom knows; ``as_dict`` is what ``truth.json`` holds."""

    levels: tuple[LevelTruth, ...]
    rib_pairs: int
    last_rib_level: str
    #: What each level would be called by a labeller that counts down from the last rib-bearing vertebra
    #: as T12 (differs from ``level`` only with 11 or 13 rib pairs: the transitional-anatomy trap).
    names_by_last_rib: Mapping[str, str]
    gain: float
    offset: float
    kvp: float
    contrast: str
    noise_sd: float
    seed: int
    hu_model: Mapping[str, float]  # trabecular HU_ref = intercept + slope * vBMD
    tissue_hu_true: Mapping[str, float]  # tissue -> HU in this scan before noise (air, fat, muscle, blood...)
    geometry: Mapping[str, Any]
    label_names: Mapping[int, str]
    #: Named points (LPS mm) inside reference tissues at the L1 mid-plane: ``aorta``, ``ivc``,
    #: ``paraspinal_left``/``_right`` (muscle), ``subcutaneous_fat_anterior``, ``air_anterior``.
    landmarks: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    #: The PhantomSpec that produced it (JSON-ready), so a truth file can be re-rendered.
    spec: Mapping[str, Any] = field(default_factory=dict)

    def level(self, name: str) -> LevelTruth:
        for lv in self.levels:
            if lv.level == name:
                return lv
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_names"] = {str(k): v for k, v in self.label_names.items()}
        d["hu_model"] = dict(self.hu_model)
        d["tissue_hu_true"] = dict(self.tissue_hu_true)
        d["geometry"] = dict(self.geometry)
        d["landmarks"] = {k: list(v) for k, v in self.landmarks.items()}
        d["spec"] = json.loads(json.dumps(dict(self.spec)))
        d["coordinate_system"] = "DICOM patient LPS, mm"
        return d


@dataclass(frozen=True, eq=False)
class Phantom:
    """The phantom volume (HU, LPS affine) with its truth and label maps on the same grid."""

    volume: Volume
    truth: PhantomTruth
    body_labels: npt.NDArray[np.uint8]  # 0 = background, else LevelTruth.label of the vertebral body
    vertebra_labels: npt.NDArray[np.uint8]  # body + posterior elements
    core_labels: npt.NDArray[np.uint8]  # trabecular core safe from partial volume

    @property
    def truth_labels(self) -> npt.NDArray[np.uint8]:
        """Alias of ``body_labels`` (one label per vertebral body)."""
        return self.body_labels


def _validate(spec: PhantomSpec) -> None:
    if spec.matrix < 32 or spec.matrix > 2048:
        raise InputError(f"matrix {spec.matrix} out of range 32-2048")
    if not 0.1 <= spec.spacing_mm <= 5.0:
        raise InputError(f"pixel spacing {spec.spacing_mm} mm out of range 0.1-5")
    if not 0.3 <= spec.thickness_mm <= 10.0:
        raise InputError(f"slice thickness {spec.thickness_mm} mm out of range 0.3-10")
    if spec.slice_spacing_mm is not None and not 0.1 <= spec.slice_spacing_mm <= 10.0:
        raise InputError(f"slice spacing {spec.slice_spacing_mm} mm out of range 0.1-10")
    if spec.rib_pairs not in (11, 12, 13):
        raise InputError(f"rib pairs must be 11, 12 or 13, not {spec.rib_pairs}")
    if spec.contrast not in CONTRAST_PHASES:
        raise InputError(f"contrast must be one of {', '.join(CONTRAST_PHASES)}, not {spec.contrast!r}")
    for lv in (*spec.z_levels, *spec.bmd, *spec.fractures):
        if lv not in PHANTOM_LEVELS:
            raise InputError(f"unknown level {lv!r} (phantom levels: {', '.join(PHANTOM_LEVELS)})")
    for lv, f in spec.fractures.items():
        if not 0.0 <= f <= 0.8:
            raise InputError(f"fracture of {lv} must be a fraction 0-0.8, not {f}")
    for lv, b in spec.bmd.items():
        if not 0.0 <= b <= 400.0:
            raise InputError(f"vBMD of {lv} must be 0-400 mg/cm3, not {b}")
    if spec.noise_sd < 0 or spec.noise_fwhm_mm < 0 or spec.texture_sd < 0:
        raise InputError("noise SD, noise FWHM and texture SD must be >= 0")
    normalise_position(spec.orientation)


def _scanner(spec: PhantomSpec) -> tuple[float, float]:
    rng = np.random.default_rng([spec.seed, 7])
    g = spec.gain if spec.gain is not None else float(rng.uniform(*tissue.GAIN_RANGE))
    o = spec.offset if spec.offset is not None else float(rng.uniform(*tissue.OFFSET_RANGE))
    return float(g), float(o)


def _vbmd(spec: PhantomSpec) -> dict[str, float]:
    base = _default_bmd()
    if spec.bmd_all is not None:
        base = dict.fromkeys(PHANTOM_LEVELS, float(spec.bmd_all))
    base.update({k: float(v) for k, v in spec.bmd.items()})
    return base


def _trunk(spec: PhantomSpec, spine: list[Vertebra]) -> Trunk:
    zc = {v.name: v.center[2] for v in spine}
    s1 = spine[-1]
    l1 = spine[PHANTOM_LEVELS.index("L1")]
    z_acet = zc["S1"] - 95.0
    rng = np.random.default_rng([spec.seed, 3])
    cx, cy = l1.center[0] - 3.0, l1.center[1] - 25.0
    bowel = []
    for _ in range(14):
        bowel.append(
            (
                float(cx + rng.uniform(-95.0, 95.0)),
                float(cy + rng.uniform(-75.0, -25.0)),
                float(rng.uniform(zc["S1"] - 40.0, zc["L1"])),
                float(rng.uniform(16.0, 28.0)),
            )
        )
    return Trunk(
        center_x=cx,
        center_y=cy,
        z_table=(z_acet - 200.0, zc["S1"], zc["L3"], zc["T12"], zc["T8"], zc["T1"] + 100.0),
        half_x=(175.0, 175.0, 162.0, 160.0, 155.0, 150.0),
        half_y=(110.0, 110.0, 115.0, 118.0, 120.0, 120.0),
        fat_mm=spec.fat_mm,
        table=(
            "none"
            if not spec.table
            else "anterior"
            if normalise_position(spec.orientation) in ("HFP", "FFP")
            else "posterior"
        ),
        z_diaphragm=zc["T10"] + 10.0,
        z_kidney_left=zc["L1"] - 5.0,
        z_kidney_right=zc["L1"] - 20.0,
        z_liver_bottom=zc["L2"],
        z_spleen_bottom=zc["T12"],
        z_aorta_bifurcation=zc["L4"],
        z_ivc_confluence=zc["L5"],
        z_psoas_top=zc["T12"],
        z_s1=s1.center[2],
        z_acetabulum=z_acet,
        z_iliac_crest=zc["L4"] - 10.0,
        bowel=tuple(bowel),
    )


def _z_extent(spec: PhantomSpec, spine: list[Vertebra], trunk: Trunk) -> tuple[float, float]:
    if spec.z_mm is not None:
        return (min(spec.z_mm), max(spec.z_mm))
    top, bottom = spec.z_levels
    it, ib = PHANTOM_LEVELS.index(top), PHANTOM_LEVELS.index(bottom)
    if it > ib:
        it, ib = ib, it
    vt, vb = spine[it], spine[ib]
    if it == 0:
        hi = vt.center[2] + vt.height / 2 + 3.0
    else:
        hi = vt.center[2] + vt.height / 2 + spine[it - 1].disc_below / 2
    # S1 as the bottom level means "with the sacrum and pelvis"
    lo = trunk.z_acetabulum - 50.0 if vb.name == "S1" else vb.center[2] - vb.height / 2 - vb.disc_below / 2
    return (lo, hi)


def _luts(
    spec: PhantomSpec, vbmd: dict[str, float], gain: float, offset: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    ref = tissue.REFERENCE_HU
    ph = spec.contrast

    def c(t: str) -> float:
        return tissue.contrast_offset(ph, t)

    hu = np.full(256, ref["air"], dtype=np.float64)
    generic = {
        AIR: ref["air"],
        LUNG: ref["lung"],
        FAT: ref["fat"],
        VFAT: ref["fat"],
        MUSCLE: ref["muscle"] + c("muscle"),
        ARTERY: ref["blood"] + c("artery"),
        VEIN: ref["blood"] + c("vein"),
        LIVER: ref["liver"] + c("liver"),
        KIDNEY: ref["kidney"] + c("kidney"),
        BOWEL: ref["bowel"],
        CSF: ref["csf"],
        DISC: ref["disc"],
        TABLE: ref["table"],
        RIB_CORTEX: ref["cortical"] * 0.9,
        RIB_MARROW: ref["marrow"],
        PELVIS_CORTEX: ref["cortical"] * 0.9,
        PELVIS_MARROW: ref["marrow"],
    }
    for k, val in generic.items():
        hu[k] = val
    body = np.zeros(256, dtype=np.uint8)
    vert = np.zeros(256, dtype=np.uint8)
    core = np.zeros(256, dtype=np.uint8)
    for n, lv in enumerate(PHANTOM_LEVELS):
        trab = tissue.trabecular_hu_ref(vbmd[lv]) + c("trabecular")
        base = LEVEL_BASE + 5 * n
        hu[base + P_CORE] = trab
        hu[base + P_MARGIN] = trab
        hu[base + P_CORTEX] = ref["cortical"]
        hu[base + P_VEIN] = ref["blood"] + c("vein")
        hu[base + P_POST] = ref["posterior_elements"]
        for p in (P_CORE, P_MARGIN, P_CORTEX, P_VEIN):
            body[base + p] = n + 1
        for p in (P_CORE, P_MARGIN, P_CORTEX, P_VEIN, P_POST):
            vert[base + p] = n + 1
        core[base + P_CORE] = n + 1
    scanned = (gain * hu + offset).astype(np.float32)
    return scanned, body, vert, core


def _noise(rng: np.random.Generator, m: int, sd: float, sigma_px: float) -> npt.NDArray[np.float32]:
    """Gaussian noise of standard deviation ``sd``; spatially correlated when ``sigma_px`` > 0."""
    white = rng.standard_normal((m, m), dtype=np.float32)
    if sigma_px <= 0.05:
        return white * np.float32(sd)
    corr = ndimage.gaussian_filter(white, sigma_px, mode="wrap")
    # a Gaussian kernel of sigma s divides the SD of white noise by 2 * sqrt(pi) * s (2-D)
    gain = 1.0 / (2.0 * math.sqrt(math.pi) * sigma_px)
    return np.asarray(corr * np.float32(sd / gain), dtype=np.float32)


def make_phantom(spec: PhantomSpec | None = None) -> Phantom:
    """Render the phantom described by ``spec``.

    Parameters
    ----------
    spec
        The scan to simulate (defaults: :class:`PhantomSpec`).

    Returns
    -------
    Phantom
        ``volume`` (float32 HU ``[k, j, i]`` with LPS affine and a CT-like header), ``truth`` and label maps
        on the same grid. Deterministic for a given spec (``seed`` drives noise, scanner map and bowel).

    Raises
    ------
    InputError
        When the spec is out of range (one-line message).
    """
    spec = spec or PhantomSpec()
    _validate(spec)
    gain, offset = _scanner(spec)
    vbmd = _vbmd(spec)
    spine = build_spine(
        curvature=spec.curvature, l1_center=spec.l1_center_lps, fractures=dict(spec.fractures)
    )
    trunk = _trunk(spec, spine)
    ribs = build_ribs(
        spine,
        rib_pairs=spec.rib_pairs,
        trunk_half_axes=trunk.half_axes(spine[PHANTOM_LEVELS.index("T10")].center[2]),
        trunk_center_y=trunk.center_y,
        fat_mm=spec.fat_mm,
    )
    # in-plane grid (canonical: i -> +x, j -> +y), centred on the trunk unless told otherwise
    fx, fy = spec.fov_center_xy or (trunk.center_x, trunk.center_y + 15.0)
    m, sp = spec.matrix, spec.spacing_mm
    xs = (fx + (np.arange(m) - (m - 1) / 2.0) * sp).astype(np.float32)
    ys = (fy + (np.arange(m) - (m - 1) / 2.0) * sp).astype(np.float32)
    # slice positions
    dz = spec.slice_spacing_mm or spec.thickness_mm
    lo, hi = _z_extent(spec, spine, trunk)
    if spec.n_slices is not None:
        if spec.n_slices < 1:
            raise InputError("n_slices must be >= 1")
        n_sl = spec.n_slices
        z0 = (lo + hi) / 2.0 - (n_sl - 1) * dz / 2.0
    else:
        n_sl = math.floor((hi - lo) / dz + 1e-6) + 1
        z0 = lo
    if n_sl > 4000:
        raise InputError(f"{n_sl} slices is too many (max 4000)")
    zs = (z0 + np.arange(n_sl) * dz).astype(np.float64)

    hu_lut, body_lut, vert_lut, core_lut = _luts(spec, vbmd, gain, offset)
    sigma_mm = spec.psf_fwhm_mm / 2.3548
    thick = spec.thickness_mm
    margins = (2.5 * sigma_mm + 0.5 * sp + 0.15 * thick + 0.3, thick / 2 + 1.25 * sigma_mm + 0.5)
    n_sub = 1 + 2 * int(thick // 1.6)
    offsets = [thick * ((q + 0.5) / n_sub - 0.5) for q in range(n_sub)]

    data = np.empty((n_sl, m, m), dtype=np.float32)
    body_lab = np.zeros((n_sl, m, m), dtype=np.uint8)
    vert_lab = np.zeros((n_sl, m, m), dtype=np.uint8)
    core_lab = np.zeros((n_sl, m, m), dtype=np.uint8)
    rng = np.random.default_rng([spec.seed, 11])
    rng_tex = np.random.default_rng([spec.seed, 13])
    trab_lut = np.zeros(256, dtype=bool)
    for n in range(len(PHANTOM_LEVELS)):
        trab_lut[LEVEL_BASE + 5 * n + P_CORE] = trab_lut[LEVEL_BASE + 5 * n + P_MARGIN] = True
    trab_mask = np.zeros((m, m), dtype=bool)
    sigma_px = sigma_mm / sp
    noise_sigma_px = spec.noise_fwhm_mm / 2.3548 / sp
    bounds = [v.extent_bounds() for v in spine]
    acc = np.empty((m, m), dtype=np.float32)
    class_counts = np.zeros(256, dtype=np.int64)  # voxels per class on the label (centre) sub-slices
    for k, zc in enumerate(zs):
        acc[:] = 0.0
        for q, off in enumerate(offsets):
            z = float(zc + off)
            cv = SliceCanvas(xs, ys)
            paint_soft_tissue(cv, z, trunk, spine)
            paint_pelvis(cv, z, trunk, spine)
            paint_ribs(cv, z, ribs)
            for i, vert in enumerate(spine):
                lo_v, hi_v = bounds[i]
                upper = spine[i - 1] if i > 0 else None
                top = max(hi_v, upper.center[2]) if upper is not None else hi_v
                if lo_v - 2.0 <= z <= top + 2.0:
                    paint_vertebra(cv, z, vert, upper, margins)
            acc += hu_lut[cv.cls]
            if q == n_sub // 2:
                class_counts += np.bincount(cv.cls.ravel(), minlength=256)
                body_lab[k] = body_lut[cv.cls]
                vert_lab[k] = vert_lut[cv.cls]
                core_lab[k] = core_lut[cv.cls]
                trab_mask = trab_lut[cv.cls]
        img = acc / np.float32(n_sub)
        if spec.texture_sd > 0:
            tex = _noise(rng_tex, m, spec.texture_sd, 1.5 / 2.3548 / sp)
            img = img + np.where(trab_mask, tex, np.float32(0.0))
        if sigma_px > 0.05:
            img = ndimage.gaussian_filter(img, sigma_px, mode="nearest")
        if spec.noise_sd > 0:
            img = img + _noise(rng, m, spec.noise_sd, noise_sigma_px)
        data[k] = img

    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = sp, sp, dz
    affine[:3, 3] = (float(xs[0]), float(ys[0]), float(zs[0]))
    pos = normalise_position(spec.orientation)
    (data, body_lab, vert_lab, core_lab), affine = reorient_arrays(
        [data, body_lab, vert_lab, core_lab], affine, pos, flip_rows=spec.flip_rows, flip_cols=spec.flip_cols
    )
    body_counts = np.bincount(body_lut, weights=class_counts, minlength=256).astype(np.int64)
    core_counts = np.bincount(core_lut, weights=class_counts, minlength=256).astype(np.int64)
    truth = _truth(spec, spine, gain, offset, vbmd, zs, body_counts, core_counts, affine, hu_lut, trunk)
    header: dict[str, Any] = {
        "Modality": "CT",
        "KVP": spec.kvp,
        "ConvolutionKernel": spec.kernel,
        "SliceThickness": spec.thickness_mm,
        "PatientPosition": pos,
        "BodyPartExamined": "ABDOMEN",
        "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "Manufacturer": "dicomnode phantom",
    }
    if spec.contrast != "native":
        header["ContrastBolusAgent"] = "IODINATED CONTRAST"
        header["ContrastPhase"] = spec.contrast
    vol = Volume(data=data, affine=affine, header=header, source=("dicomnode phantom",))
    return Phantom(
        volume=vol, truth=truth, body_labels=body_lab, vertebra_labels=vert_lab, core_labels=core_lab
    )


def _truth(
    spec: PhantomSpec,
    spine: list[Vertebra],
    gain: float,
    offset: float,
    vbmd: dict[str, float],
    zs: npt.NDArray[np.float64],
    body_counts: npt.NDArray[np.int64],
    core_counts: npt.NDArray[np.int64],
    affine: npt.NDArray[np.float64],
    hu_lut: npt.NDArray[np.float32],
    trunk: Trunk,
) -> PhantomTruth:
    zmin, zmax = float(zs.min()), float(zs.max())
    rib_levels = [v.name for v in spine if v.name.startswith("T")][: spec.rib_pairs]
    if spec.rib_pairs == 13:
        rib_levels = [*rib_levels, "L1"]
    levels = []
    for v in spine:
        a, b, h = v.half_width, v.half_depth, v.height
        corners = np.array(
            [
                v.world(su * a, sv, sw)
                for su in (-1, 1)
                for sv in (-b, v.posterior_wall_v)
                for sw in (-h / 2, float(v.top_w(sv)))  # a wedge fracture lowers the anterior top
            ]
        )
        ha, hm, hp = v.heights_mm()
        lab = v.index + 1
        trab_ref = tissue.trabecular_hu_ref(vbmd[v.name])
        levels.append(
            LevelTruth(
                level=v.name,
                label=lab,
                centroid_lps_mm=v.center,
                axis_lps=v.axis,
                body_bbox_lps_mm=(
                    (float(corners[:, 0].min()), float(corners[:, 1].min()), float(corners[:, 2].min())),
                    (float(corners[:, 0].max()), float(corners[:, 1].max()), float(corners[:, 2].max())),
                ),
                in_volume=bool(zmin <= v.center[2] <= zmax),
                body_voxels=int(body_counts[lab]),
                core_voxels=int(core_counts[lab]),
                vbmd_mg_cm3=vbmd[v.name],
                trabecular_hu_ref=trab_ref,
                trabecular_hu_true=float(hu_lut[LEVEL_BASE + 5 * v.index + P_CORE]),
                height_anterior_mm=ha,
                height_middle_mm=hm,
                height_posterior_mm=hp,
                fracture=v.fracture,
                width_mm=2 * a,
                depth_mm=2 * b,
                bears_rib=v.name in rib_levels,
            )
        )
    tissue_true = {
        "air": float(hu_lut[AIR]),
        "fat": float(hu_lut[FAT]),
        "muscle": float(hu_lut[MUSCLE]),
        "aorta": float(hu_lut[ARTERY]),
        "vein": float(hu_lut[VEIN]),
        "liver": float(hu_lut[LIVER]),
        "csf": float(hu_lut[CSF]),
        "disc": float(hu_lut[DISC]),
        "cortical": float(hu_lut[LEVEL_BASE + P_CORTEX]),
    }
    geometry = {
        "shape_kji": [int(zs.size), spec.matrix, spec.matrix],
        "affine": affine.tolist(),
        "pixel_spacing_mm": spec.spacing_mm,
        "slice_thickness_mm": spec.thickness_mm,
        "slice_spacing_mm": spec.slice_spacing_mm or spec.thickness_mm,
        "orientation": normalise_position(spec.orientation),
        "flip_rows": spec.flip_rows,
        "flip_cols": spec.flip_cols,
        "z_range_mm": [zmin, zmax],
        "curvature": spec.curvature,
        "psf_fwhm_mm": spec.psf_fwhm_mm,
    }
    return PhantomTruth(
        levels=tuple(levels),
        rib_pairs=spec.rib_pairs,
        last_rib_level=rib_levels[-1],
        names_by_last_rib=_names_by_last_rib(rib_levels[-1]),
        gain=gain,
        offset=offset,
        kvp=spec.kvp,
        contrast=spec.contrast,
        noise_sd=spec.noise_sd,
        seed=spec.seed,
        hu_model={"intercept_hu": tissue.TRAB_HU_INTERCEPT, "slope_hu_per_mg_cm3": tissue.TRAB_HU_PER_MG},
        tissue_hu_true=tissue_true,
        geometry=geometry,
        label_names={lv.label: lv.level for lv in levels},
        landmarks=_landmarks(spine, trunk),
        spec={k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(spec).items()},
    )


def _landmarks(spine: list[Vertebra], trunk: Trunk) -> dict[str, tuple[float, float, float]]:
    """Points well inside reference tissues at the L1 mid-plane (mirrors the layout in ``render``)."""
    l1 = spine[PHANTOM_LEVELS.index("L1")]
    x, y, z = l1.center
    b = l1.half_depth
    _, ay = trunk.half_axes(z)
    return {
        "aorta": (x + 15.0, y - b - 14.0, z),
        "ivc": (x - 22.0, y - b - 9.0, z),
        "paraspinal_left": (x + 36.0, y + b + 45.0, z),
        "paraspinal_right": (x - 36.0, y + b + 45.0, z),
        "subcutaneous_fat_anterior": (trunk.center_x, trunk.center_y - ay + trunk.fat_mm / 2.0, z),
        "air_anterior": (trunk.center_x, trunk.center_y - ay - 25.0, z),
    }


def _names_by_last_rib(last_rib_level: str) -> dict[str, str]:
    """Level names a labeller gives when it takes the last rib-bearing vertebra as T12 and counts from there.

    With 12 rib pairs this is the identity; with 13 our L1 becomes "T12" and L2 "L1"; with 11 our T12
    becomes "L1" and L5 "L6". S1 is recognised from the sacrum and keeps its name.
    """
    names = ["C7", *PHANTOM_LEVELS[:-1], "L6"]  # T1..L5 with one name of slack either side
    shift = PHANTOM_LEVELS.index(last_rib_level) - PHANTOM_LEVELS.index("T12")
    out = {lv: names[names.index(lv) - shift] for lv in PHANTOM_LEVELS[:-1]}
    out["S1"] = "S1"
    return out
