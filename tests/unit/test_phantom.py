"""The synthetic phantom: its truth must describe its images (HU, labels, geometry, variants)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import InputError
from dicomnode.phantom import Phantom, PhantomSpec, make_phantom, tissue

# a small but anatomically complete scan: 2.8 mm pixels, 3 mm slices, T11 to L3
SMALL = PhantomSpec(
    matrix=128, spacing_mm=2.8, thickness_mm=3.0, z_levels=("T11", "L3"), noise_sd=10.0, seed=3
)


_CACHE: dict[str, Phantom] = {}


def _phantom(spec: PhantomSpec) -> Phantom:
    """Render once per spec for the whole module (specs hold dicts, so key by repr)."""
    key = repr(spec)
    if key not in _CACHE:
        _CACHE[key] = make_phantom(spec)
    return _CACHE[key]


def _value_at(ph: Phantom, arr: np.ndarray, lps: tuple[float, float, float]) -> object:
    i, j, k = np.round(ph.volume.lps_to_index(lps)).astype(int)
    return arr[k, j, i]


def _disk_mean(ph: Phantom, lps: tuple[float, float, float], radius_mm: float) -> float:
    """Mean HU in a small disk on the slice nearest ``lps`` (canonical grid assumed)."""
    v = ph.volume
    i, j, k = np.round(v.lps_to_index(lps)).astype(int)
    sp = v.spacing[0]
    r = max(1, int(radius_mm / sp))
    jj, ii = np.mgrid[-r : r + 1, -r : r + 1]
    m = jj**2 + ii**2 <= r * r
    return float(v.data[k, j - r : j + r + 1, i - r : i + r + 1][m].mean())


def test_core_mean_hu_matches_truth_within_noise() -> None:
    ph = _phantom(SMALL)
    checked = 0
    for lv in ph.truth.levels:
        if lv.core_voxels < 30:
            continue
        vals = ph.volume.data[ph.core_labels == lv.label]
        se = ph.truth.noise_sd / np.sqrt(vals.size)
        assert abs(float(vals.mean()) - lv.trabecular_hu_true) < 5 * se + 0.1, lv.level
        checked += 1
    assert checked >= 4


def test_truth_hu_follows_the_documented_model() -> None:
    ph = _phantom(SMALL)
    g, o = ph.truth.gain, ph.truth.offset
    assert tissue.GAIN_RANGE[0] <= g <= tissue.GAIN_RANGE[1]
    for lv in ph.truth.levels:
        assert lv.trabecular_hu_ref == pytest.approx(
            tissue.TRAB_HU_INTERCEPT + tissue.TRAB_HU_PER_MG * lv.vbmd_mg_cm3
        )
        assert lv.trabecular_hu_true == pytest.approx(g * lv.trabecular_hu_ref + o, abs=1e-3)
    assert ph.truth.tissue_hu_true["air"] == pytest.approx(g * -1000.0 + o, abs=1e-3)
    assert ph.truth.tissue_hu_true["fat"] == pytest.approx(g * -100.0 + o, abs=1e-3)


def test_bmd_options_set_the_levels_truth() -> None:
    spec = replace(SMALL, bmd={"L1": 75.0, "L2": 90.0}, bmd_all=140.0, noise_sd=0.0)
    ph = _phantom(spec)
    assert ph.truth.level("L1").vbmd_mg_cm3 == 75.0
    assert ph.truth.level("L2").vbmd_mg_cm3 == 90.0
    assert ph.truth.level("T12").vbmd_mg_cm3 == 140.0
    # without noise the core is exactly the truth value: nothing else leaks into it
    for name in ("T12", "L1", "L2"):
        lv = ph.truth.level(name)
        vals = ph.volume.data[ph.core_labels == lv.label]
        assert np.allclose(vals, lv.trabecular_hu_true, atol=0.05)


def test_labels_sit_where_the_truth_says() -> None:
    ph = _phantom(SMALL)
    v = ph.volume
    for name in ("T12", "L1", "L2"):
        lv = ph.truth.level(name)
        assert lv.in_volume
        assert _value_at(ph, ph.body_labels, lv.centroid_lps_mm) == lv.label
        assert _value_at(ph, ph.vertebra_labels, lv.centroid_lps_mm) == lv.label
        kji = np.argwhere(ph.body_labels == lv.label)
        pts = v.index_to_lps(kji[:, ::-1])
        lo, hi = np.array(lv.body_bbox_lps_mm[0]), np.array(lv.body_bbox_lps_mm[1])
        tol = np.array(v.spacing).max()
        assert np.all(pts >= lo - tol) and np.all(pts <= hi + tol)
        # the labelled body is centred on the truth centroid (a full level, coarse grid)
        assert np.linalg.norm(pts.mean(axis=0) - np.array(lv.centroid_lps_mm)) < 2.5
        # whole-vertebra label contains the body and adds posterior elements
        assert (ph.vertebra_labels == lv.label).sum() > 1.3 * lv.body_voxels
        # cortex is bright: the body rim is much denser than the core
        assert lv.core_voxels > 0


def test_reference_tissues_at_landmarks() -> None:
    ph = _phantom(replace(SMALL, noise_sd=0.0))
    t = ph.truth.tissue_hu_true
    lm = ph.truth.landmarks
    assert _disk_mean(ph, lm["aorta"], 4.0) == pytest.approx(t["aorta"], abs=3.0)
    assert _disk_mean(ph, lm["paraspinal_left"], 6.0) == pytest.approx(t["muscle"], abs=3.0)
    assert _disk_mean(ph, lm["air_anterior"], 6.0) == pytest.approx(t["air"], abs=3.0)
    assert _disk_mean(ph, lm["subcutaneous_fat_anterior"], 3.0) == pytest.approx(t["fat"], abs=5.0)
    # the disc sits half-way between two body centres
    mid = tuple((np.array(ph.truth.level("L1").centroid_lps_mm) + ph.truth.level("L2").centroid_lps_mm) / 2)
    assert _disk_mean(ph, mid, 3.0) == pytest.approx(t["disc"], abs=5.0)


def test_vertebral_sizes_are_adult_like() -> None:
    ph = _phantom(SMALL)
    for name in ("L1", "L2", "L3", "L4", "L5"):
        lv = ph.truth.level(name)
        assert 40.0 <= lv.width_mm <= 52.0 and 30.0 <= lv.depth_mm <= 35.0
        assert 25.0 <= lv.height_posterior_mm <= 30.0
    assert ph.truth.level("T8").width_mm < ph.truth.level("L3").width_mm


def test_contrast_raises_aorta_and_bone() -> None:
    means = {}
    truths = {}
    for phase in ("native", "arterial", "portal_venous"):
        ph = _phantom(replace(SMALL, contrast=phase, gain=1.0, offset=0.0, noise_sd=0.0))
        means[phase] = _disk_mean(ph, ph.truth.landmarks["aorta"], 4.0)
        truths[phase] = ph.truth.level("L1").trabecular_hu_true
        assert ph.truth.contrast == phase
    assert means["native"] == pytest.approx(40.0, abs=3.0)
    assert means["arterial"] > means["portal_venous"] > means["native"] + 80.0
    assert truths["arterial"] - truths["native"] == pytest.approx(
        tissue.contrast_offset("arterial", "trabecular")
    )
    assert truths["portal_venous"] - truths["native"] == pytest.approx(11.0)


@pytest.mark.parametrize(
    ("orientation", "flip_rows", "flip_cols"),
    [("FFS", False, False), ("HFP", True, False), ("FFP", False, True)],
)
def test_orientation_keeps_anatomy_in_place(orientation: str, flip_rows: bool, flip_cols: bool) -> None:
    base = replace(SMALL, table=False)
    ref = _phantom(base)
    other = _phantom(replace(base, orientation=orientation, flip_rows=flip_rows, flip_cols=flip_cols))
    assert ref.volume.header["PatientPosition"] == "HFS"
    assert other.volume.header["PatientPosition"] == orientation
    assert not np.allclose(other.volume.affine, ref.volume.affine)
    a, b = ref.volume.canonical(), other.volume.canonical()
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-9)
    np.testing.assert_array_equal(b.data, a.data)
    for lv in other.truth.levels:
        if lv.in_volume:
            assert _value_at(other, other.body_labels, lv.centroid_lps_mm) == lv.label
    assert other.truth.level("L1").centroid_lps_mm == ref.truth.level("L1").centroid_lps_mm


def test_prone_table_is_anterior() -> None:
    sup = _phantom(replace(SMALL, noise_sd=0.0))
    pro = _phantom(replace(SMALL, noise_sd=0.0, orientation="PRONE"))
    t_hu = sup.truth.tissue_hu_true["air"] + 1150.0  # table is ~150 HU, air -1000
    l1 = sup.truth.level("L1").centroid_lps_mm
    for ph, posterior in ((sup, True), (pro, False)):
        can = ph.volume.canonical()
        i, j, k = np.round(can.lps_to_index(l1)).astype(int)
        col = can.data[k, :, i]
        table_rows = np.nonzero(np.abs(col - t_hu) < 30.0)[0]
        assert table_rows.size > 0
        assert (table_rows.mean() > j) == posterior


def test_z_crop_by_levels_and_mm() -> None:
    ph = _phantom(replace(SMALL, z_levels=("T12", "L2"), noise_sd=0.0))
    present = {lv.level for lv in ph.truth.levels if lv.in_volume}
    assert present == {"T12", "L1", "L2"}
    assert ph.truth.level("L3").body_voxels == 0
    assert ph.truth.level("T11").body_voxels == 0
    assert ph.truth.level("L1").body_voxels > 0
    l1 = ph.truth.level("L1").centroid_lps_mm[2]
    ph2 = _phantom(replace(SMALL, z_mm=(l1 - 10.0, l1 + 10.0), noise_sd=0.0))
    zs = ph2.volume.index_to_lps(np.array([[0, 0, k] for k in range(ph2.volume.shape[0])]))[:, 2]
    assert zs.min() >= l1 - 10.0 - 1e-6 and zs.max() <= l1 + 10.0 + 1e-6
    assert ph2.truth.level("L2").body_voxels == 0
    ph3 = _phantom(replace(SMALL, n_slices=7, noise_sd=0.0))
    assert ph3.volume.shape[0] == 7


def _lateral_bone(ph: Phantom, level: str) -> int:
    """Bone voxels posterolateral to the spine (> 50 mm off the midline), +-6 mm around a level centre."""
    can = ph.volume.canonical()
    lv = ph.truth.level(level)
    cx, cy, cz = lv.centroid_lps_mm
    k = np.arange(can.shape[0])
    z = can.affine[2, 3] + can.affine[2, 2] * k
    x = can.affine[0, 3] + can.affine[0, 0] * np.arange(can.shape[2])
    y = can.affine[1, 3] + can.affine[1, 1] * np.arange(can.shape[1])
    sel = can.data[np.abs(z - cz) <= 6.0][:, y > cy][:, :, np.abs(x - cx) > 50.0]
    return int((sel > 400.0).sum())


def test_rib_count_variants() -> None:
    base = replace(SMALL, z_levels=("T11", "L2"), noise_sd=0.0, matrix=160, spacing_mm=2.2)
    r11, r12, r13 = (_phantom(replace(base, rib_pairs=n)) for n in (11, 12, 13))
    assert (r11.truth.last_rib_level, r12.truth.last_rib_level, r13.truth.last_rib_level) == (
        "T11",
        "T12",
        "L1",
    )
    assert r13.truth.level("L1").bears_rib and not r12.truth.level("L1").bears_rib
    # what a labeller that counts down from the last rib would call the levels (the transitional trap)
    assert all(k == v for k, v in r12.truth.names_by_last_rib.items())
    assert r13.truth.names_by_last_rib["L1"] == "T12" and r13.truth.names_by_last_rib["L2"] == "L1"
    assert r11.truth.names_by_last_rib["T12"] == "L1" and r11.truth.names_by_last_rib["L5"] == "L6"
    assert not r11.truth.level("T12").bears_rib
    assert _lateral_bone(r13, "L1") > _lateral_bone(r12, "L1") + 20
    assert _lateral_bone(r12, "T12") > _lateral_bone(r11, "T12") + 20


def test_fracture_reduces_anterior_height() -> None:
    ph = _phantom(replace(SMALL, fractures={"L2": 0.3}, noise_sd=0.0))
    ok = _phantom(replace(SMALL, noise_sd=0.0))
    lv, lv0 = ph.truth.level("L2"), ok.truth.level("L2")
    assert lv.fracture == 0.3
    assert lv.height_anterior_mm == pytest.approx(0.7 * lv.height_posterior_mm, rel=1e-3)
    assert lv0.height_anterior_mm == pytest.approx(lv0.height_posterior_mm)
    assert lv.body_voxels < 0.92 * lv0.body_voxels
    # the labelled body fits the (lowered) truth bounding box
    kji = np.argwhere(ph.body_labels == lv.label)
    pts = ph.volume.index_to_lps(kji[:, ::-1])
    tol = max(ph.volume.spacing)
    assert pts[:, 2].max() <= lv.body_bbox_lps_mm[1][2] + tol
    assert lv.body_bbox_lps_mm[1][2] < lv0.body_bbox_lps_mm[1][2]


def test_sacrum_and_pelvis_present() -> None:
    ph = _phantom(replace(SMALL, z_levels=("L4", "S1"), noise_sd=0.0))
    s1 = ph.truth.level("S1")
    assert s1.in_volume and s1.core_voxels > 0
    # iliac wings: bone far lateral to the spine below the L5 centre
    can = ph.volume.canonical()
    l5z = ph.truth.level("L5").centroid_lps_mm[2]
    x = can.affine[0, 3] + can.affine[0, 0] * np.arange(can.shape[2])
    z = can.affine[2, 3] + can.affine[2, 2] * np.arange(can.shape[0])
    wings = can.data[z < l5z - 30.0][:, :, np.abs(x - s1.centroid_lps_mm[0]) > 70.0]
    assert (wings > 400.0).sum() > 50


def test_noise_seed_and_scanner_map() -> None:
    a = _phantom(replace(SMALL, gain=1.05, offset=-12.0))
    b = make_phantom(replace(SMALL, gain=1.05, offset=-12.0))
    np.testing.assert_array_equal(a.volume.data, b.volume.data)
    assert a.truth.gain == 1.05 and a.truth.offset == -12.0
    air = _disk_mean(a, a.truth.landmarks["air_anterior"], 14.0)  # ~80 voxels: SE ~1.1 HU
    assert air == pytest.approx(1.05 * -1000.0 - 12.0, abs=5.5)
    c = _phantom(replace(SMALL, seed=4))
    assert (c.truth.gain, c.truth.offset) != (_phantom(SMALL).truth.gain, _phantom(SMALL).truth.offset)


@pytest.mark.parametrize(
    "bad",
    [
        {"rib_pairs": 14},
        {"contrast": "delayed"},
        {"z_levels": ("T11", "L9")},
        {"fractures": {"L2": 0.95}},
        {"orientation": "SIDEWAYS"},
        {"matrix": 8},
    ],
)
def test_bad_spec_is_a_clear_input_error(bad: dict[str, object]) -> None:
    with pytest.raises(InputError):
        make_phantom(replace(SMALL, **bad))  # type: ignore[arg-type]


def test_truth_dict_is_json_and_lps() -> None:
    ph = _phantom(SMALL)
    d = json.loads(json.dumps(ph.truth.as_dict()))
    assert d["coordinate_system"].startswith("DICOM patient LPS")
    l1 = next(x for x in d["levels"] if x["level"] == "L1")
    assert l1["centroid_lps_mm"] == list(ph.truth.level("L1").centroid_lps_mm)
    assert d["label_names"][str(l1["label"])] == "L1"
    np.testing.assert_allclose(np.array(d["geometry"]["affine"]), ph.volume.affine)
    # the truth file carries its spec: re-rendering reproduces the scan exactly
    again = make_phantom(PhantomSpec.from_dict(d["spec"]))
    np.testing.assert_array_equal(again.volume.data, ph.volume.data)
    with pytest.raises(InputError):
        PhantomSpec.from_dict({"nonsense": 1})


def test_cli_writes_series_truth_and_labels(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    from dicomnode.cli import main

    out = tmp_path / "ph"
    rc = main(
        ["phantom", "--out", str(out), "--matrix", "64", "--spacing", "5", "--thickness", "3",
         "--z-range", "L1:L2", "--bmd", "L1=70", "--fracture", "L2:0.2", "--orientation", "FFS", "--labels",
         "--header", "PatientID=XYZ"]
    )  # fmt: skip
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    assert next(x for x in truth["levels"] if x["level"] == "L1")["vbmd_mg_cm3"] == 70.0
    assert truth["geometry"]["orientation"] == "FFS"
    files = sorted((out / "dicom").glob("*.dcm"))
    assert len(files) == truth["written"]["series"]["files"] == truth["geometry"]["shape_kji"][0]
    img = nib.load(str(out / "truth_labels.nii.gz"))
    assert set(np.unique(np.asarray(img.dataobj))) >= {0, truth["levels"][12]["label"]}
    assert main(["phantom", "--out", str(out), "--bmd", "L1"]) == 1


def test_correlated_noise_keeps_its_sd() -> None:
    white = _phantom(replace(SMALL, gain=1.0, offset=0.0, noise_sd=12.0))
    corr = _phantom(replace(SMALL, gain=1.0, offset=0.0, noise_sd=12.0, noise_fwhm_mm=6.0))
    for ph, correlated in ((white, False), (corr, True)):
        air = ph.volume.data[:, :12, :20]  # anterior corner: air only
        assert float(air.std()) == pytest.approx(12.0, rel=0.15)
        d = air - air.mean()
        rho = float((d[:, :, 1:] * d[:, :, :-1]).mean() / d.var())
        assert (rho > 0.3) == correlated


def test_trabecular_texture_is_zero_mean_and_confined_to_bone() -> None:
    plain = _phantom(replace(SMALL, noise_sd=0.0))
    tex = _phantom(replace(SMALL, noise_sd=0.0, texture_sd=25.0))
    diff = tex.volume.data - plain.volume.data
    lv = tex.truth.level("L2")
    core = tex.core_labels == lv.label
    assert float(diff[core].std()) == pytest.approx(25.0, rel=0.3)
    # zero-mean: the core mean moves only by sampling error (a few hundred voxels of SD 25 -> ~1-2 HU)
    assert abs(float(diff[core].mean())) < 4.0
    far = _far_from_bone(tex)
    assert np.all(diff[far] == 0.0)


def _far_from_bone(ph: Phantom) -> np.ndarray:
    from scipy import ndimage

    near = np.asarray(ndimage.binary_dilation(ph.vertebra_labels > 0, iterations=3), dtype=bool)
    return ~near


def test_cli_study_writes_three_series(tmp_path: Path) -> None:
    from dicomnode.cli import main

    out = tmp_path / "st"
    rc = main(
        ["phantom", "--out", str(out), "--matrix", "72", "--spacing", "5", "--thickness", "1",
         "--z-range", "L1:L2", "--study", "--contrast", "arterial", "--transfer-syntax", "rle"]
    )  # fmt: skip
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    assert set(truth["written"]) == {"localizer", "soft", "bone"}
    assert truth["contrast"] == "arterial"
    for name in ("localizer", "soft", "bone"):
        files = list((out / truth["written"][name]["folder"]).glob("*.dcm"))
        assert len(files) == truth["written"][name]["files"] > 0
