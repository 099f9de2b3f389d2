"""The BMD measurement on the one real abdominal CT with reference vertebra masks (issue 2, acceptance).

``example_ct.nii.gz`` (TotalSegmentator example, native, 3 mm isotropic, T11 partial .. sacrum) and its
TotalSegmentator v2 masks (whole vertebrae incl. posterior elements: T12 32, L1 31 .. L5 27). Checked:

* the L1 ROI centroid lies inside the reference L1 mask; L1 trabecular mean HU within 90-140 HU (the data
  README's range for an eroded vertebral-body ROI on this image); L1 not ``level_uncertain`` with both
  anchors in view; ``level_uncertain`` (named right) on the T12-L3 crop, where the 12th ribs are the only
  anchor and no 11th pair is in view to compare them with (see ``test_dicom_roundtrip``);
* every level T12-L5 found and named; L1 (a regular body, reference-mask ratio ~0.84) not excluded as a
  compression fracture on its noisy 3 mm profiles, so the category rests on L1-L2;
* per-level Dice of our vertebral-body masks against the whole-vertebra reference, and the fraction of our
  body mask inside the right reference label, printed (``pytest -s``); the body should lie inside the
  right vertebra (fraction >= 0.7), while Dice is bounded by the missing posterior elements;
* the same after writing the volume as a DICOM series (HFS, FFS, flipped rows/columns, cropped to
  T12-L3) with ``dicomnode.imaging.writer`` and reading it back with ``dicomnode.imaging.loader``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.bmd import BmdOutput, analyze_volume
from dicomnode.imaging.nifti import load_nifti
from dicomnode.imaging.volume import Volume

REF_LABELS = {"T12": 32, "L1": 31, "L2": 30, "L3": 29, "L4": 28, "L5": 27}


@pytest.fixture(scope="module")
def ct(abdomen_ct: Path) -> Volume:
    return load_nifti(abdomen_ct)


@pytest.fixture(scope="module")
def ref(abdomen_seg: Path) -> Volume:
    return load_nifti(abdomen_seg)


def _ref_label_at(ref: Volume, lps: tuple[float, float, float]) -> int:
    i, j, k = np.round(ref.lps_to_index(lps)).astype(int)
    return int(ref.data[k, j, i])


def _check(out: BmdOutput, ref: Volume, expect: tuple[str, ...], tag: str, uncertain: bool = False) -> None:
    res = out.result
    levels = [v.level for v in res.vertebrae]
    for lv in expect:
        assert lv in levels, f"{tag}: {lv} not found ({levels})"
    l1 = res.vertebra("L1")
    assert l1 is not None
    assert l1.level_uncertain is uncertain, f"{tag}: {res.summary.notes if res.summary else ''}"
    assert _ref_label_at(ref, l1.roi_centroid_lps_mm) == REF_LABELS["L1"], tag
    # the data README: "about 95-140 HU" for an eroded body ROI; its mid-vertebral slab (3 central slices)
    # reads mean 101 / median 96 HU and ~95 HU per slice mid-body, where our central ROI sits: 5 HU margin
    assert 90.0 <= l1.trabecular_hu_mean <= 140.0, f"{tag}: L1 {l1.trabecular_hu_mean:.1f} HU"
    # every measured level sits in the right reference vertebra
    for v in res.vertebrae:
        if v.level in REF_LABELS and not v.excluded:
            assert _ref_label_at(ref, v.roi_centroid_lps_mm) == REF_LABELS[v.level], f"{tag}: {v.level}"


def _dice_table(out: BmdOutput, ref: Volume, tag: str) -> dict[str, tuple[float, float]]:
    """Dice and fraction-inside of our body masks against the reference, on the reference grid."""
    canon = out.canonical
    rows: dict[str, tuple[float, float]] = {}
    # map our canonical voxels to the reference grid by world position (grids may differ after re-gridding)
    for lv, lab in REF_LABELS.items():
        if lv not in out.body_masks:
            continue
        m = out.body_masks[lv]
        kk, jj, ii = np.nonzero(m)
        lps = canon.index_to_lps(np.stack([ii, jj, kk], axis=1))
        ri, rj, rk = np.round(ref.lps_to_index(lps)).astype(int).T
        inside = (ri >= 0) & (rj >= 0) & (rk >= 0)
        inside &= (ri < ref.shape[2]) & (rj < ref.shape[1]) & (rk < ref.shape[0])
        ours = np.zeros(ref.shape, dtype=bool)
        ours[rk[inside], rj[inside], ri[inside]] = True
        truth = ref.data == lab
        dice = 2.0 * float((ours & truth).sum()) / float(ours.sum() + truth.sum())
        frac = float((ours & truth).sum()) / max(1.0, float(ours.sum()))
        rows[lv] = (dice, frac)
    print(f"\n[{tag}] level  Dice(body vs whole vertebra)  fraction of body mask inside the right label")
    for lv, (d, f) in rows.items():
        print(f"[{tag}] {lv:4s}  {d:.3f}  {f:.3f}")
    return rows


def test_nifti_acceptance(ct: Volume, ref: Volume) -> None:
    out = analyze_volume(ct)
    res = out.result
    _check(out, ref, ("T12", "L1", "L2", "L3", "L4", "L5"), "nifti")
    rows = _dice_table(out, ref, "nifti")
    for lv in ("L1", "L2", "L3", "L4", "L5"):
        assert rows[lv][1] >= 0.7, f"{lv}: only {rows[lv][1]:.2f} of the body mask inside the reference"
    l1 = res.vertebra("L1")
    assert l1 is not None and l1.outline is not None and len(l1.outline.points_lps_mm) >= 4
    assert res.summary is not None and res.summary.contrast_phase.value == "native"
    assert res.study_instance_uid == "" and res.series_instance_uid == ""
    # L1 is a regular body (TotalSegmentator's reference mask: ~27 mm anterior vs 30-33 mm posterior, ratio
    # ~0.84; regular on the mid-sagittal view), but its end-plate profiles on 3 mm slices are noisy: the
    # fitted line can read a ratio well below 0.75. The fracture call weighs the ratio against its own
    # standard error (profile residuals + slice quantisation, qc.ratio_se) and must not exclude it: a
    # possible deformity within the measurement uncertainty is reported and the level kept, so the
    # category rests on L1-L2.
    assert not l1.excluded, l1.qc
    assert res.summary.levels_used == ("L1", "L2"), res.summary.levels_used
    assert l1.height_ratio is not None
    if l1.height_ratio < 0.75:
        assert any("within the measurement uncertainty" in q for q in l1.qc), l1.qc
    print(f"[nifti] L1 height ratio {l1.height_ratio:.3f}: {l1.qc}")
    print(
        f"[nifti] L1 {l1.trabecular_hu_mean:.1f} HU (median {l1.trabecular_hu_median:.0f}), vBMD "
        f"{l1.vbmd_mg_cm3}, L1-L2 {res.summary.vbmd_l1_l2_mg_cm3}, category {res.summary.category}, "
        f"calibration {res.summary.calibration.method} {dict(res.summary.calibration.reference_hu)}"
    )


@pytest.mark.parametrize(
    ("orientation", "flip_rows", "flip_cols", "crop"),
    [
        ("HFS", False, False, False),
        ("FFS", False, False, False),
        ("HFS", True, True, False),
        ("HFP", False, False, False),
        ("HFS", False, False, True),
    ],
    ids=["HFS", "FFS", "flipped", "HFP", "crop-T12-L3"],
)
def test_dicom_roundtrip(
    ct: Volume, ref: Volume, tmp_path: Path, orientation: str, flip_rows: bool, flip_cols: bool, crop: bool
) -> None:
    from dicomnode.imaging.loader import load_series
    from dicomnode.imaging.series import scan_path
    from dicomnode.imaging.writer import write_dicom_series

    z_range = None
    expect: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5")
    if crop:
        # T12 top (edge of the field of view) down to the L3/L4 disc, from the reference masks
        zs_l3 = _z_extent(ref, REF_LABELS["L3"])
        zs_t12 = _z_extent(ref, REF_LABELS["T12"])
        z_range = (zs_l3[0] - 2.0, zs_t12[1] + 3.0)
        expect = ("T12", "L1", "L2", "L3")
    write_dicom_series(
        ct,
        tmp_path / "series",
        orientation=orientation,
        flip_rows=flip_rows,
        flip_cols=flip_cols,
        z_range=z_range,
        header={"KVP": 120, "ConvolutionKernel": "STANDARD"},
    )
    series = scan_path(tmp_path / "series")
    assert len(series) == 1
    vol = load_series(series[0])
    out = analyze_volume(vol)
    tag = f"dicom {orientation}{' flipped' if flip_rows else ''}{' crop' if crop else ''}"
    # Cropped to T12-L3 the ribs are the only anchor: this patient's 12th ribs measure ~65-70 mm from their
    # heads (geodesic), and no 11th pair is in view to check the taper against, so nothing in view tells
    # them from a lumbar rib on L1 (a full 12th rib is ~110 mm). The names come out right, but honestly
    # flagged uncertain (the full series is confirmed by the sacrum: 5 rib-free vertebrae in between).
    _check(out, ref, expect, tag, uncertain=crop)
    _dice_table(out, ref, tag)
    res = out.result
    if crop:
        assert res.summary is not None
        assert any("lowest rib pair" in n and "lumbar rib" in n for n in res.summary.notes), res.summary.notes
        # uncertain names: no category and no L1 figures in the summary (issue 9, item 2)
        assert res.summary.category is None and res.summary.l1_hu is None
    assert res.series_instance_uid == vol.header.get("SeriesInstanceUID")
    l1 = res.vertebra("L1")
    assert l1 is not None and l1.outline is not None
    print(f"[{tag}] L1 height ratio {l1.height_ratio}, excluded {l1.excluded}: {l1.qc}")
    # the same regular L1 as in test_nifti_acceptance: not excluded on its noisy 3 mm profiles
    assert not l1.excluded, l1.qc
    # axial slices stay the slice axis: the outline refers to a real source image with pixel coordinates
    assert l1.outline.sop_instance_uid in vol.slice_sop_instance_uids
    assert len(l1.outline.points_cr) == len(l1.outline.points_lps_mm) >= 4
    assert l1.outline.points_cr[0] == l1.outline.points_cr[-1]


def _z_extent(ref: Volume, label: int) -> tuple[float, float]:
    kk, jj, ii = np.nonzero(ref.data == label)
    z = ref.index_to_lps(np.stack([ii, jj, kk], axis=1))[:, 2]
    return float(z.min()), float(z.max())
