"""Codes of the SR: standard ones match the reference table, private ones are valid and documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.report import codes as c

REPO = Path(__file__).resolve().parents[2]


def test_vertebra_sites_are_the_snomed_codes_of_the_reference() -> None:
    # clinical.md section 6.1
    expected = {
        "T11": "12989004",
        "T12": "23215003",
        "L1": "66794005",
        "L2": "14293000",
        "L3": "36470004",
        "L4": "11994002",
        "L5": "49668003",
    }
    assert {lv: code.value for lv, code in c.VERTEBRA_SITES.items()} == expected
    assert all(code.scheme_designator == "SCT" for code in c.VERTEBRA_SITES.values())
    for level, code in c.VERTEBRA_SITES.items():
        assert c.level_of_site(code.value, "SCT") == level
    assert c.level_of_site("66794005", "DCM") is None


def test_category_and_units() -> None:
    assert {k: v.value for k, v in c.CATEGORY_VALUES.items()} == {
        "normal": "17621005",
        "osteopenia": "312894000",
        "osteoporosis": "64859006",
    }
    assert c.UNIT_HU.value == "[hnsf'U]"
    assert c.UNIT_MG_CM3.value == "mg/cm3"
    assert (c.ATTENUATION_COEFFICIENT.value, c.ATTENUATION_COEFFICIENT.scheme_designator) == ("112031", "DCM")


def test_private_codes_fit_short_string_and_are_documented() -> None:
    doc = (REPO / "docs" / "conformance.md").read_text(encoding="utf-8")
    private = c.private_codes()
    assert len(private) >= 10
    for code in private:
        assert code.scheme_designator == c.PRIVATE_SCHEME
        assert 0 < len(code.value) <= 16, code.value  # CodeValue is SH
        assert len(code.meaning) <= 64, code.meaning  # CodeMeaning is LO
        assert f"`{code.value}`" in doc, f"{code.value} missing from docs/conformance.md"
    assert c.PRIVATE_SCHEME.startswith("99")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("fracture suspected", "QC-FRACTURE-SUS"),
        ("level naming uncertain", "QC-LEVEL-NAMING"),
        ("", "QC-UNNAMED"),
    ],
)
def test_patterned_codes_are_deterministic_and_short(flag: str, value: str) -> None:
    code = c.qc_flag_code(flag)
    assert code.value == value
    assert len(code.value) <= 16
    assert code == c.qc_flag_code(flag)
    cal = c.calibration_method_code("internal-air-fat-muscle")
    assert cal.value == "CAL-INTERNAL-AIR" and cal.meaning == "internal-air-fat-muscle"


def test_exclusion_reasons_map_by_keyword() -> None:
    assert c.exclusion_reason_code("fracture suspected (height ratio 0.7)").value == "EXCL-FRACTURE"
    assert c.exclusion_reason_code("vertebral body cut by the field of view").value == "EXCL-FOV"
    assert c.exclusion_reason_code("metal implant").value == "EXCL-IMPLANT"
    assert c.exclusion_reason_code("something new").value == "EXCL-OTHER"
    assert c.exclusion_reason_code(None).value == "EXCL-OTHER"


def test_no_dxa_code_is_defined() -> None:
    values = {code.value for code in c.private_codes()} | {
        v.value for v in (*c.VERTEBRA_SITES.values(), *c.CATEGORY_VALUES.values())
    }
    assert not values & {"38267-1", "104938-6", "85394-5", "24966-4"}
