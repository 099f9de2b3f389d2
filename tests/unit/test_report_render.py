"""Overlay rendering: what is drawn, where, and in which colour (pure numpy/PIL, no DICOM)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dicomnode.report import render as r
from dicomnode.report.synthetic import SyntheticCase, make_case


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
    header_h = 64
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
    footer = slice(a.rgb.shape[0] - 40, a.rgb.shape[0])
    assert not np.array_equal(a.rgb[footer], b.rgb[footer])
    assert np.array_equal(a.rgb[: a.rgb.shape[0] - 64], b.rgb[: b.rgb.shape[0] - 64])


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
