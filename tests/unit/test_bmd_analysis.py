"""``analyze_volume`` end to end on small synthetic volumes (the project's phantom and plain shapes)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import dicomnode
from dicomnode.bmd import BmdOptions, SegmentationBackend, analyze_volume, get_backend
from dicomnode.domain import REPORTED_LEVELS, AnalysisStatus, ContrastPhase
from dicomnode.errors import ConfigError, NotQualifyingError
from dicomnode.imaging.volume import Volume
from dicomnode.phantom import Phantom, PhantomSpec, make_phantom

# T11..S1 at 2.4 mm pixels, 3 mm slices: both anchors (ribs, sacrum) in view, small enough for a unit test
SPEC = PhantomSpec(
    matrix=160, spacing_mm=2.4, thickness_mm=3.0, z_levels=("T11", "S1"), noise_sd=10.0, seed=4
)
_CACHE: dict[str, Phantom] = {}


def _phantom(spec: PhantomSpec) -> Phantom:
    key = repr(spec)
    if key not in _CACHE:
        _CACHE[key] = make_phantom(spec)
    return _CACHE[key]


def _true_level(ph: Phantom, lps: tuple[float, float, float]) -> str | None:
    i, j, k = np.round(ph.volume.lps_to_index(lps)).astype(int)
    lab = int(ph.body_labels[k, j, i])
    return ph.truth.label_names.get(lab) if lab else None


def test_levels_named_and_measured_on_a_phantom() -> None:
    ph = _phantom(SPEC)
    out = analyze_volume(ph.volume)
    res = out.result
    assert res.status == AnalysisStatus.OK
    assert res.algorithm_name == dicomnode.ALGORITHM_NAME
    assert res.algorithm_version.startswith(dicomnode.__version__)
    levels = [v.level for v in res.vertebrae]
    assert levels == [lv for lv in REPORTED_LEVELS if lv in levels]  # cranial to caudal
    assert {"T12", "L1", "L2", "L3", "L4", "L5"} <= set(levels)
    for v in res.vertebrae:
        assert not v.level_uncertain
        if v.excluded:
            continue
        assert _true_level(ph, v.roi_centroid_lps_mm) == v.level
        assert v.vbmd_mg_cm3 is not None
        assert abs(v.vbmd_mg_cm3 - ph.truth.level(v.level).vbmd_mg_cm3) < 5.0
        assert v.roi_volume_mm3 >= 1000.0
    s = res.summary
    assert s is not None and s.contrast_phase == ContrastPhase.NATIVE
    assert s.levels_used and s.vbmd_l1_l2_mg_cm3 is not None and s.category is not None
    assert s.calibration.method.startswith("internal-air-fat")
    # masks: one per level on the canonical grid, ROI inside the body
    assert out.canonical.shape == ph.volume.canonical().shape
    for lv in out.roi_masks:
        roi, body = out.roi_masks[lv], out.body_masks[lv]
        assert roi.shape == out.canonical.shape and body.dtype == bool
        assert not np.any(roi & ~body)
    doc = res.to_json_dict()
    assert doc["status"] == "ok" and doc["summary"]["contrast_phase"] == "native"


def test_orientation_does_not_change_the_answer() -> None:
    a = analyze_volume(_phantom(SPEC).volume).result
    b = analyze_volume(_phantom(replace(SPEC, orientation="FFS", flip_cols=True)).volume).result
    va = {v.level: v for v in a.vertebrae if not v.excluded}
    vb = {v.level: v for v in b.vertebrae if not v.excluded}
    common = set(va) & set(vb)
    assert {"L1", "L2"} <= common
    for lv in common:
        assert np.allclose(va[lv].roi_centroid_lps_mm, vb[lv].roi_centroid_lps_mm, atol=3.0)
        assert va[lv].vbmd_mg_cm3 == pytest.approx(vb[lv].vbmd_mg_cm3, abs=3.0)


def test_contrast_phase_corrected_or_abstained() -> None:
    ph = _phantom(replace(SPEC, contrast="portal_venous", seed=5))
    res = analyze_volume(ph.volume).result
    assert res.summary is not None
    assert res.summary.contrast_phase == ContrastPhase.PORTAL_VENOUS
    assert res.summary.calibration.contrast_correction_hu == 11.0
    l2 = res.vertebra("L2")
    assert l2 is not None and l2.vbmd_mg_cm3 is not None
    assert abs(l2.vbmd_mg_cm3 - ph.truth.level("L2").vbmd_mg_cm3) < 5.0
    res2 = analyze_volume(ph.volume, BmdOptions(contrast_correction="abstain")).result
    assert res2.summary is not None and res2.summary.category is None
    assert all(v.vbmd_mg_cm3 is None for v in res2.vertebrae)
    assert any("abstain" in n for n in res2.summary.notes)


def test_no_spine_is_not_qualifying() -> None:
    # a water-filled elliptic cylinder in air: a trunk without a spine
    _, j, i = np.meshgrid(np.arange(60), np.arange(128), np.arange(128), indexing="ij")
    data = np.where(((i - 64) / 55.0) ** 2 + ((j - 64) / 40.0) ** 2 <= 1.0, 40.0, -1000.0).astype(np.float32)
    vol = Volume(data=data, affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(NotQualifyingError, match="spine"):
        analyze_volume(vol)


def test_too_short_or_too_coarse_is_not_qualifying() -> None:
    vol = Volume(data=np.zeros((5, 64, 64), dtype=np.float32), affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    with pytest.raises(NotQualifyingError, match="coverage"):
        analyze_volume(vol)


def test_backends() -> None:
    b = get_backend("classical")
    assert isinstance(b, SegmentationBackend) and b.name == "classical"
    with pytest.raises(ConfigError, match="unknown segmentation backend"):
        get_backend("nope")


def test_metal_and_outlier_levels_are_excluded_with_reasons() -> None:
    ph = _phantom(SPEC)
    data = ph.volume.data.copy()
    # cement in L3: a 7 mm block of 3000 HU at the body centre
    i, j, k = np.round(ph.volume.lps_to_index(ph.truth.level("L3").centroid_lps_mm)).astype(int)
    sx, sy, sz = ph.volume.spacing
    ri, rj, rk = (max(1, round(3.5 / s)) for s in (sx, sy, sz))
    data[k - rk : k + rk + 1, j - rj : j + rj + 1, i - ri : i + ri + 1] = 3000.0
    # a sclerotic L1: its trabecular core 150 HU denser than the neighbours
    l1 = next(lv.label for lv in ph.truth.levels if lv.level == "L1")
    data[ph.core_labels == l1] += 150.0
    res = analyze_volume(replace(ph.volume, data=data)).result
    l3, l1v = res.vertebra("L3"), res.vertebra("L1")
    assert l3 is not None and l3.excluded and "metal" in (l3.exclusion_reason or "")
    assert l1v is not None and l1v.excluded and "outlier" in (l1v.exclusion_reason or "")
    assert res.summary is not None and res.summary.levels_used != ("L1", "L2")


def test_thoracic_names_given_with_doubt_are_not_called_a_spine_without_lumbar_vertebrae(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A chest CT whose names are a guess (the rib count disagreed, one rib seen on one side only) may call
    # its L1 "T12": "lumbar spine not in view" would then be a false statement. The refusal says the naming
    # is uncertain instead; with confident thoracic names it still says the lumbar spine is not in view.
    from dicomnode.bmd import analysis

    original = analysis.ClassicalBackend.segment
    thoracic = tuple(f"T{k}" for k in range(1, 13))

    def shifted(uncertain: bool):  # type: ignore[no-untyped-def]
        def segment(self, canonical, context=None):  # type: ignore[no-untyped-def]
            seg = original(self, canonical, context=context)
            names = thoracic[len(thoracic) - len(seg.levels) :]
            return replace(seg, levels=names, level_uncertain=uncertain)

        return segment

    vol = _phantom(SPEC).volume
    monkeypatch.setattr(analysis.ClassicalBackend, "segment", shifted(True))
    with pytest.raises(NotQualifyingError, match="naming is uncertain") as doubt:
        analyze_volume(vol)
    assert "lumbar spine not in view" not in str(doubt.value)
    monkeypatch.setattr(analysis.ClassicalBackend, "segment", shifted(False))
    with pytest.raises(NotQualifyingError, match="lumbar spine not in view"):
        analyze_volume(vol)


def test_label_masks_with_boxes_equal_the_plain_comparison() -> None:
    from scipy import ndimage as ndi

    from dicomnode.bmd import LabelMasks
    from dicomnode.bmd.analysis import _find_objects

    rng = np.random.default_rng(8)
    labels = np.zeros((30, 40, 50), dtype=np.uint8)
    labels[3:9, 5:15, 10:20] = 1
    labels[12:20, 8:18, 12:25] = rng.integers(0, 2, (8, 10, 13)) * 2
    levels = {"L1": 1, "L2": 2, "L3": 3}
    objs = ndi.find_objects(labels)
    assert _find_objects(labels, (slice(2, 25), slice(4, 30), slice(9, 40))) == objs
    assert _find_objects(labels, None) == objs
    boxes = {"L1": objs[0], "L2": objs[1]}
    masks = LabelMasks(labels, levels, boxes)
    plain = LabelMasks(labels, levels)
    for lv in levels:
        assert np.array_equal(masks[lv], labels == levels[lv])
        assert np.array_equal(plain[lv], labels == levels[lv])
    assert masks.box("L1") == objs[0] and masks.box("L3") is None and plain.box("L1") is None
