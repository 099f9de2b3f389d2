"""Every code the SR uses, each with its source.

Standard codes come from pydicom's code dictionary (DICOM PS3.16 content of ``pydicom.sr.codedict``), which
is itself generated from the DICOM standard, or from the sources named beside them. There is no standard
concept for *volumetric trabecular bone mineral density by CT* nor for the ACR QCT category question
(``shared/reference/clinical.md`` section 6.1, "Gaps"), so those use the private coding scheme
:data:`PRIVATE_SCHEME` ("99DCMNODE"), documented here and in ``docs/conformance.md``.

Never a DXA T-score code for a CT value: QCT-derived values are not DXA T-scores (ISCD 2007 positions).
"""

from __future__ import annotations

import re

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Coding Scheme Designator of our private codes ("99" prefix = private, PS3.16 section 8).
PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_SCHEME_VERSION = "1"


def _private(value: str, meaning: str) -> Code:
    return Code(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# --- standard codes ---------------------------------------------------------------------------------------
# Units (UCUM; pydicom CID 83 / 301 / 7181)
UNIT_HU = codes.UCUM.HounsfieldUnit  # [hnsf'U]
UNIT_MG_CM3 = codes.UCUM.MilligramsPerCubicCentimeter  # mg/cm3
UNIT_MM3 = codes.UCUM.CubicMillimeter  # mm3
UNIT_KV = codes.UCUM.Kilovolt  # kV
UNIT_NONE = codes.UCUM.NoUnits  # 1
#: Slope of the HU -> mg/cm3 conversion: a valid UCUM expression, no named unit exists.
UNIT_MG_CM3_PER_HU = Code("mg/cm3/[hnsf'U]", "UCUM", "mg/cm^3 per Hounsfield unit")

# Measurement names and derivations (DCM / SCT; pydicom CID 218, 7464, 7469)
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient  # 112031 DCM, trabecular HU
VOLUME = codes.SCT.Volume  # 118565006 SCT, ROI volume
KVP = codes.DCM.KVP  # 113733 DCM
CONTRAST_PHASE = codes.DCM.ContrastPhase  # 109058 DCM
MEAN = codes.SCT.Mean  # 373098007 SCT
MEDIAN = codes.SCT.Median  # 373099004 SCT
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # 386136009 SCT

# Report structure
PROCEDURE_REPORTED = codes.LN.CTUnspecifiedBodyRegion  # 25045-6 LN (highdicom's TID 1500 example)
FINDING_CATEGORY = codes.SCT.AnatomicalStructure  # 91723000 SCT
#: Finding type of a per-vertebra group: the trabecular bone of the vertebral body (SCT 3572006, from the
#: TotalSegmentator SNOMED csv, clinical.md section 6.1).
VERTEBRAL_BODY = Code("3572006", "SCT", "Vertebral body")
LUMBAR_SPINE = Code("122496007", "SCT", "Lumbar spine")  # pydicom
#: TID 1500 containers for exam-level results (rows "Derived Imaging Measurements" and "Qualitative
#: Evaluations"): never measurement groups of 126010, which viewers read as annotations with a region.
DERIVED_IMAGING_MEASUREMENTS = codes.DCM.DerivedImagingMeasurements  # 126011 DCM
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 (PS3.16)
ALGORITHM_NAME = codes.DCM.AlgorithmName  # 111001 DCM (TID 4019)
ALGORITHM_VERSION = codes.DCM.AlgorithmVersion  # 111003 DCM (TID 4019)
COMMENT = codes.DCM.Comment  # 121106 DCM
YES = codes.SCT.Yes  # 373066001 SCT
NO = codes.SCT.No  # 373067005 SCT
UNKNOWN = codes.SCT.Unknown  # 261665006 SCT

#: Vertebra finding sites (SNOMED CT; pydicom + TotalSegmentator csv, clinical.md section 6.1).
VERTEBRA_SITES: dict[str, Code] = {
    "T11": codes.SCT.T11Vertebra,  # 12989004
    "T12": codes.SCT.T12Vertebra,  # 23215003
    "L1": codes.SCT.L1Vertebra,  # 66794005
    "L2": codes.SCT.L2Vertebra,  # 14293000
    "L3": codes.SCT.L3Vertebra,  # 36470004
    "L4": codes.SCT.L4Vertebra,  # 11994002
    "L5": codes.SCT.L5Vertebra,  # 49668003
}

#: Bone density category values (SNOMED CT; pydicom CID 222 for Normal, HL7 value sets for the others).
CATEGORY_VALUES: dict[str, Code] = {
    "normal": codes.SCT.Normal,  # 17621005
    "osteopenia": Code("312894000", "SCT", "Osteopenia"),
    "osteoporosis": Code("64859006", "SCT", "Osteoporosis"),
}

#: Internal-calibration reference tissues (finding sites of their attenuation measurements).
REFERENCE_TISSUE_SITES: dict[str, Code] = {
    "air": codes.SCT.Air,  # 15158005 SCT
    "fat": Code("67769002", "SCT", "Subcutaneous fatty tissue"),  # TotalSegmentator csv
    "muscle": codes.SCT.SkeletalMuscle,  # 127954009 SCT
    "blood": codes.SCT.Aorta,  # 15825003 SCT (blood pool measured in the aorta)
}

# --- private codes (99DCMNODE), all listed in docs/conformance.md ------------------------------------------
VBMD = _private("VBMD-TRAB", "Volumetric bone mineral density, trabecular")
BMD_CATEGORY = _private("BMD-CATEGORY", "Bone density category (ACR QCT, vBMD)")
LEVEL_UNCERTAIN = _private("LEVEL-UNCERTAIN", "Vertebral level labelling uncertain")
EXCLUDED = _private("EXCLUDED", "Excluded from the vBMD summary")
EXCLUSION_REASON = _private("EXCL-REASON", "Reason for exclusion")
FRACTURE_SUSPECTED = _private("FX-SUSPECTED", "Vertebral fracture suspected")
QC_FLAG = _private("QC-FLAG", "Quality control flag")
CALIBRATION_SLOPE = _private("CAL-SLOPE", "HU to vBMD calibration slope")
CALIBRATION_INTERCEPT = _private("CAL-INTERCEPT", "HU to vBMD calibration intercept")
CONTRAST_CORRECTION = _private("CONTRAST-CORR", "Contrast correction subtracted from bone HU")

CONTRAST_PHASE_VALUES: dict[str, Code] = {
    "native": _private("PHASE-NATIVE", "Native (non-contrast)"),
    "arterial": _private("PHASE-ART", "Arterial phase"),
    "portal_venous": _private("PHASE-PV", "Portal venous phase"),
    "unknown": UNKNOWN,
}

#: Exclusion reasons, matched by keyword on the engine's free-text reason (first match wins).
EXCLUSION_REASON_VALUES: tuple[tuple[str, Code], ...] = (
    ("fracture", _private("EXCL-FRACTURE", "Fracture suspected")),
    ("implant", _private("EXCL-IMPLANT", "Implant, metal or cement at the level")),
    ("metal", _private("EXCL-IMPLANT", "Implant, metal or cement at the level")),
    ("cement", _private("EXCL-IMPLANT", "Implant, metal or cement at the level")),
    ("field of view", _private("EXCL-FOV", "Vertebra not fully in the field of view")),
    ("fov", _private("EXCL-FOV", "Vertebra not fully in the field of view")),
    ("border", _private("EXCL-FOV", "Vertebra not fully in the field of view")),
    ("small", _private("EXCL-ROI-SMALL", "Trabecular ROI too small")),
    ("outlier", _private("EXCL-OUTLIER", "Outlier against neighbouring levels")),
    ("sclero", _private("EXCL-SCLEROSIS", "Sclerotic or focal lesion")),
    ("lesion", _private("EXCL-SCLEROSIS", "Sclerotic or focal lesion")),
)
EXCLUSION_REASON_OTHER = _private("EXCL-OTHER", "Other reason (see result.json)")


def exclusion_reason_code(reason: str | None) -> Code:
    """Map the engine's free-text exclusion reason to a coded reason (the text stays in result.json)."""
    text = (reason or "").lower()
    for keyword, code in EXCLUSION_REASON_VALUES:
        if keyword in text:
            return code
    return EXCLUSION_REASON_OTHER


def qc_flag_code(flag: str) -> Code:
    """Code one QC flag of the engine: value ``QC-<FLAG>`` (upper-case slug), meaning = the flag itself.

    The flag vocabulary belongs to the measurement engine; the rule that turns a flag into a code is fixed
    (documented in docs/conformance.md) so a reader can always recover the flag.
    """
    slug = re.sub(r"[^A-Z0-9]+", "-", flag.upper()).strip("-")[:12].strip("-") or "UNNAMED"
    return _private(f"QC-{slug}", flag[:64])


def calibration_method_code(method: str) -> Code:
    """Code the HU -> vBMD calibration method (``CAL-<METHOD>``), meaning = the method name."""
    slug = re.sub(r"[^A-Z0-9]+", "-", method.upper()).strip("-")[:12].strip("-") or "NONE"
    return _private(f"CAL-{slug}", method[:64])


def level_of_site(value: str, scheme: str) -> str | None:
    """The vertebral level whose finding-site code this is, or None."""
    for level, code in VERTEBRA_SITES.items():
        if code.value == value and code.scheme_designator == scheme:
            return level
    return None


def tissue_of_site(value: str, scheme: str) -> str | None:
    """The calibration reference tissue whose finding-site code this is, or None."""
    for tissue, code in REFERENCE_TISSUE_SITES.items():
        if code.value == value and code.scheme_designator == scheme:
            return tissue
    return None


#: Every private code, for the conformance statement and its test.
def private_codes() -> list[Code]:
    """All fixed private codes (the patterned ``QC-*`` / ``CAL-*`` values are documented separately)."""
    fixed = [
        VBMD,
        BMD_CATEGORY,
        LEVEL_UNCERTAIN,
        EXCLUDED,
        EXCLUSION_REASON,
        FRACTURE_SUSPECTED,
        QC_FLAG,
        CALIBRATION_SLOPE,
        CALIBRATION_INTERCEPT,
        CONTRAST_CORRECTION,
        *(c for c in CONTRAST_PHASE_VALUES.values() if c.scheme_designator == PRIVATE_SCHEME),
        *(c for _, c in EXCLUSION_REASON_VALUES),
        EXCLUSION_REASON_OTHER,
    ]
    seen: dict[str, Code] = {}
    for c in fixed:
        seen.setdefault(c.value, c)
    return list(seen.values())
