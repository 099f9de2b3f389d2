"""The phantom's reference scanner model: tissue HU at 120 kVp, bone mineral -> HU, contrast, scanner map.

This module is the *phantom's* ground truth physics, nothing more. The measurement code (``dicomnode.bmd``)
must never import it: it defines its own calibration constants, and the phantom exists to test whether that
calibration inverts an unknown scanner honestly.

HU model (all values at 120 kVp, native phase, before the per-scan scanner map)
--------------------------------------------------------------------------------
* Reference tissues (physics/textbook values): air -1000, water 0, fat -100, skeletal muscle 50, blood 40
  (``REFERENCE_HU``). Liver 55, kidney 30, disc 90, CSF 10, lung -850 are plausible soft-tissue values used
  only to make the images look like an abdomen.
* Trabecular bone: ``HU_ref = TRAB_HU_INTERCEPT + TRAB_HU_PER_MG * vBMD`` with vBMD in mg/cm3 CHA-equivalent.
  The constants (20 HU, 1.2 HU per mg/cm3) are a modelling choice made to be consistent with the anchors in
  ``shared/reference/clinical.md``: the young-adult L1 reference of 236 HU (Hendrickson 2018, section 1.3)
  maps to 180 mg/cm3 (a typical young-adult QCT value); the ACR osteoporosis cut of 80 mg/cm3 (section 2.1)
  maps to 116 HU, next to Pickhardt's 110 HU "specific for osteoporosis" cut (section 1.1); 120 mg/cm3 maps
  to 164 HU, next to the 160 HU "sensitive" cut. It is a reference scanner, not a claim about any real one.
* Cortical bone of vertebral bodies (shell and end plates) 800 HU (within the 700-1000 HU range of thin
  cortex at clinical resolution); ribs and pelvis are cortical shell (720 HU) + marrow (220 HU); the
  vertebral arch is one 450 HU mixture.
* Contrast (section 1.4 of clinical.md): trabecular bone +14 HU in arterial phase (Grunewald, late arterial
  +14.4 HU) and +11 HU in portal-venous phase (Pickhardt 2016, +11.2 HU). Aortic blood 40 HU native,
  ~275 HU arterial, ~165 HU portal-venous; veins, liver, kidney and muscle enhance by the amounts in
  ``CONTRAST_HU`` (muscle +5/+8 HU is a modelling choice: muscle enhances a little, which a muscle-based
  internal calibration has to live with).
* Scanner map: every tissue, air included, goes through ``HU_scan = gain * HU_ref + offset`` (one map per
  scan, drawn from ``GAIN_RANGE`` / ``OFFSET_RANGE`` unless given), standing for the scanner/kVp/kernel
  differences that make fixed HU thresholds unreliable (clinical.md section 1.5). Noise is added after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: Reference HU at 120 kVp, native phase (physics/textbook values).
REFERENCE_HU: Mapping[str, float] = MappingProxyType(
    {
        "air": -1000.0,
        "lung": -850.0,
        "fat": -100.0,
        "water": 0.0,
        "csf": 10.0,
        "kidney": 30.0,
        "bowel": 35.0,
        "blood": 40.0,
        "muscle": 50.0,
        "liver": 55.0,
        "disc": 90.0,
        "table": 150.0,
        "marrow": 220.0,  # rib/pelvis/posterior-element marrow (red + yellow marrow with trabeculae)
        "posterior_elements": 450.0,  # vertebral arch: cortex + marrow averaged at clinical resolution
        "cortical": 800.0,
    }
)

#: Trabecular bone: HU_ref = TRAB_HU_INTERCEPT + TRAB_HU_PER_MG * vBMD (mg/cm3 CHA). See module docstring.
TRAB_HU_INTERCEPT: float = 20.0
TRAB_HU_PER_MG: float = 1.2

#: HU added per contrast phase to tissues (before the scanner map). Blood values are absolute targets.
CONTRAST_HU: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "native": MappingProxyType({}),
        "arterial": MappingProxyType(
            {"artery": 235.0, "vein": 60.0, "trabecular": 14.0, "liver": 15.0, "kidney": 130.0, "muscle": 5.0}
        ),
        "portal_venous": MappingProxyType(
            {
                "artery": 125.0,
                "vein": 120.0,
                "trabecular": 11.0,
                "liver": 55.0,
                "kidney": 140.0,
                "muscle": 8.0,
            }
        ),
    }
)

#: Default ranges the per-scan scanner map is drawn from (uniform).
GAIN_RANGE: tuple[float, float] = (0.94, 1.06)
OFFSET_RANGE: tuple[float, float] = (-15.0, 15.0)


def trabecular_hu_ref(vbmd_mg_cm3: float) -> float:
    """Reference-scanner trabecular HU (120 kVp, native, before the scanner map) for a vBMD.

    Parameters
    ----------
    vbmd_mg_cm3
        Trabecular volumetric BMD in mg/cm3 CHA-equivalent.

    Returns
    -------
    float
        HU on the phantom's reference scanner.
    """
    return TRAB_HU_INTERCEPT + TRAB_HU_PER_MG * float(vbmd_mg_cm3)


def contrast_offset(phase: str, tissue: str) -> float:
    """HU added to ``tissue`` in contrast ``phase`` (0 when the tissue does not enhance)."""
    try:
        table = CONTRAST_HU[phase]
    except KeyError:
        raise ValueError(f"unknown contrast phase {phase!r} (native, arterial, portal_venous)") from None
    return float(table.get(tissue, 0.0))
