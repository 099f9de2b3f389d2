"""One vocabulary for the facts several modules need, each defined once (pure; imports only ``domain``).

* :data:`CT_IMAGE_STORAGE_SOP_CLASSES` - the CT image storage SOP classes the node reads (ingest, imaging,
  routing's shipped rules);
* :func:`is_sharp_kernel` / :data:`SHARP_KERNEL_PATTERNS` - reconstruction kernels that bias trabecular HU
  (routing ranks them last, the calibration flags them);
* :func:`acr_category` - the ACR QCT category of a vBMD (the measurement, the model bundles, evaluation);
* :func:`contrast_agent_given` / :data:`NO_CONTRAST_AGENT_VALUES` - what a ContrastBolusAgent value says
  (routing ranks native first, the calibration's contrast phase starts from it);
* :data:`ANALYZE` / :data:`IGNORE` / :func:`rule_action` - the routing actions, one spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from dicomnode.domain import BoneCategory

__all__ = [
    "ACR_NORMAL_ABOVE_MG_CM3",
    "ACR_OSTEOPOROSIS_BELOW_MG_CM3",
    "ANALYZE",
    "CT_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE_SOP_CLASSES",
    "ENHANCED_CT_IMAGE_STORAGE",
    "IGNORE",
    "LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE",
    "MULTIFRAME_CT_SOP_CLASSES",
    "NO_CONTRAST_AGENT_VALUES",
    "SHARP_KERNEL_PATTERNS",
    "acr_category",
    "contrast_agent_given",
    "is_sharp_kernel",
    "rule_action",
]

# --- storage SOP classes (PS3.4 B.5) ------------------------------------------------------------------

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
#: The CT image storage SOP classes the node receives, reads and analyses.
CT_IMAGE_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
)
#: Those of them that hold a whole series in one multi-frame object.
MULTIFRAME_CT_SOP_CLASSES: frozenset[str] = frozenset(
    {ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
)

# --- reconstruction kernels ---------------------------------------------------------------------------

#: Kernel names (case-insensitive regexes, searched in each value of ConvolutionKernel) meaning a sharp,
#: bone, lung or edge-enhancing reconstruction, which shifts HU in trabecular bone (clinical.md section 5).
#: A heuristic across vendors: GE BONE, BONEPLUS, LUNG, EDGE, DETAIL (STANDARD/SOFT are soft); Siemens
#: classic B/H/U/S kernels 50-99 (B60f, H70h, U90u), iterative I/Ir 50-99 (I70f) and ADMIRE/SAFIRE-era
#: Br/Bv/Bl/Hr/Qr/Sa/Ur 50-99 (Br64, Bl57; Br36-Br44 are soft); Canon/Toshiba FC30-FC39 (bone), FC50-FC59
#: (lung), FC80-FC89; Philips D, E, L, YC-YF (sharp; A, B, C soft; the Y-series mapping is the least
#: certain); generic SHARP, ULTRA, HIGH RES.
SHARP_KERNEL_PATTERNS: tuple[str, ...] = (
    r"BONE",
    r"SHARP",
    r"LUNG",
    r"EDGE",
    r"DETAIL",
    r"ULTRA",
    r"HIGH ?RES",
    r"^[BHUS][5-9]\d",
    r"^(?:I|IR)[5-9]\d",
    r"^(?:BR|BV|BL|HR|QR|SA|UR|HC|HP)[5-9]\d",
    r"^BL\d",
    r"^FC(?:3\d|5\d|8\d)",
    r"^[DEL]$",
    r"^Y[C-F]$",
)


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items: Iterable[Any] = value.split("\\")
    elif isinstance(value, list | tuple):
        items = value
    else:
        items = (value,)
    return [str(v).strip().upper() for v in items]


def is_sharp_kernel(kernel: Any, extra_patterns: Iterable[str] = ()) -> bool:
    """True when any value of a ConvolutionKernel (text, multi-valued or None) is a sharp/bone/lung kernel.

    Parameters
    ----------
    kernel
        The ConvolutionKernel value (Siemens writes a second value, e.g. ``["Br38f", "3"]``).
    extra_patterns
        Site patterns (routing's ``ranking.extra_sharp_kernel_patterns``).
    """
    pats = [*SHARP_KERNEL_PATTERNS, *extra_patterns]
    return any(re.search(p, v, re.IGNORECASE) for v in _values(kernel) if v for p in pats)


# --- ACR QCT categories ------------------------------------------------------------------------------

#: ACR practice parameter for QCT (2018): trabecular vBMD > 120 mg/cm3 normal, 80-120 osteopenia, < 80
#: osteoporosis.
ACR_NORMAL_ABOVE_MG_CM3 = 120.0
ACR_OSTEOPOROSIS_BELOW_MG_CM3 = 80.0


def acr_category(vbmd_mg_cm3: float) -> BoneCategory:
    """ACR QCT category of a trabecular vBMD: > 120 normal, 80-120 osteopenia, < 80 osteoporosis.

    Parameters
    ----------
    vbmd_mg_cm3 : float
        Volumetric BMD in mg/cm3.

    Returns
    -------
    BoneCategory
        The category (80 and 120 themselves are osteopenia).
    """
    if vbmd_mg_cm3 > ACR_NORMAL_ABOVE_MG_CM3:
        return BoneCategory.NORMAL
    if vbmd_mg_cm3 < ACR_OSTEOPOROSIS_BELOW_MG_CM3:
        return BoneCategory.OSTEOPOROSIS
    return BoneCategory.OSTEOPENIA


# --- contrast -----------------------------------------------------------------------------------------

#: ContrastBolusAgent values that mean "no contrast was given" (upper case, stripped).
NO_CONTRAST_AGENT_VALUES: frozenset[str] = frozenset(
    {"", "NONE", "NO", "N", "N/A", "NA", "NIL", "WITHOUT", "0", "-"}
)


def contrast_agent_given(agent: Any) -> bool | None:
    """What a ContrastBolusAgent value says: True (an agent named), False (says none), None (absent/empty).

    Every value of a multi-valued element must say "none" for False.
    """
    vals = [v for v in _values(agent) if v]
    if not vals:
        return None
    return not all(v in NO_CONTRAST_AGENT_VALUES for v in vals)


# --- rule actions -------------------------------------------------------------------------------------

#: The routing action that sends a series to analysis (the CLI's spelling, ``dicomnode analyze``).
ANALYZE = "analyze"
#: The routing action that leaves a series alone.
IGNORE = "ignore"
#: Spellings earlier versions wrote (saved rule versions, recorded decisions), read as today's.
_LEGACY_ACTIONS = {"analyse": ANALYZE}


def rule_action(value: Any) -> Any:
    """A rule action in today's spelling (``analyse`` -> ``analyze``); anything else as it is."""
    return _LEGACY_ACTIONS.get(value, value) if isinstance(value, str) else value
