"""Overlay rendering: what is drawn, where, and in which colour (pure numpy/PIL, no DICOM)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt
import pytest
from synthetic_case import SyntheticCase, make_case

from dicomnode.report import render as r


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return make_case(shape=(84, 128, 128), spacing=(2.0, 2.0, 3.0))


def _has_colour(rgb: np.ndarray, colour: tuple[int, int, int], min_pixels: int = 20) -> bool:
    hit = np.all(rgb == np.asarray(colour, dtype=np.uint8), axis=-1)
    return int(hit.sum()) >= min_pixels


def test_overview_labels_every_vertebra_with_its_state(case: SyntheticCase) -> None:
    img = r.render_overview(case.result, case.canonical, case.roi_masks)
    assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3 and img.rgb.shape[2] == 3
    assert img.rgb.shape[0] >= 600  # tall enough for legible labels
    assert img.patient_orientation == ("P", "F")
    # measured, uncertain (T11) and excluded (L3) levels each appear in their colour
    assert _has_colour(img.rgb, r.ACCENT)
    assert _has_colour(img.rgb, r.UNCERTAIN)
    assert _has_colour(img.rgb, r.EXCLUDED_C)
    # the summary line uses the category colour
    assert case.result.summary is not None and case.result.summary.category is not None
    assert _has_colour(img.rgb, r.CATEGORY_COLOURS[case.result.summary.category])


def test_axial_draws_the_roi_where_the_mask_is(case: SyntheticCase) -> None:
    v = case.result.vertebra("L1")
    assert v is not None
    img = r.render_axial(case.result, case.canonical, v, case.roi_masks["L1"])
    assert img.name == "L1" and img.patient_orientation == ("L", "P")
    # the source image of the mid slice is the one the engine's outline refers to
    assert v.outline is not None and img.source_sop_instance_uid == v.outline.sop_instance_uid
    # ROI outline pixels (solid accent colour) sit in the image area, around the centre of the field of view
    header_h = img.margin_px[0] + 64
    area = img.rgb[header_h : header_h + 640, :640]
    ys, xs = np.nonzero(np.all(area == np.asarray(r.ACCENT, dtype=np.uint8), axis=-1))
    assert ys.size > 50
    # the ROI (radius 12 mm) is centred on the vertebra; the view is 160 mm wide at 4 px/mm
    assert abs(float(xs.mean()) - 320) < 20 and abs(float(ys.mean()) - 320) < 20
    assert 2 * 12 * 4 * 0.8 < float(xs.max() - xs.min()) < 2 * 12 * 4 * 1.2


def test_excluded_level_is_grey_and_disclaimer_is_configurable(case: SyntheticCase) -> None:
    v = case.result.vertebra("L3")
    assert v is not None and v.excluded
    a = r.render_axial(
        case.result, case.canonical, v, case.roi_masks["L3"], disclaimer="NOT FOR DIAGNOSTIC USE"
    )
    b = r.render_axial(
        case.result, case.canonical, v, case.roi_masks["L3"], disclaimer="SOMETHING ELSE ENTIRELY"
    )
    assert _has_colour(a.rgb, r.EXCLUDED_C)
    assert not _has_colour(a.rgb, r.ACCENT)
    assert a.rgb.shape == b.rgb.shape
    end = a.rgb.shape[0] - a.margin_px[1]  # below it: the empty band kept for the viewer's own text
    footer = slice(end - 40, end)
    assert not np.array_equal(a.rgb[footer], b.rgb[footer])
    assert np.array_equal(a.rgb[: end - 64], b.rgb[: end - 64])


def test_overlays_keep_an_empty_band_for_the_viewer_text(case: SyntheticCase) -> None:
    """OHIF prints date, series and window values into the corners: the burned-in text starts below."""
    for img in r.render_all(case.result, case.canonical, case.roi_masks):
        top, bottom = img.margin_px
        drawn = img.rgb.shape[0] - top - bottom
        assert (top, bottom) == r.viewer_margins(drawn) and top >= 0.13 * drawn - 1 and bottom >= 48
        for band in (img.rgb[:top], img.rgb[-bottom:]):
            assert np.all(band == np.asarray(r.BG, dtype=np.uint8)), img.name
        assert not np.all(img.rgb[top : top + 40] == np.asarray(r.BG, dtype=np.uint8))


def test_without_masks_the_outline_is_drawn(case: SyntheticCase) -> None:
    v = case.result.vertebra("L2")
    assert v is not None
    img = r.render_axial(case.result, case.canonical, v, None)
    assert _has_colour(img.rgb, r.ACCENT)
    over = r.render_overview(case.result, case.canonical, None)
    assert over.rgb.shape[2] == 3


def test_render_all_one_image_per_vertebra_and_inputs_untouched(case: SyntheticCase) -> None:
    before = case.canonical.data.copy()
    images = r.render_all(case.result, case.canonical, case.roi_masks)
    assert [i.name for i in images] == ["overview", *(v.level for v in case.result.vertebrae)]
    assert np.array_equal(before, case.canonical.data)
    only = r.render_all(case.result, case.canonical, case.roi_masks, levels=("L1", "L2"))
    assert [i.name for i in only] == ["overview", "L1", "L2"]


def test_missing_numbers_render_as_na(case: SyntheticCase) -> None:
    v = case.result.vertebra("L4")
    assert v is not None
    blank = dataclasses.replace(v, vbmd_mg_cm3=None, trabecular_hu_sd=float("nan"), height_ratio=None)
    img = r.render_axial(case.result, case.canonical, blank, case.roi_masks["L4"])
    assert img.rgb.size > 0
    assert r._fmt(None) == "n/a" and r._fmt(float("nan")) == "n/a" and r._fmt(1.26) == "1.3"


def test_wrap_text_keeps_every_word_within_the_width() -> None:
    draw = r._measure_draw()
    font = r._font(r.SIZE_SMALL)
    flag = (
        "suspected compression fracture (height ratio 0.72, Genant grade 2): excluded; "
        "outlier against neighbours (lesion, sclerosis or mislabelled structure?) "
        "averyveryverylongtokenwithoutanyspacesthatcannotfitononelineatallwhatsoever"
    )
    for width in (120, 240, 360):
        lines = r.wrap_text(draw, flag, font, width)
        assert len(lines) > 1
        assert all(r._text_w(draw, ln, font) <= width for ln in lines)
        # nothing dropped: the characters come back in order (only the break points differ)
        assert "".join(lines).replace(" ", "") == flag.replace(" ", "")
    assert r.wrap_text(draw, "short", font, 360) == ["short"]


@pytest.mark.parametrize(
    ("ratio", "text"), [(0.7964, "0.796"), (0.7996, "0.799"), (0.8, "0.800"), (0.29, "0.290"), (None, "n/a")]
)
def test_height_ratio_reads_true_against_thresholds(ratio: float | None, text: str) -> None:
    assert r.fmt_ratio(ratio) == text
    if ratio is not None:
        for threshold in (0.6, 0.75, 0.8):  # a value below a threshold never prints as >= it
            assert (float(text) < threshold) == (ratio < threshold)


def _long_flags(case: SyntheticCase, level: str, n: int) -> SyntheticCase:
    flags = tuple(
        f"flag {k}: suspected compression fracture (height {30 + k} mm < 80% of neighbours' 57 mm)"
        for k in range(n)
    )
    verts = tuple(dataclasses.replace(v, qc=flags) if v.level == level else v for v in case.result.vertebrae)
    return dataclasses.replace(case, result=dataclasses.replace(case.result, vertebrae=verts))


def test_long_qc_flags_grow_the_images_instead_of_being_cut(case: SyntheticCase) -> None:
    few, many = _long_flags(case, "L1", 1), _long_flags(case, "L1", 14)
    v_few, v_many = few.result.vertebra("L1"), many.result.vertebra("L1")
    assert v_few is not None and v_many is not None
    a = r.render_axial(few.result, few.canonical, v_few, few.roi_masks["L1"])
    b = r.render_axial(many.result, many.canonical, v_many, many.roi_masks["L1"])
    assert b.rgb.shape[0] > a.rgb.shape[0]  # the panel needed more room than the image: the canvas grew
    assert b.rgb.shape[1] == a.rgb.shape[1]
    o_few = r.render_overview(few.result, few.canonical, few.roi_masks)
    o_many = r.render_overview(many.result, many.canonical, many.roi_masks)
    assert o_many.rgb.shape[0] > o_few.rgb.shape[0]
    # the disclaimer (its colour) is still in the footer of the grown images
    footer = b.rgb[-40 - b.margin_px[1] : -b.margin_px[1]]
    assert np.all(footer == np.asarray(r.WARN, dtype=np.uint8), axis=-1).sum() > 20


def test_flags_common_to_every_level_are_said_once() -> None:
    v = make_case(shape=(84, 64, 64), spacing=(4.0, 4.0, 3.0)).result.vertebrae
    tagged = [dataclasses.replace(x, qc=("level naming uncertain", *x.qc)) for x in v]
    assert r._common_flags(tagged) == ("level naming uncertain",)
    details = r._label_details(tagged[0], r._common_flags(tagged))
    assert all("level naming uncertain" not in text for text, _ in details)


class _CountingMasks(Mapping[str, npt.NDArray[np.bool_]]):
    """A mapping that counts how often each mask is taken (the engine's may compute it on access)."""

    def __init__(self, masks: Mapping[str, npt.NDArray[np.bool_]]) -> None:
        self._masks = dict(masks)
        self.taken: dict[str, int] = {}

    def __getitem__(self, key: str) -> npt.NDArray[np.bool_]:
        self.taken[key] = self.taken.get(key, 0) + 1
        return self._masks[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)


def test_render_all_takes_each_mask_once_and_matches_the_single_renders(case: SyntheticCase) -> None:
    masks = _CountingMasks(case.roi_masks)
    images = r.render_all(case.result, case.canonical, masks)
    assert masks.taken and all(n == 1 for n in masks.taken.values())
    v = case.result.vertebra("L2")
    assert v is not None
    single = r.render_axial(case.result, case.canonical, v, case.roi_masks["L2"])
    assert np.array_equal(next(i for i in images if i.name == "L2").rgb, single.rgb)
    overview = r.render_overview(case.result, case.canonical, case.roi_masks)
    assert np.array_equal(images[0].rgb, overview.rgb)


def test_a_vertebra_with_no_roi_is_listed_under_the_overview(case: SyntheticCase) -> None:
    # a body found and named but with nothing left to measure (an empty ROI) has no place on the image
    v = case.result.vertebra("L3")
    assert v is not None
    empty = dataclasses.replace(
        v,
        excluded=True,
        exclusion_reason="trabecular ROI too small (0 mm3 < 1000 mm3)",
        roi_centroid_lps_mm=(float("nan"),) * 3,
    )
    result = dataclasses.replace(
        case.result, vertebrae=tuple(empty if x.level == "L3" else x for x in case.result.vertebrae)
    )
    assert r.not_shown_lines(case.result) == []
    assert r.not_shown_lines(result) == [
        "L3 excluded, not shown: trabecular ROI too small (0 mm3 < 1000 mm3)"
    ]
    full = r.render_overview(case.result, case.canonical, case.roi_masks)
    listed = r.render_overview(result, case.canonical, case.roi_masks)
    assert listed.rgb.shape[0] > full.rgb.shape[0] - 200  # drawn; one label fewer, one footer line more


def test_projection_inside_a_known_box_equals_the_whole_projection() -> None:
    from dicomnode.report.render import _mask_box, _projection

    class Boxed(dict[str, np.ndarray]):
        def box(self, level: str) -> tuple[slice, slice, slice] | None:
            return (slice(2, 9), slice(3, 12), slice(1, 7)) if level == "L1" else None

    mask = np.zeros((12, 15, 10), dtype=bool)
    mask[2:9, 3:12, 1:7] = np.random.default_rng(9).random((7, 9, 6)) < 0.3
    masks = Boxed(L1=mask, L2=mask)
    assert _mask_box(masks, "L2") is None and _mask_box({"L1": mask}, "L1") is None
    box = _mask_box(masks, "L1")
    assert box is not None
    assert np.array_equal(_projection(mask, box), _projection(mask))
