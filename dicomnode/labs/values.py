"""The analytes, their LOINC codes and units, and one lab value.

LOINC codes (serum or plasma, mass or activity per volume; Regenstrief LOINC, loinc.org):
calcium 17861-6, phosphate 2777-1, alkaline phosphatase 6768-6, 25-hydroxyvitamin D (D2+D3) 62292-8 (also
25-hydroxyvitamin D3 1989-3), intact parathyrin 2731-8, creatinine 2160-0.

Unit conversions into the canonical unit of each analyte, from the molar masses: calcium 40.08 g/mol
(1 mmol/L = 4.008 mg/dL), phosphorus 30.97 g/mol (1 mmol/L = 3.097 mg/dL), 25-hydroxyvitamin D3
400.6 g/mol (1 ng/mL = 2.496 nmol/L), intact PTH (1-84) 9425 g/mol (1 pmol/L = 9.425 pg/mL), creatinine
113.12 g/mol (1 mg/dL = 88.42 umol/L).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

from dicomnode.errors import InputError


class LabInputError(InputError):
    """A lab value that cannot be accepted (one line naming the field)."""


@dataclass(frozen=True)
class Analyte:
    key: str
    name: str
    loinc: tuple[str, ...]
    unit: str
    #: accepted unit (lower case, as written in UCUM or common text) -> factor into ``unit``
    units: dict[str, float]
    #: values outside are refused as implausible (in ``unit``)
    plausible: tuple[float, float]


ANALYTES: dict[str, Analyte] = {
    a.key: a
    for a in (
        Analyte("calcium", "Calcium", ("17861-6",), "mg/dL", {"mg/dl": 1.0, "mmol/l": 4.008}, (2.0, 25.0)),
        Analyte("phosphate", "Phosphate", ("2777-1",), "mg/dL", {"mg/dl": 1.0, "mmol/l": 3.097}, (0.5, 20.0)),
        Analyte("alp", "Alkaline phosphatase", ("6768-6",), "U/L", {"u/l": 1.0, "iu/l": 1.0}, (1.0, 5000.0)),
        Analyte(
            "vitamin_d",
            "25-hydroxyvitamin D",
            ("62292-8", "1989-3"),
            "ng/mL",
            {"ng/ml": 1.0, "ug/l": 1.0, "nmol/l": 1 / 2.496},
            (1.0, 300.0),
        ),
        Analyte(
            "pth",
            "Parathyrin, intact",
            ("2731-8",),
            "pg/mL",
            {"pg/ml": 1.0, "ng/l": 1.0, "pmol/l": 9.425},
            (0.5, 5000.0),
        ),
        Analyte(
            "creatinine",
            "Creatinine",
            ("2160-0",),
            "mg/dL",
            {"mg/dl": 1.0, "umol/l": 1 / 88.42},
            (0.05, 30.0),
        ),
    )
}
_BY_LOINC = {code: a for a in ANALYTES.values() for code in a.loinc}


def analyte_for_loinc(code: str) -> Analyte | None:
    """The analyte of a LOINC code (None for codes we do not use)."""
    return _BY_LOINC.get(code.strip())


@dataclass(frozen=True)
class LabValue:
    """One lab value of one patient on one day, in the analyte's canonical unit."""

    patient_id: str
    analyte: str
    loinc: str
    value: float
    unit: str
    effective: date
    source: str = "csv"
    #: Identifier of the source record (FHIR Observation id), when it has one.
    source_id: str | None = None


def make_value(
    patient_id: str,
    loinc: str,
    value: float,
    unit: str,
    effective: date,
    *,
    source: str = "csv",
    source_id: str | None = None,
) -> LabValue:
    """A checked :class:`LabValue`, converted into the analyte's canonical unit.

    Raises
    ------
    LabInputError
        Empty patient, unknown LOINC code, unit not accepted, value not finite or implausible.
    """
    if not patient_id.strip():
        raise LabInputError("lab value without a patient identifier")
    analyte = analyte_for_loinc(loinc)
    if analyte is None:
        known = ", ".join(f"{a.loinc[0]} ({a.key})" for a in ANALYTES.values())
        raise LabInputError(f"LOINC code {loinc!r} is not one of the analytes used: {known}")
    factor = analyte.units.get(unit.strip().lower().replace("µ", "u").replace("μ", "u"))
    if factor is None:
        raise LabInputError(f"{analyte.name}: unit {unit!r} not accepted (use {', '.join(analyte.units)})")
    if not math.isfinite(value):
        raise LabInputError(f"{analyte.name}: value is not a number")
    canonical = float(value) * factor
    lo, hi = analyte.plausible
    if not lo <= canonical <= hi:
        raise LabInputError(f"{analyte.name}: {canonical:g} {analyte.unit} is outside {lo:g}-{hi:g}")
    return LabValue(
        patient_id.strip(), analyte.key, loinc.strip(), canonical, analyte.unit, effective, source, source_id
    )
