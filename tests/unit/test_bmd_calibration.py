"""Internal calibration, HU -> vBMD relation, contrast phase, acquisition flags (bmd.calibration)."""

from __future__ import annotations

import pytest

from dicomnode.bmd import calibration as cal
from dicomnode.domain import ContrastPhase


def _scan(gain: float, offset: float, **override: float | None) -> dict[str, float | None]:
    """Tissue HU a scanner with this gain/offset would show for the reference tissues."""
    out: dict[str, float | None] = {t: gain * hu + offset for t, hu in cal.REFERENCE_HU.items()}
    out.update(override)
    return out


@pytest.mark.parametrize(("gain", "offset"), [(1.0, 0.0), (0.94, -15.0), (1.06, 15.0), (0.9, 30.0)])
def test_fit_inverts_a_linear_scanner_map(gain: float, offset: float) -> None:
    fit = cal.fit_tissue_map(_scan(gain, offset), ContrastPhase.NATIVE)
    assert fit.used == ("air", "fat", "muscle", "blood")
    for hu_ref in (-1000.0, 0.0, 150.0, 300.0):
        assert fit.apply(gain * hu_ref + offset) == pytest.approx(hu_ref, abs=1e-6)
    assert not fit.flags


def test_muscle_and_blood_are_not_references_after_contrast() -> None:
    # enhanced muscle and blood must not pull the map: air and fat alone define it
    fit = cal.fit_tissue_map(_scan(1.0, 0.0, muscle=60.0, blood=250.0), ContrastPhase.PORTAL_VENOUS)
    assert fit.used == ("air", "fat")
    assert fit.apply(150.0) == pytest.approx(150.0, abs=1e-6)


def test_fatty_muscle_is_reported_not_used() -> None:
    fit = cal.fit_tissue_map(_scan(1.0, 0.0, muscle=15.0), ContrastPhase.NATIVE)
    assert "muscle" not in fit.used
    assert any("muscle reads" in f for f in fit.flags)
    assert fit.apply(120.0) == pytest.approx(120.0, abs=0.5)


def test_too_few_tissues_fall_back_to_identity_with_a_flag() -> None:
    fit = cal.fit_tissue_map(
        {"air": None, "fat": -100.0, "muscle": None, "blood": None}, ContrastPhase.NATIVE
    )
    assert (fit.gain, fit.offset) == (1.0, 0.0)
    assert any("not possible" in f for f in fit.flags)


def test_implausible_fit_falls_back_to_identity() -> None:
    fit = cal.fit_tissue_map({"air": -600.0, "fat": -100.0}, ContrastPhase.NATIVE)
    assert (fit.gain, fit.offset) == (1.0, 0.0)
    assert any("implausible" in f for f in fit.flags)


def test_reference_relation_matches_its_documented_anchors() -> None:
    # 80 mg/cm3 (ACR osteoporosis cut) ~ 116 HU; 120 mg/cm3 (ACR normal cut) ~ 164 HU
    assert cal.vbmd_from_hu(116.0) == pytest.approx(80.0)
    assert cal.vbmd_from_hu(164.0) == pytest.approx(120.0)
    # a contrast offset is subtracted before conversion
    assert cal.vbmd_from_hu(164.0 + 11.0, 11.0) == pytest.approx(120.0)


@pytest.mark.parametrize(
    ("header", "aorta", "phase"),
    [
        ({}, 42.0, ContrastPhase.NATIVE),
        ({}, 170.0, ContrastPhase.PORTAL_VENOUS),
        ({}, 300.0, ContrastPhase.ARTERIAL),
        ({}, None, ContrastPhase.UNKNOWN),
        ({"ContrastBolusAgent": "NONE"}, None, ContrastPhase.NATIVE),
        ({"ContrastBolusAgent": "IOMEPROL"}, 40.0, ContrastPhase.UNKNOWN),
        (
            {
                "ContrastBolusAgent": "IOMEPROL",
                "ContrastBolusStartTime": "101500",
                "AcquisitionTime": "101530",
            },
            150.0,
            ContrastPhase.ARTERIAL,
        ),
        (
            {
                "ContrastBolusAgent": "IOMEPROL",
                "ContrastBolusStartTime": "101500",
                "AcquisitionTime": "101610",
            },
            300.0,
            ContrastPhase.PORTAL_VENOUS,
        ),
        ({"ContrastBolusAgent": "BARIUM", "ContrastBolusRoute": "ORAL"}, 45.0, ContrastPhase.NATIVE),
    ],
)
def test_phase_from_header_and_aorta(
    header: dict[str, str], aorta: float | None, phase: ContrastPhase
) -> None:
    got, notes = cal.decide_phase(header, aorta)
    assert got == phase, notes


def test_acquisition_flags() -> None:
    kvp, kernel, flags = cal.acquisition_flags({"KVP": "80", "ConvolutionKernel": "BONE"})
    assert kvp == 80.0 and kernel == "BONE"
    assert any("kVp 80" in f for f in flags) and any("kernel" in f for f in flags)
    _, _, ok = cal.acquisition_flags({"KVP": 120, "ConvolutionKernel": "STANDARD"})
    assert ok == []
    _, _, vmi = cal.acquisition_flags({"KVP": 120, "SeriesDescription": "MonoE 70keV"})
    assert any("monoenergetic" in f for f in vmi)


def test_calibration_record_composes_the_map() -> None:
    fit = cal.fit_tissue_map(_scan(0.95, 10.0), ContrastPhase.NATIVE)
    rec = cal.build_calibration(fit, 120.0, "B30f", 11.0, [], True)
    assert rec.slope_mg_cm3_per_hu is not None and rec.intercept_mg_cm3 is not None
    hu_measured = 0.95 * 175.0 + 10.0  # reference 175 HU, 11 HU of it contrast
    vb = rec.slope_mg_cm3_per_hu * hu_measured + rec.intercept_mg_cm3
    assert vb == pytest.approx(cal.vbmd_from_hu(175.0, 11.0), abs=1e-6)
    assert rec.reference_hu["air"] == pytest.approx(0.95 * -1000.0 + 10.0)
    assert cal.build_calibration(fit, None, None, 0.0, [], False).slope_mg_cm3_per_hu is None


def test_without_air_only_the_offset_is_fitted_with_a_flag() -> None:
    # a small field of view: no air around the body. Fat, muscle and blood (150 HU apart) would fit a gain
    # of ~1.14 from a 10 HU error in fat alone; the gain stays the scanner's and only the offset is corrected
    fit = cal.fit_tissue_map({"air": None, "fat": -85.0, "muscle": 38.0, "blood": 42.5}, ContrastPhase.NATIVE)
    assert fit.gain == 1.0
    assert fit.used == ("fat", "muscle", "blood")
    # weighted mean of reference - measured: (-15 / 100 + 12 / 100 - 2.5 / 64) / (2 / 100 + 1 / 64)
    assert fit.offset == pytest.approx((-0.15 + 0.12 - 2.5 / 64) / (0.02 + 1 / 64), abs=1e-9)
    assert any("offset only" in f for f in fit.flags)
    # a scanner 12 HU high throughout is put right without air
    shifted = cal.fit_tissue_map(_scan(1.0, 12.0, air=None), ContrastPhase.NATIVE)
    assert (shifted.gain, shifted.offset) == (1.0, pytest.approx(-12.0))
