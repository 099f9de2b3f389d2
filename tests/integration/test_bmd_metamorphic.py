"""Metamorphic suite on the two real CTs (issue 9): the same patient re-gridded, re-sliced, tilted, noised,
cropped and re-encoded must give the same answer.

Each real CT (the Basel abdomen-pelvis NIfTI, the LIDC chest DICOM) is transformed into variants that a real
hospital produces from the same patient: thin and thick slices (thick ones by averaging slabs, as a
scanner's reconstruction does, never by point sampling), finer in-plane grids, a patient tilted by up to 10
degrees about the left-right and anterior-posterior axes, added noise, a sharp (bone) kernel, a small
display field of view, feet-first and prone storage, unsigned storage with intercept -1024, HU clipped at
1023, and z-crops. The tolerances are the issue's: identical level names, no fracture flag appearing or
disappearing, L1 trabecular mean spread <= 10 HU, L1-L2 vBMD spread <= 8 mg/cm3, the same category unless
the mean lies within 5 mg/cm3 of a cut-off.

Every variant's figures are printed (``pytest -s``) so that a failure shows the whole table. Known
failures of the present engine are marked ``xfail(strict=True)`` with the reason: they document what does
not hold yet (see the issue note), and turn the test red when they start to hold, so the mark is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage as ndi

from dicomnode.bmd import analyze_volume
from dicomnode.domain import AnalysisResult
from dicomnode.errors import DicomnodeError
from dicomnode.imaging.nifti import load_nifti
from dicomnode.imaging.volume import Volume

CUTOFFS = (80.0, 120.0)  # ACR QCT category limits (mg/cm3)


@dataclass(frozen=True)
class Row:
    variant: str
    levels: tuple[str, ...]
    uncertain: bool
    fractures: frozenset[str]
    l1_hu: float | None
    l1_l2: float | None
    category: str | None
    failed: str = ""
    #: the L1 ROI centroid (LPS mm) mapped back into the original patient's frame (tilts undone)
    l1_at: tuple[float, float, float] | None = None
    #: the vBMD (mg/cm3) the category is given on (L1-L2, or the pair the summary fell back to) and the notes
    category_mg: float | None = None
    notes: tuple[str, ...] = ()


def _row(name: str, res: AnalysisResult) -> Row:
    by = {v.level: v for v in res.vertebrae}
    l1, l2 = by.get("L1"), by.get("L2")
    pair = None
    if l1 and l2 and l1.vbmd_mg_cm3 is not None and l2.vbmd_mg_cm3 is not None:
        pair = 0.5 * (l1.vbmd_mg_cm3 + l2.vbmd_mg_cm3)
    fr = frozenset(v.level for v in res.vertebrae if v.exclusion_reason and "fracture" in v.exclusion_reason)
    s = res.summary
    return Row(
        name,
        tuple(
            v.level
            for v in res.vertebrae
            if not (v.exclusion_reason and "cut by the field" in v.exclusion_reason)
        ),
        any(v.level_uncertain for v in res.vertebrae),
        fr,
        l1.trabecular_hu_mean if l1 is not None else None,
        pair,
        s.category.value if s is not None and s.category is not None else None,
        l1_at=l1.roi_centroid_lps_mm if l1 is not None else None,
        category_mg=s.vbmd_l1_l2_mg_cm3 if s is not None else None,
        notes=s.notes if s is not None else (),
    )


# ---------------------------------------------------------------- transforms (pure functions of a Volume)


def _resample(vol: Volume, spacing: tuple[float, float, float], slab_mm: float | None = None) -> Volume:
    """The same patient on another axis-aligned grid (x, y, z mm spacing). Thick slices are averages of
    the finer data over the slab (``slab_mm``), like a reconstruction, not point samples."""
    canon = vol.canonical()
    sx, sy, sz = canon.spacing
    data = canon.data
    if slab_mm is not None and slab_mm > sz:
        # average slabs of a fine z grid (0.5 mm or finer), as a thick reconstruction does
        n_fine = int(np.ceil((data.shape[0] - 1) * sz / 0.5)) + 1
        fine = ndi.zoom(data, (n_fine / data.shape[0], 1.0, 1.0), order=1, grid_mode=False)
        sz = (data.shape[0] - 1) * sz / (fine.shape[0] - 1)
        data = ndi.uniform_filter1d(fine, max(1, round(slab_mm / sz)), axis=0, mode="nearest")
    nx, ny, nz = spacing
    shape = tuple(
        max(2, int(np.floor((data.shape[a] - 1) * (sz, sy, sx)[a] / (nz, ny, nx)[a])) + 1) for a in range(3)
    )
    out = ndi.affine_transform(
        data,
        np.array([nz / sz, ny / sy, nx / sx]),
        output_shape=shape,
        order=1,
        mode="nearest",
    ).astype(np.float32)
    aff = canon.affine.copy()
    for a, new in enumerate((nx, ny, nz)):
        aff[:3, a] *= new / canon.spacing[a]
    return Volume(out, aff, header=canon.header, source=canon.source)


def _rotation(axis: str, degrees: float) -> npt.NDArray[np.float64]:
    """Rotation in mm, coordinates ordered (z, y, x) like the array."""
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _pivot(canon: Volume) -> npt.NDArray[np.float64]:
    """The centre of a tilt, as a (k, j, i) index of the canonical grid: the spine (the densest bone near
    the trunk's midline, behind its centre) at the middle of the scan.

    A patient tilts about their own spine; more to the point, rotating a finite volume leaves wedges with
    no data at its top and bottom, which no scanner makes (every slice covers the whole field of view).
    Pivoting on the spine keeps those wedges away from the column, so the copy shows the same vertebrae
    as the original, tilted, the way a tilted patient is scanned."""
    mid = canon.data[canon.shape[0] // 3 : 2 * canon.shape[0] // 3]
    trunk = mid > -400
    _, jj, ii = np.nonzero(trunk)
    jc, ic = float(jj.mean()), float(ii.mean())
    sx = canon.spacing[0]
    _, jb, ib = np.nonzero(mid > 200)
    near = (np.abs(ib - ic) * sx <= 25.0) & (jb > jc)
    return np.array([(canon.shape[0] - 1) / 2.0, float(np.median(jb[near])), float(np.median(ib[near]))])


def _tilt(vol: Volume, axis: str, degrees: float) -> Volume:
    """The patient rotated by ``degrees`` about the left-right (``"x"``) or anterior-posterior (``"y"``)
    axis through the spine at the middle of the scan (``_pivot``), on the same grid (the scanner's grid
    stays axis-aligned)."""
    canon = vol.canonical()
    sx, sy, sz = canon.spacing
    rot = _rotation(axis, degrees)
    sp = np.array([sz, sy, sx])
    centre = _pivot(canon)
    # output index -> mm -> rotate back -> input index
    m = np.diag(1.0 / sp) @ rot.T @ np.diag(sp)
    offset = centre - m @ centre
    out = ndi.affine_transform(canon.data, m, offset=offset, order=1, mode="constant", cval=-1024.0)
    return replace(canon, data=out.astype(np.float32), slice_sop_instance_uids=(), slice_frame_numbers=())


def _untilt(
    vol: Volume, axis: str, degrees: float, lps: tuple[float, float, float]
) -> tuple[float, float, float]:
    """A point of the copy made by ``_tilt(vol, axis, degrees)`` back in the original patient's frame."""
    canon = vol.canonical()
    rot = _rotation(axis, degrees)
    centre = canon.index_to_lps(tuple(_pivot(canon)[::-1]))
    d = (np.asarray(lps) - centre)[::-1]  # (z, y, x) as in _tilt
    x, y, z = centre + (rot.T @ d)[::-1]
    return (float(x), float(y), float(z))


def _bend(vol: Volume, amp_mm: float) -> Volume:
    """The column curved sideways (a scoliosis-like path): each slice shifted left-right by ``amp_mm`` times
    the sine of its place along the scan (0 at both ends, ``amp_mm`` in the middle; 20 mm leans the column up
    to ~10 degrees from the scan's axis). It moves the column's path only: the vertebrae keep their own
    shape and orientation, which real scoliosis rotates and wedges as well."""
    canon = vol.canonical()
    data = canon.data.astype(np.float32)
    out = np.empty_like(data)
    nz = data.shape[0]
    for k in range(nz):
        dx = _bend_vox(canon, amp_mm, k)
        out[k] = ndi.shift(data[k], (0.0, dx), order=1, mode="constant", cval=-1024.0)
    return replace(canon, data=out, slice_sop_instance_uids=(), slice_frame_numbers=())


def _bend_vox(canon: Volume, amp_mm: float, k: float) -> float:
    """The shift (index units along the slice's rows) that ``_bend`` gives slice ``k``."""
    nz = canon.shape[0]
    return float(amp_mm * np.sin(np.pi * k / max(1, nz - 1)) / canon.spacing[0])


def _unbend(vol: Volume, amp_mm: float, lps: tuple[float, float, float]) -> tuple[float, float, float]:
    """A point of the copy made by ``_bend(vol, amp_mm)`` back in the original patient's frame."""
    canon = vol.canonical()
    i, j, k, _ = np.linalg.inv(canon.affine) @ np.array([*lps, 1.0])
    x, y, z = canon.index_to_lps((float(i) - _bend_vox(canon, amp_mm, float(k)), float(j), float(k)))
    return (float(x), float(y), float(z))


def _sharp_kernel(vol: Volume, sigma_mm: float = 1.0, noise_hu: float = 20.0) -> Volume:
    """A sharp (bone) reconstruction kernel: on a 0.7 mm in-plane grid (the patient re-gridded where coarser),
    each slice edge-enhanced by unsharp masking (the image plus its difference from a Gaussian blur of
    ``sigma_mm``, in-plane only, as a kernel acts), with the extra noise such kernels bring."""
    canon = vol.canonical()
    sx, sy, sz = canon.spacing
    if max(sx, sy) > 0.75:
        canon = _resample(canon, (0.7, 0.7, sz))
        sx, sy, sz = canon.spacing
    data = canon.data.astype(np.float32)
    blur = ndi.gaussian_filter(data, (0.0, sigma_mm / sy, sigma_mm / sx))
    return _noise(replace(canon, data=data + (data - blur)), noise_hu, seed=11)


def _noise(vol: Volume, sd: float, seed: int = 7) -> Volume:
    rng = np.random.default_rng(seed)
    return replace(vol, data=(vol.data + rng.normal(0.0, sd, vol.data.shape)).astype(np.float32))


def _small_fov(vol: Volume, keep_mm: float) -> Volume:
    """A display field of view of ``keep_mm`` x ``keep_mm`` centred on the trunk: the air and part of the
    fat at the sides are cut away, as a small reconstruction diameter does."""
    canon = vol.canonical()
    sx, sy, _ = canon.spacing
    body = canon.data[canon.shape[0] // 2] > -400
    jj, ii = np.nonzero(body)
    cj, ci = int(jj.mean()), int(ii.mean())
    hj, hi = int(keep_mm / sy / 2), int(keep_mm / sx / 2)
    j0, i0 = max(0, cj - hj), max(0, ci - hi)
    data = canon.data[:, j0 : cj + hj, i0 : ci + hi]
    aff = canon.affine.copy()
    aff[:3, 3] = canon.index_to_lps((i0, j0, 0))
    return Volume(np.ascontiguousarray(data), aff, header=canon.header, source=canon.source)


def _crop_z(vol: Volume, keep_below_mm: float | None = None, keep_above_mm: float | None = None) -> Volume:
    canon = vol.canonical()
    z = canon.index_to_lps(
        np.stack([np.zeros(canon.shape[0]), np.zeros(canon.shape[0]), np.arange(canon.shape[0])], axis=1)
    )[:, 2]
    keep = np.ones(canon.shape[0], dtype=bool)
    if keep_below_mm is not None:
        keep &= z <= keep_below_mm
    if keep_above_mm is not None:
        keep &= z >= keep_above_mm
    k = np.nonzero(keep)[0]
    aff = canon.affine.copy()
    aff[:3, 3] = canon.index_to_lps((0, 0, int(k[0])))
    return Volume(
        np.ascontiguousarray(canon.data[k[0] : k[-1] + 1]), aff, header=canon.header, source=canon.source
    )


def _roundtrip(tmp: Path, **kw: object) -> Callable[[Volume], Volume]:
    """Write as a DICOM series (orientation, rescale) and read back through the loader."""

    def f(vol: Volume) -> Volume:
        from dicomnode.imaging.loader import load_series
        from dicomnode.imaging.series import scan_path
        from dicomnode.imaging.writer import write_dicom_series

        out = tmp / f"rt{len(list(tmp.iterdir())) if tmp.exists() else 0}"
        keep = {
            k: vol.header[k] for k in ("KVP", "ContrastBolusAgent", "ConvolutionKernel") if k in vol.header
        }
        write_dicom_series(vol, out, header={"KVP": 120, **keep}, **kw)  # type: ignore[arg-type]
        (series,) = scan_path(out)
        return load_series(series)

    return f


# ---------------------------------------------------------------- the two patients


@pytest.fixture(scope="module")
def basel(abdomen_ct: Path) -> Volume:
    return load_nifti(abdomen_ct)


@pytest.fixture(scope="module")
def lidc(shared_data: Path) -> Volume:
    from dicomnode.imaging.loader import load_series
    from dicomnode.imaging.series import scan_path

    (series,) = scan_path(shared_data / "lidc_idri_0001_chest_dicom" / "dicom")
    return load_series(series)


def _variants(tmp: Path, crop_from_top: bool) -> list[tuple[str, Callable[[Volume], Volume]]]:
    """The variants; the z-crop takes 40 mm off the end away from L1 (the top of the chest CT, whose L1 is
    near its lower edge; the bottom of the abdomen CT, whose L1 is near its upper edge: the sacrum goes)."""
    crop = (
        ("z-crop 40 mm off the top", lambda v: _crop_z(v, keep_below_mm=_top(v) - 40.0))
        if crop_from_top
        else ("z-crop 40 mm off the bottom", lambda v: _crop_z(v, keep_above_mm=_bottom(v) + 40.0))
    )
    return [
        ("original", lambda v: v),
        ("0.75 mm in-plane, 1 mm slices", lambda v: _resample(v, (0.75, 0.75, 1.0))),
        ("1.0 mm in-plane, 0.625 mm slices", lambda v: _resample(v, (1.0, 1.0, 0.625))),
        ("5 mm slab-averaged slices", lambda v: _resample(v, (0.8, 0.8, 5.0), slab_mm=5.0)),
        ("tilt 10 deg about left-right", lambda v: _tilt(v, "x", 10.0)),
        ("tilt -8 deg about anterior-posterior", lambda v: _tilt(v, "y", -8.0)),
        ("noise 25 HU", lambda v: _noise(v, 25.0)),
        ("sharp kernel, 0.7 mm in-plane, 20 HU noise", _sharp_kernel),
        ("small field of view 260 mm", lambda v: _small_fov(v, 260.0)),
        # cuts into the trunk at the sides (and LIDC's lungs): air and skin only where the trunk meets air
        ("small field of view 220 mm", lambda v: _small_fov(v, 220.0)),
        ("feet first, unsigned intercept -1024", _roundtrip(tmp, orientation="FFS")),
        ("prone", _roundtrip(tmp, orientation="HFP")),
        # an export that clips at the top of a 12-bit range: cortex, metal and dense contrast lose their peaks
        ("HU clipped at 1023", lambda v: replace(v, data=np.minimum(v.data, 1023.0).astype(v.data.dtype))),
        (BEND, lambda v: _bend(v, 20.0)),
        crop,
    ]


def _bottom(vol: Volume) -> float:
    return float(vol.canonical().affine[2, 3])


def _top(vol: Volume) -> float:
    canon = vol.canonical()
    return float(canon.index_to_lps((0, 0, canon.shape[0] - 1))[2])


def _run_suite(name: str, vol: Volume, tmp: Path, crop_from_top: bool) -> list[Row]:
    rows: list[Row] = []
    for label, fn in _variants(tmp, crop_from_top):
        try:
            res = analyze_volume(fn(vol)).result
        except DicomnodeError as exc:  # a variant the engine refuses is a row of its own, not an error
            rows.append(Row(label, (), True, frozenset(), None, None, None, str(exc)[:120]))
            continue
        row = _row(label, res)
        if row.l1_at is not None and label in TILT_OF:
            row = replace(row, l1_at=_untilt(vol, *TILT_OF[label], row.l1_at))
        if row.l1_at is not None and label == BEND:
            row = replace(row, l1_at=_unbend(vol, 20.0, row.l1_at))
        rows.append(row)
    print(
        f"\n[{name}] {'variant':38s} {'levels':17s} unc  {'fractures':11s} L1 HU   L1-L2  L1 at (orig. mm)"
        "      category"
    )
    for r in rows:
        l1 = f"{r.l1_hu:6.1f}" if r.l1_hu is not None else "     -"
        pair = f"{r.l1_l2:6.1f}" if r.l1_l2 is not None else "     -"
        at = "(" + ",".join(f"{v:5.0f}" for v in r.l1_at) + ")" if r.l1_at is not None else "-" * 19
        print(
            f"[{name}] {r.variant:38s} {','.join(r.levels):17s} {str(r.uncertain)[0]}    "
            f"{','.join(sorted(r.fractures)) or '-':11s} {l1}  {pair}  {at}  {r.category}"
            + (f"  FAILED: {r.failed}" if r.failed else "")
        )
    return rows


@pytest.fixture(scope="module")
def basel_rows(basel: Volume, tmp_path_factory: pytest.TempPathFactory) -> list[Row]:
    return _run_suite("basel", basel, tmp_path_factory.mktemp("basel"), crop_from_top=False)


@pytest.fixture(scope="module")
def lidc_rows(lidc: Volume, tmp_path_factory: pytest.TempPathFactory) -> list[Row]:
    return _run_suite("lidc", lidc, tmp_path_factory.mktemp("lidc"), crop_from_top=True)


def _spread(values: list[float | None]) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return max(v) - min(v) if len(v) >= 2 else 0.0


#: How far (mm) the L1 ROI centroid of a copy, mapped back into the original frame, may lie from the
#: original's: the ROI moves a few mm with the grid; the next vertebra is 30-35 mm away.
SAME_VERTEBRA_MM = 12.0


def _check_levels(rows: list[Row], required: frozenset[str] = frozenset({"L1", "L2"})) -> None:
    """The same names in every copy, on the same vertebrae: a copy whose "L1" is the original's L2 is named
    one level off, whatever its names look like."""
    ref = rows[0]
    assert ref.l1_at is not None
    for r in rows[1:]:
        assert "L1" in r.levels, f"{r.variant}: L1 not measured ({r.levels})"
        common = set(ref.levels) & set(r.levels)
        assert required <= common, f"{r.variant}: {r.levels} vs {ref.levels}"
        assert r.l1_at is not None
        off = float(np.linalg.norm(np.subtract(r.l1_at, ref.l1_at)))
        assert off <= SAME_VERTEBRA_MM, f"{r.variant}: its L1 lies {off:.0f} mm from the original's L1"


#: LIDC: L2 is cut by the lower edge (its front lower corner; data README: "L3 and L2 cut by the lower
#: edge"), so whether a copy calls it cut or measures what is left depends on the grid: T12 and L1 are
#: complete in every copy.
LIDC_REQUIRED = frozenset({"T12", "L1"})
#: LIDC copies that keep the whole upper thorax (the top above the lung apices, no rib cut by the top
#: edge) and the column's orientation: the rib pairs are counted from the first rib in each.
LIDC_TOP_IN_VIEW = (
    "original",
    "0.75 mm in-plane, 1 mm slices",
    "1.0 mm in-plane, 0.625 mm slices",
    "noise 25 HU",
    "sharp kernel, 0.7 mm in-plane, 20 HU noise",
    "small field of view 260 mm",
    "small field of view 220 mm",
    "tilt -8 deg about anterior-posterior",
    "feet first, unsigned intercept -1024",
    "prone",
    "HU clipped at 1023",
)


def _check_values(rows: list[Row]) -> None:
    unmeasured = [r.variant for r in rows if r.l1_hu is None or not np.isfinite(r.l1_hu)]
    assert not unmeasured, f"L1 not measured in {unmeasured}"
    spread = _spread([r.l1_hu for r in rows])
    assert spread <= 10.0, f"L1 trabecular mean spread {spread:.1f} HU > 10"


def _check_vbmd(rows: list[Row]) -> None:
    spread = _spread([r.l1_l2 for r in rows])
    assert spread <= 8.0, f"L1-L2 vBMD spread {spread:.1f} mg/cm3 > 8"
    cats = {r.category for r in rows}
    means = [r.l1_l2 for r in rows if r.l1_l2 is not None]
    near = any(abs(m - c) <= 5.0 for m in means for c in CUTOFFS)
    assert len(cats) == 1 or near, f"categories {cats}"


def _check_fractures(rows: list[Row]) -> None:
    ref = rows[0].fractures
    diff = {r.variant: sorted(r.fractures ^ ref) for r in rows if r.fractures != ref}
    assert not diff, f"fracture flags differ from the original: {diff}"


TILTS = ("tilt 10 deg about left-right", "tilt -8 deg about anterior-posterior")
#: the column's path curved sideways, 20 mm at the scan's middle (``_bend``)
BEND = "column curved sideways 20 mm"
TILT_OF = {TILTS[0]: ("x", 10.0), TILTS[1]: ("y", -8.0)}


def test_basel_levels_are_the_same_in_every_variant(basel_rows: list[Row]) -> None:
    _check_levels(basel_rows)


#: 5 mm slabs: the end-plate profiles find too few end plates (a 1 mm cortical plate averaged over 5 mm stands
#: 20-40 HU above the marrow), so the mid-vertebral slab lies between the mask's ends at each depth
#: (``roi.mask_height_fit``), and each slice counts by where its whole extent lies in the slab
#: (``roi.slab_weight``): L1 reads 7 HU (Basel) and 5 HU (LIDC) above the native slices, within the spread.
THICK = "5 mm slab-averaged slices"


def test_basel_l1_mean_spread_up_to_3mm_slices(basel_rows: list[Row]) -> None:
    # every copy on the native 3 mm slices or thinner, tilted ones included
    _check_values([r for r in basel_rows if r.variant != THICK])


def test_basel_l1_mean_spread(basel_rows: list[Row]) -> None:
    _check_values(basel_rows)


def test_basel_vbmd_and_category_untilted_up_to_3mm_slices(basel_rows: list[Row]) -> None:
    _check_vbmd([r for r in basel_rows if r.variant != THICK and r.variant not in TILTS])


def test_basel_vbmd_and_category(basel_rows: list[Row]) -> None:
    _check_vbmd(basel_rows)


def test_basel_category_is_the_same(basel_rows: list[Row]) -> None:
    # the category of every copy named confidently (an uncertain one has none, by design)
    cats = {r.category for r in basel_rows if not r.uncertain}
    assert len(cats) == 1, cats


def test_basel_fracture_flags_are_the_same(basel_rows: list[Row]) -> None:
    _check_fractures(basel_rows)


def test_basel_naming_confidence_is_the_same(basel_rows: list[Row]) -> None:
    assert {r.uncertain for r in basel_rows} == {basel_rows[0].uncertain}


def test_lidc_every_variant_is_measured(lidc_rows: list[Row]) -> None:
    failed = {r.variant: r.failed for r in lidc_rows if r.failed}
    assert not failed, failed


def test_lidc_levels_are_the_same_without_tilt(lidc_rows: list[Row]) -> None:
    _check_levels([r for r in lidc_rows if r.variant not in TILTS], LIDC_REQUIRED)


def test_lidc_named_confidently_from_the_first_rib_or_the_12th_ribs_length(lidc_rows: list[Row]) -> None:
    by = {r.variant: r for r in lidc_rows}
    unsure = [r.variant for r in lidc_rows if r.uncertain and r.variant != THICK]
    assert not unsure, f"uncertain: {unsure}"
    # where the whole upper thorax is in view the count from the first rib confirms the lowest rib pair
    no_count = [v for v in LIDC_TOP_IN_VIEW if not any("the T12 anchor agrees" in n for n in by[v].notes)]
    assert not no_count, f"no count from the first rib although the upper thorax is in view: {no_count}"
    # elsewhere (the first rib cut by the top edge, or cropped away) the lowest pair's length against the
    # pair above (a 12th is about half the 11th) is the evidence
    rest = [r for r in lidc_rows if r.variant not in LIDC_TOP_IN_VIEW and r.variant != THICK]
    assert rest and all(any("the length of a 12th rib" in n for n in r.notes) for r in rest), [
        (r.variant, r.notes) for r in rest
    ]


@pytest.mark.xfail(
    strict=True,
    reason="the 5 mm slabs put the first rib in the top slice (no count from the top) and break the right "
    "12th rib up, so the lowest rib is seen on one side only: a 12th whose partner was missed looks the same "
    "as a rib credited one vertebra too low, which a random tilted copy showed, so it is not taken alone",
)
def test_lidc_naming_confidence_is_the_same(lidc_rows: list[Row]) -> None:
    assert {r.uncertain for r in lidc_rows} == {lidc_rows[0].uncertain}


def test_lidc_category_is_the_same(lidc_rows: list[Row]) -> None:
    # the category of every copy named confidently (an uncertain one has none, by design). L2 is cut by the
    # lower edge in most copies: the category is on L1-L2 where both are usable, on T12-L1 otherwise
    sure = [r for r in lidc_rows if not r.uncertain]
    assert len(sure) >= len(lidc_rows) - 1
    cats = {r.category for r in sure}
    means = [r.category_mg for r in sure if r.category_mg is not None]
    assert len(means) == len(sure)
    near = any(abs(m - c) <= 5.0 for m in means for c in CUTOFFS)
    assert len(cats) == 1 or near, (cats, means)
    assert None not in cats


def test_lidc_levels_are_the_same_with_tilt(lidc_rows: list[Row]) -> None:
    _check_levels(lidc_rows, LIDC_REQUIRED)


def test_lidc_l1_mean_spread_up_to_native_slices(lidc_rows: list[Row]) -> None:
    # every copy on the native 2.5 mm slices or thinner, tilted ones included
    _check_values([r for r in lidc_rows if r.variant != THICK])


def test_lidc_l1_mean_spread(lidc_rows: list[Row]) -> None:
    _check_values(lidc_rows)


def test_lidc_fracture_flags(lidc_rows: list[Row]) -> None:
    _check_fractures(lidc_rows)


def _assert_l1_in_the_originals(
    res: AnalysisResult, before: Volume, degrees: float, rows: list[Row], axis: str = "x"
) -> None:
    """The L1 ROI of ``res`` (a copy of ``before`` tilted ``degrees`` about ``axis``, left-right by default),
    the tilt undone, lies in the same vertebra as the original's L1 ROI (``rows[0]``)."""
    ref = rows[0].l1_at
    assert ref is not None
    (l1,) = [v for v in res.vertebrae if v.level == "L1"]
    at = _untilt(before, axis, degrees, l1.roi_centroid_lps_mm)
    d = float(np.linalg.norm(np.subtract(at, ref)))
    assert d <= SAME_VERTEBRA_MM, f"L1 ROI {d:.0f} mm from the original's L1"


@pytest.mark.parametrize(
    ("label", "make", "axis", "degrees"),
    [
        # the T12/L1 disc is thin and faint here, 8 mm above a dense band in L1's upper half: on 4 mm slabs,
        # or tilted 5 degrees about left-right, neither joined the disc chain, T12 merged into L1 (whose ribs
        # then disagreed with the sacrum) and L1 was set aside as two bodies in one segment
        ("4 mm slabs, 0.9 mm", lambda v: _resample(v, (0.9, 0.9, 4.0), slab_mm=4.0), "x", 0.0),
        ("tilt 5 LR", lambda v: _tilt(v, "x", 5.0), "x", 5.0),
        # tilted 10 degrees about anterior-posterior, the lower sacrum splits into pieces and pelvic bone
        # joined to the lowest reads as an ala: the sacrum was placed two pieces low, under one without alae
        ("tilt 10 AP", lambda v: _tilt(v, "y", 10.0), "y", 10.0),
    ],
)
def test_basel_named_confidently_where_a_faint_disc_or_the_sacral_run_was_lost(
    basel: Volume,
    basel_rows: list[Row],
    label: str,
    make: Callable[[Volume], Volume],
    axis: str,
    degrees: float,
) -> None:
    res = analyze_volume(make(basel)).result
    row = _row(label, res)
    assert not row.uncertain, row.notes
    assert row.fractures == basel_rows[0].fractures, f"{label}: fracture flags {sorted(row.fractures)}"
    assert row.category == basel_rows[0].category, (row.category, row.category_mg)
    _assert_l1_in_the_originals(res, basel, degrees, basel_rows, axis)


@pytest.mark.parametrize(
    ("label", "make"),
    [
        # L1's upper half holds a dense band (end plate with a bone island, 180-200 HU on the column profile)
        # 8-10 mm under the faint T12/L1 disc, and T12 is cut by the scan's top, so nothing above holds the
        # chain's pitch. On 5 mm slabs the disc is a 21 HU dip beside an 80 HU band; with 15 HU noise it is
        # 40 HU beside a 100 HU band, within 8 mm: the chain took the band, making L1 a 26 mm vertebra over 34
        # mm ones (benchmarks/disc_replay.py: the band on 16 of 44 re-encoded copies)
        ("5 mm slabs, 0.6 mm", lambda v: _resample(v, (0.6, 0.6, 5.0), slab_mm=5.0)),
        ("noise 15 HU", lambda v: _noise(v, 15.0, seed=3)),
    ],
)
def test_basel_t12_l1_disc_is_the_disc_not_the_dense_band_under_it(
    basel: Volume,
    basel_rows: list[Row],
    label: str,
    make: Callable[[Volume], Volume],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomnode.bmd import classical

    chains: list[list[int]] = []
    find = classical._find_discs

    def spy(p: npt.NDArray[np.float64], z_lo: int, z_hi: int, g: float) -> list[int]:
        chains.append(find(p, z_lo, z_hi, g))
        return chains[-1]

    monkeypatch.setattr(classical, "_find_discs", spy)
    res = analyze_volume(make(basel)).result
    (chain,) = chains
    # L1 (between the top two discs) and L2 (the two below) are about as tall: within a healthy spine's
    # spread of neighbouring pitches
    top, below = chain[-1] - chain[-2], chain[-2] - chain[-3]
    assert abs(np.log(top / below)) <= np.log(classical.PITCH_FREE), (label, chain)
    row = _row(label, res)
    assert not row.uncertain, row.notes
    assert row.fractures == basel_rows[0].fractures, f"{label}: fracture flags {sorted(row.fractures)}"
    _assert_l1_in_the_originals(res, basel, 0.0, basel_rows)


def test_lidc_thoracic_discs_hold_on_tilted_thick_slices(lidc: Volume, lidc_rows: list[Row]) -> None:
    # 2.5 mm slabs on a 1 mm grid, tilted 9.2 degrees about left-right (a copy drawn by
    # benchmarks/invariance_sweep.py --random, seed 1). The thin thoracic discs merge with their end plates
    # into bright bands, and the marrow of each small body between two bands is a dip 0.43 as deep as the
    # bands. Taken for discs, those dips made a chain that missed every other lower thoracic disc: T11 and T12
    # became one vertebra and "L1" lay on L2. Named confidently or not, L1 must be the original's L1.
    before = _resample(lidc, (1.0, 1.0, 2.5), slab_mm=2.5)
    res = analyze_volume(_tilt(before, "x", 9.2)).result
    _assert_l1_in_the_originals(res, before, 9.2, lidc_rows)


def test_lidc_enhanced_kidney_is_not_a_rib(lidc: Volume, lidc_rows: list[Row]) -> None:
    # 1 mm slices (point-sampled) on a 0.8 mm grid, tilted -3.4 degrees about left-right, a 300 mm field of
    # view (a copy drawn by benchmarks/invariance_sweep.py --random, seed 1). LIDC is arterial: the thin
    # enhanced cortex of the right kidney, reached by its artery, passed for a rib credited to L1, whose head
    # end lay 16 mm in front of the canal's front where the rib heads above lie 9-30 mm behind it. L1 then
    # counted as rib-bearing: names one level off (flagged), "L1" on L2.
    before = _resample(lidc, (0.8, 0.8, 1.0))
    res = analyze_volume(_small_fov(_tilt(before, "x", -3.4), 300.0)).result
    _assert_l1_in_the_originals(res, before, -3.4, lidc_rows)


@pytest.mark.parametrize(
    ("label", "spacing", "degrees"),
    [("tilt -6 LR", None, -6.0), ("2 mm slabs, 0.8 mm, tilt -3 LR", (0.8, 0.8, 2.0), -3.0)],
)
def test_lidc_l1_is_no_fracture_on_slightly_tilted_copies(
    lidc: Volume, lidc_rows: list[Row], label: str, spacing: tuple[float, float, float] | None, degrees: float
) -> None:
    # L1's discs are thin, each between two bright end plates. Tilted a few degrees against the slices, the
    # disc above L1 no longer falls below its plates at the posterior depths, and the end-plate search
    # passed L1's own plate (a shoulder or a shallow peak) for T12's, 8-10 mm further out: posterior
    # heights of 34-37 mm against 24-27 mm at the front read L1 as a grade 3 wedge (0.58 and 0.45), which
    # excluded it. Those heights step part-way through the depth (a wedge's change gradually), so the
    # ratio is now "unclear", not a fracture. The fracture flags must be the original's, and the step must
    # be what the QC says.
    before = lidc if spacing is None else _resample(lidc, spacing, slab_mm=spacing[2])
    res = analyze_volume(_tilt(before, "x", degrees)).result
    row = _row(label, res)
    assert row.fractures == lidc_rows[0].fractures, f"{label}: fracture flags {sorted(row.fractures)}"
    assert "L1" in row.levels and row.l1_hu is not None
    l1 = next(v for v in res.vertebrae if v.level == "L1")
    assert not l1.excluded, l1.exclusion_reason
    assert any("heights step by" in q and "fracture not assessed" in q for q in l1.qc), l1.qc


@pytest.mark.parametrize(
    ("label", "make"),
    [
        # L2, the last body above the bottom edge, read 0.51 from five scattered profiles (20.4 36.6 26.4 31.7
        # 30.1 mm), below 0.75 by 2.1 of their standard errors: grade 3. Student's t for their three residual
        # degrees of freedom asks for 3.31
        ("2 mm slabs, 0.8 mm", lambda v: _resample(v, (0.8, 0.8, 2.0), slab_mm=2.0)),
        # L1's middle profile passed its end plate (23.0 25.2 26.2 34.6 26.0 26.6 26.9 mm): ant / mid 0.67,
        # grade 2; a fracture shortens the middle, so the line's value stands in (a copy drawn by
        # benchmarks/invariance_sweep.py --random, seed 3)
        (
            "1.25 mm slabs, 1 mm, tilt +2.7 AP, noise 20",
            lambda v: _noise(_tilt(_resample(v, (1.0, 1.0, 1.25), slab_mm=1.25), "y", 2.7), 20.0, seed=21159),
        ),
        # two of T12's profiles inside the depth jumped 9 mm to the next body (23.5 25.7 26.2 | 35.1 33.0 |
        # 25.9 mm) and tilted the line to 0.62, grade 2: a step, not a wedge (seed 4)
        ("2 mm sampled, 0.8 mm, tilt +4.4 LR", lambda v: _tilt(_resample(v, (0.8, 0.8, 2.0)), "x", 4.4)),
        # three of T12's five profiles on a line (22.2 25.5 26.8 27.6 32.8 mm) gave a 0.2 mm height SE from
        # their residuals alone and a grade 3 call at 0.59: the spread is now taken over all five (seed 6)
        (
            "1.5 mm sampled, 0.9 mm, tilt +6.3 AP, noise 10",
            lambda v: _noise(_tilt(_resample(v, (0.9, 0.9, 1.5)), "y", 6.3), 10.0, seed=49507),
        ),
    ],
)
def test_lidc_fracture_flags_hold_on_copies_whose_profiles_went_astray(
    lidc: Volume, lidc_rows: list[Row], label: str, make: Callable[[Volume], Volume]
) -> None:
    row = _row(label, analyze_volume(make(lidc)).result)
    assert row.fractures == lidc_rows[0].fractures, f"{label}: fracture flags {sorted(row.fractures)}"
    assert "L1" in row.levels and row.l1_hu is not None
