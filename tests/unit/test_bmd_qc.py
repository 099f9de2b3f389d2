"""Classification, L1 HU flags, the pair fallback and demographics (dicomnode.bmd.qc)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.bmd import qc
from dicomnode.bmd.qc import reference_height
from dicomnode.bmd.roi import RoiStats
from dicomnode.domain import BoneCategory, Calibration, ContrastPhase, VertebraResult

CAL = Calibration("internal-air-fat", "test", 0.83, -17.0, {}, 120.0, "STANDARD", 0.0)


def _v(level: str, vbmd: float | None, excluded: bool = False, reason: str | None = None) -> VertebraResult:
    return VertebraResult(
        level=level,
        level_uncertain=False,
        excluded=excluded,
        qc=(),
        trabecular_hu_mean=150.0,
        trabecular_hu_median=148.0,
        trabecular_hu_sd=30.0,
        roi_volume_mm3=5000.0,
        roi_centroid_lps_mm=(0.0, 0.0, 0.0),
        vbmd_mg_cm3=vbmd,
        exclusion_reason=reason,
    )


@pytest.mark.parametrize(
    ("vbmd", "cat"),
    [
        (121.0, BoneCategory.NORMAL),
        (120.0, BoneCategory.OSTEOPENIA),
        (80.0, BoneCategory.OSTEOPENIA),
        (79.9, BoneCategory.OSTEOPOROSIS),
    ],
)
def test_acr_category(vbmd: float, cat: BoneCategory) -> None:
    assert qc.category(vbmd) == cat


def test_l1_hu_flags() -> None:
    assert len(qc.l1_hu_flags(100.0)) == 2
    assert len(qc.l1_hu_flags(150.0)) == 1
    assert qc.l1_hu_flags(180.0) == ()
    assert "NPV" in qc.l1_hu_flags(210.0)[0]


def test_l1_l2_pair_is_used_when_valid() -> None:
    s = qc.summarise([_v("L1", 100.0), _v("L2", 90.0), _v("L3", 70.0)], ContrastPhase.NATIVE, CAL, [], False)
    assert s.levels_used == ("L1", "L2")
    assert s.vbmd_l1_l2_mg_cm3 == pytest.approx(95.0)
    assert s.category == BoneCategory.OSTEOPENIA
    assert s.l1_hu == 150.0


def test_nearest_valid_pair_replaces_an_excluded_level_and_says_so() -> None:
    rows = [
        _v("T12", 100.0),
        _v("L1", None, True, "suspected compression fracture"),
        _v("L2", 70.0),
        _v("L3", 74.0),
    ]
    s = qc.summarise(rows, ContrastPhase.NATIVE, CAL, [], False)
    assert s.levels_used == ("L2", "L3")
    assert s.category == BoneCategory.OSTEOPOROSIS
    assert s.l1_hu is None
    assert any("L2-L3" in n for n in s.notes) and any("compression fracture" in n for n in s.notes)


def test_no_usable_level_gives_no_category() -> None:
    s = qc.summarise([_v("L4", None, True, "metal")], ContrastPhase.NATIVE, CAL, [], True)
    assert s.category is None and s.vbmd_l1_l2_mg_cm3 is None
    assert any("uncertain" in n for n in s.notes)


def test_uncertain_naming_withholds_category_and_l1_figures() -> None:
    # the same rows that give osteopenia when the names are confirmed: with uncertain names, no category,
    # no L1 HU and no L1 thresholds, and the summary says why
    rows = [_v("L1", 100.0), _v("L2", 90.0), _v("L3", 70.0)]
    s = qc.summarise(rows, ContrastPhase.NATIVE, CAL, ["lowest rib pair is short"], True)
    assert s.category is None and s.vbmd_l1_l2_mg_cm3 is None and s.levels_used == ()
    assert s.l1_hu is None and s.l1_hu_flags == ()
    assert any("no category" in n for n in s.notes) and "lowest rib pair is short" in s.notes


@pytest.mark.parametrize(
    ("header", "age", "sex"),
    [
        ({"PatientAge": "058Y", "PatientSex": "F"}, 58.0, "F"),
        ({"PatientAge": "006M", "PatientSex": "m"}, 0.5, "M"),
        ({"PatientBirthDate": "19600115", "StudyDate": "20200116"}, 60.0, None),
        ({"PatientSex": "X"}, None, None),
        ({}, None, None),
    ],
)
def test_patient_info(header: dict[str, str], age: float | None, sex: str | None) -> None:
    info = qc.patient_info(header)
    if age is None:
        assert info.age_years is None
    else:
        assert info.age_years is not None and math.isclose(info.age_years, age, abs_tol=0.05)
    assert info.sex == sex


def _stats(
    heights: tuple[float, float, float] | None,
    se: tuple[float, float, float] | None,
    step: float | None = None,
    dof: int | None = None,
) -> RoiStats:
    box = (slice(0, 1), slice(0, 1), slice(0, 1))
    roi = np.ones((1, 1, 1), dtype=bool)
    return RoiStats(
        roi,
        box,
        100.0,
        100.0,
        20.0,
        2000.0,
        (0.0, 0.0, 0.0),
        0.0,
        heights,
        se,
        height_step_mm=step,
        heights_dof=dof,
    )


def test_neighbour_reference_height_comes_from_end_plate_profiles_only() -> None:
    # profile heights: the tallest is the reference
    assert reference_height(_stats((30.0, 28.0, 31.0), (0.5, 0.5, 0.5)), truncated=False) == 31.0
    # outline-only heights (the profiles failed) met a merged disc or the next body: no reference. A 44 mm
    # outline next to a regular 27 mm body once called that body "< 80 % of its neighbours"
    assert reference_height(_stats((22.0, 30.0, 44.0), None), truncated=False) is None
    # a body cut by the field of view has no height to compare
    assert reference_height(_stats((30.0, 28.0, 31.0), (0.5, 0.5, 0.5)), truncated=True) is None
    assert reference_height(_stats(None, None), truncated=False) is None
    # profiles whose heights step part-way through the depth met another structure: no reference either
    assert reference_height(_stats((24.0, 26.0, 34.0), (0.5, 0.5, 0.5), step=6.4), truncated=False) is None


def _build(
    levels: tuple[str, ...], stats: dict[str, RoiStats], truncated: frozenset[str] = frozenset()
) -> dict[str, VertebraResult]:
    """``build_vertebrae`` on a 4 x 4 x 4 scene named ``levels`` (cranial to caudal), with ``stats`` for the
    measured ones, an identity calibration and a 1000 mm3 least ROI."""
    from dicomnode.bmd import calibration as cal
    from dicomnode.bmd.segmentation import SpineSegmentation
    from dicomnode.imaging.volume import Volume

    vol = Volume(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4))
    seg = SpineSegmentation(
        levels, np.zeros((4, 4, 4), dtype=np.uint8), level_uncertain=False, truncated=truncated
    )
    rows = qc.build_vertebrae(
        volume=vol,
        canon=vol,
        seg=seg,
        stats=stats,
        fit=cal.TissueFit(1.0, 0.0, {}, (), ()),
        correction=0.0,
        vbmd_ok=True,
        min_roi_mm3=1000.0,
        outline=lambda *_: None,
    )
    return {r.level: r for r in rows}


def _rows_for(
    heights: dict[str, tuple[float, float, float]],
    above: tuple[str, ...] = (),
    steps: dict[str, float] | None = None,
    se: float = 0.5,
    dof: int | None = None,
) -> dict[str, VertebraResult]:
    """``build_vertebrae`` on three levels whose ROIs are alike but for their end-plate profile heights;
    ``above``: whole vertebrae named above them but not measured."""
    stats = {lv: _stats(h, (se, se, se), (steps or {}).get(lv), dof) for lv, h in heights.items()}
    return _build(above + tuple(heights), stats)


def test_a_wedge_between_regular_neighbours_is_a_fracture() -> None:
    rows = _rows_for({"T12": (25.0, 26.0, 27.0), "L1": (15.0, 22.0, 27.5), "L2": (26.0, 27.0, 28.0)})
    assert rows["L1"].excluded and "compression fracture" in (rows["L1"].exclusion_reason or "")
    assert not rows["T12"].excluded and not rows["L2"].excluded


def test_profiles_that_read_a_body_much_taller_than_its_neighbours_are_no_fracture() -> None:
    # LIDC's L1 tilted 5 degrees: its profiles read 20/27/35 mm (0.57) next to a 27.5 mm T12; a fracture
    # shortens a body, so the 35 mm posterior height ran past an end plate: flagged, kept, not excluded
    rows = _rows_for({"T12": (24.2, 25.8, 27.5), "L1": (20.1, 27.1, 35.4), "L2": (26.0, 27.0, 28.0)})
    l1 = rows["L1"]
    assert not l1.excluded and l1.vbmd_mg_cm3 is not None
    assert any("height ratio unclear" in q and "exceeds the neighbours'" in q for q in l1.qc), l1.qc


def test_profiles_whose_heights_step_part_way_through_the_depth_are_no_fracture() -> None:
    # LIDC's L1 tilted 6 degrees: profile heights 23.9 26.2 27.0 26.4 | 34.1 34.2 33.4 mm, a 6.4 mm step
    # where the posterior profiles passed L1's own end plate for T12's; the line through them reads 0.58,
    # within 20 % of the neighbours' heights. The same heights without the step are a grade 3 fracture.
    h = {"T12": (27.5, 28.0, 29.0), "L1": (20.0, 27.0, 34.5), "L2": (28.5, 29.0, 30.0)}
    l1 = _rows_for(h, steps={"L1": 6.4})["L1"]
    assert not l1.excluded and l1.vbmd_mg_cm3 is not None, l1.exclusion_reason
    assert any("heights step by 6.4 mm" in q and "fracture not assessed" in q for q in l1.qc), l1.qc
    assert "Genant grade 3" in (_rows_for(h)["L1"].exclusion_reason or "")


def test_the_fracture_margin_widens_for_few_residuals() -> None:
    # the normal 2 SE for an error of known size; Student's t at the same one-sided level for an error
    # estimated from the residuals of 5-7 profiles around their line (3-5 degrees of freedom)
    assert qc.fracture_z(None) == qc.FRACTURE_Z
    assert qc.fracture_z(3) == pytest.approx(3.31, abs=0.01)
    assert qc.fracture_z(5) == pytest.approx(2.65, abs=0.01)
    zs = [qc.fracture_z(d) for d in (1, 2, 3, 5, 10, 100)]
    assert zs == sorted(zs, reverse=True) and zs[-1] == pytest.approx(qc.FRACTURE_Z, abs=0.05)
    # a 0.61 ratio with 1.6 mm height errors: below 0.75 by more than 2 SE, not by 3.31 SE. From five
    # profiles (3 degrees of freedom) it is kept, flagged "within the measurement uncertainty"; from many
    # it is excluded as a fracture
    h = {"T12": (27.5, 28.0, 29.0), "L1": (18.3, 24.0, 30.0), "L2": (28.5, 29.0, 30.0)}
    few = _rows_for(h, se=1.6, dof=3)["L1"]
    assert not few.excluded, few.exclusion_reason
    assert any("within the measurement uncertainty" in q for q in few.qc), few.qc
    many = _rows_for(h, se=1.6, dof=100)["L1"]
    assert many.excluded and "Genant grade 2" in (many.exclusion_reason or ""), many.exclusion_reason


def test_a_body_much_taller_than_the_one_below_is_two_bodies_in_one() -> None:
    # Basel re-encoded with 3.75 mm slabs and noise: the thin T12/L1 disc was missed, L1 took in the lower
    # part of T12 (outline 34/38/48 mm over a 33 mm L2) and its ROI the end plates between them (L1 +19 HU)
    rows = _rows_for({"L1": (34.0, 38.1, 47.5), "L2": (33.0, 29.2, 29.5), "L3": (31.1, 28.0, 27.0)})
    l1 = rows["L1"]
    assert l1.excluded and "two bodies in one segment" in (l1.exclusion_reason or ""), l1.exclusion_reason
    assert l1.vbmd_mg_cm3 is None
    assert not rows["L2"].excluded and not rows["L3"].excluded


def test_only_the_top_body_can_be_two_bodies() -> None:
    # a false disc cut L1 into a 12 mm fragment: T12 over it reads 2.3 times taller, but T12 has a body
    # above it; discs missed inside the column are found by the gaps they leave in the chain of discs
    rows = _rows_for({"T11": (27.7, 30.6, 31.9), "T12": (23.2, 25.7, 28.2), "L1": (12.2, 11.9, 11.0)})
    assert "two bodies" not in (rows["T12"].exclusion_reason or "")
    assert "two bodies" not in (rows["T11"].exclusion_reason or "")
    # the top body reported is not the top of the column when whole vertebrae lie above it (a chest CT:
    # T10 and up are named but not reported); LIDC at 5 mm, tilted, read T11 31 mm over a 23 mm fragment
    rows = _rows_for(
        {"T11": (28.0, 30.0, 31.0), "T12": (20.0, 22.0, 23.0), "L1": (26.0, 27.0, 28.0)},
        above=("T9", "T10"),
    )
    assert "two bodies" not in (rows["T11"].exclusion_reason or "")


def test_a_body_over_a_compression_fracture_is_not_two_bodies() -> None:
    # the top body in view over a crushed one (55 % of its height): the fracture explains the difference
    rows = _rows_for({"T12": (27.0, 27.5, 28.0), "L1": (15.0, 15.2, 15.4), "L2": (28.0, 28.5, 29.0)})
    assert "fracture" in (rows["L1"].exclusion_reason or ""), rows["L1"].exclusion_reason
    assert "two bodies" not in (rows["T12"].exclusion_reason or "")


def test_outliers_are_judged_against_the_median_of_the_other_levels() -> None:
    from dicomnode.bmd.qc import _outliers

    # a wrong ROI at the end of the range (a body cut obliquely): it goes, its right neighbour stays
    assert [lv for lv, _ in _outliers({"T11": 109.0, "T12": 104.0, "L1": 80.0, "L2": 195.0})] == ["L2"]
    # a sclerotic level in the middle
    out = _outliers({"L1": 95.0, "L2": 240.0, "L3": 100.0, "L4": 105.0})
    assert [lv for lv, _ in out] == ["L2"] and out[0][1] == pytest.approx(140.0)
    # two wrong levels, the worse first
    assert [lv for lv, _ in _outliers({"L1": 90.0, "L2": 300.0, "L3": 95.0, "L4": 200.0, "L5": 100.0})] == [
        "L2",
        "L4",
    ]
    # the ordinary spread between levels is no outlier; two levels are not judged
    assert _outliers({"T12": 110.0, "L1": 96.0, "L2": 111.0, "L3": 104.0, "L4": 107.0, "L5": 111.0}) == []
    assert _outliers({"L1": 80.0, "L2": 200.0}) == []


def test_a_level_that_reads_like_the_body_beside_it_at_the_scan_edge_is_no_outlier() -> None:
    from dicomnode.bmd.qc import _outliers

    order = ("T11", "T12", "L1", "L2")
    judged = {"T11": 106.0, "T12": 103.5, "L1": 70.6}
    # the last judged level, 33 HU below the two above it: alone, it reads as an outlier ...
    assert [lv for lv, _ in _outliers(judged)] == ["L1"]
    # ... but the body below it, measured though not judged (it ends near the scan's edge), reads the same:
    # a step between the thoracic and lumbar bodies, not a lesion or a wrong ROI at L1
    assert _outliers(judged, {"L2": 63.2}, order) == []
    # a body beside it that does not read the same shows nothing, and one two levels away is no neighbour
    assert [lv for lv, _ in _outliers(judged, {"L2": 101.0}, order)] == ["L1"]
    assert [lv for lv, _ in _outliers(judged, {"L3": 66.0}, (*order, "L3"))] == ["L1"]
    # a spike inside the judged range is judged as before
    spike = {"T11": 106.0, "T12": 40.0, "L1": 103.0, "L2": 104.0}
    assert [lv for lv, _ in _outliers(spike, {"L3": 41.0}, (*order, "L3"))] == ["T12"]


def test_a_step_at_the_end_of_the_column_is_no_outlier_but_two_sclerotic_bodies_are() -> None:
    from dicomnode.bmd.qc import _outliers

    order = ("T10", "T11", "T12", "L1", "L2", "L3", "L4")
    # LIDC on a random copy: T11-T12 read 115/100, L1-L2 70/62, all four judged. Judged one by one against the
    # others' median, two of the four go, though each pair agrees: the thoracolumbar step, read as lone levels
    lidc = {"T11": 115.0, "T12": 100.0, "L1": 70.0, "L2": 62.0}
    assert len(_outliers(lidc)) == 2
    # two bodies ending the column that read alike, lower caudally (as density falls from T10 to L1): a step
    assert _outliers(lidc, {}, order) == []
    # ... and the same at the column's top: the thoracic bodies above a lumbar range read higher
    assert _outliers({"T11": 140.0, "T12": 135.0, "L1": 100.0, "L2": 98.0, "L3": 103.0}, {}, order) == []
    # the caudal end reading higher is not the way density goes: two sclerotic bodies, both outliers
    blastic = {"T11": 100.0, "T12": 104.0, "L1": 98.0, "L2": 240.0, "L3": 250.0}
    assert sorted(lv for lv, _ in _outliers(blastic, {}, order)) == ["L2", "L3"]
    # nor the cranial end reading lower
    low_top = {"T11": 60.0, "T12": 65.0, "L1": 100.0, "L2": 104.0}
    assert sorted(lv for lv, _ in _outliers(low_top, {}, order)) == ["T11", "T12"]
    # two agreeing levels inside the judged range are two lesions, not a step
    inside = {"T12": 100.0, "L1": 240.0, "L2": 250.0, "L3": 104.0, "L4": 98.0}
    assert sorted(lv for lv, _ in _outliers(inside, {}, order)) == ["L1", "L2"]
    # a body next to it that lies nearer the others than the level itself does not share its step
    lone = {"T11": 100.0, "T12": 100.0, "L1": 68.0, "L2": 90.0}
    assert [lv for lv, _ in _outliers(lone, {}, order)] == ["L1"]
    # a run of three thoracic bodies above three lumbar ones: the step's levels leave the median, so the
    # levels beyond it are judged among themselves and the middle of the run is part of the step
    run = {"T10": 170.0, "T11": 165.0, "T12": 160.0, "L1": 100.0, "L2": 105.0, "L3": 98.0}
    assert _outliers(run, {}, order) == []
    # one body beyond, set aside but measured (cut by the field of view), shows the step as well
    assert _outliers({"T11": 113.0, "T12": 107.0, "L1": 70.0}, {"L2": 63.0}, order) == []


def _rows_hu(
    hu: dict[str, float], truncated: frozenset[str] = frozenset(), volume: float = 2000.0
) -> dict[str, VertebraResult]:
    """``build_vertebrae`` on levels whose heights are regular and whose ROIs read ``hu``; ``truncated``: cut
    by the field of view, with a ROI of ``volume`` mm3."""
    from dataclasses import replace

    base = _stats((27.0, 27.5, 28.0), (0.5, 0.5, 0.5))
    stats = {
        lv: replace(base, mean=v, median=v, volume_mm3=volume if lv in truncated else base.volume_mm3)
        for lv, v in hu.items()
    }
    return _build(tuple(hu), stats, truncated)


def test_a_body_cut_by_the_field_of_view_shows_the_step_beside_the_last_judged_level() -> None:
    hu = {"T11": 113.0, "T12": 107.0, "L1": 70.0, "L2": 63.0}
    # L2 cut by the scan's edge with a full-size ROI reading like L1: L1 is judged, not set aside
    rows = _rows_hu(hu, frozenset({"L2"}), volume=3100.0)
    assert rows["L2"].excluded and "cut by the field of view" in (rows["L2"].exclusion_reason or "")
    assert not rows["L1"].excluded, rows["L1"].exclusion_reason
    # its ROI too small to trust: L1 is judged against T11-T12 alone and read as an outlier
    rows = _rows_hu(hu, frozenset({"L2"}), volume=300.0)
    assert rows["L1"].excluded and "outlier" in (rows["L1"].exclusion_reason or "")
