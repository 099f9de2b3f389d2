"""Phantomless (internal) calibration: measured HU -> reference HU -> CHA-equivalent vBMD (mg/cm3).

Method
------
1. **Internal tissue references** (Engelke, Chaudry, Bartenschlager, Curr Osteoporos Rep 2023, PMC9925590,
   "internal calibration" family; clinical.md sections 2.3 / 2.4). We measure, in the scan itself, the mean HU
   of air outside the body, subcutaneous adipose tissue (SAT), paraspinal (erector spinae) muscle and, when
   the scan is native, blood in the abdominal aorta. Each tissue has a reference HU at 120 kVp on a well
   calibrated scanner (textbook physics values: air -1000, fat -100, skeletal muscle +50, blood +40;
   :data:`REFERENCE_HU`).
2. **Linear map** measured HU -> reference HU fitted by weighted least squares (weights = 1 / expected
   biological spread of each tissue, :data:`TISSUE_SD_HU`). This generalises the two-point air/fat
   normalisation of Comp2Comp's FDA BMD pipeline (``s = (-95 - (-1000)) / (HU_VAT - HU_air)``, clinical.md
   section 2.4) to more tissues, and it is the "method 1" of the Engelke review (equivalent values assigned
   to internal tissues). Air and fat span 900 HU and fix gain and offset; muscle and blood stabilise the
   soft-tissue end. Muscle and blood are left out after IV contrast because they enhance.
   The fit is checked for plausibility (gain 0.8-1.25, offset within +/-100 HU, residuals within 25 HU);
   an implausible or under-determined fit falls back to the identity map and is flagged.
3. **HU -> vBMD**: on the reference scanner, trabecular bone follows
   ``HU_ref = HU_AT_ZERO_MINERAL + HU_PER_MG_CM3 * vBMD`` (vBMD in mg/cm3 calcium hydroxyapatite).
   The constants (20 HU, 1.2 HU per mg/cm3) are a documented *convention*, anchored on clinical.md: the
   Pickhardt 2013 L1 cut of 110 HU ("> 90 % specific for osteoporosis") against the ACR osteoporosis cut of
   80 mg/cm3 (116 HU by this relation), the 160 HU "90 % sensitive" cut against the ACR normal cut of
   120 mg/cm3 (164 HU), and the young-adult L1 mean of 236 HU (Hendrickson 2018) against a typical young-adult
   QCT value of 180 mg/cm3. The project's synthetic phantom uses the same reference-scanner convention, so
   phantom tests check that the calibration inverts an unknown scanner (gain, offset, contrast), not the
   absolute constants. **The absolute relation has not been validated against a real QCT calibration
   phantom**; treat absolute vBMD as an estimate (internal calibration reaches 5-10 % error in the
   literature, Engelke 2023).
4. **Contrast**: trabecular bone enhances after IV contrast. ``offset`` mode subtracts a population offset
   before conversion (portal venous +11 HU, Pickhardt et al., Osteoporos Int 2016, doi:10.1007/s00198-015-
   3224-9, 11.2 +/- 19.2 HU; late arterial +14 HU, Grunewald et al. ECR abstract, +14.4 HU); ``abstain`` mode
   reports no vBMD for enhanced scans. The individual spread (SD 19 HU) is large, so enhanced results are
   always flagged.

Conditions outside the references (kVp outside 100-140, sharp/bone kernels, virtual monoenergetic or
material images) are flagged, never silently accepted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from dicomnode.domain import Calibration, ContrastPhase
from dicomnode.vocab import contrast_agent_given, is_sharp_kernel

log = logging.getLogger(__name__)

#: Reference HU of internal calibration tissues at 120 kVp (physics/textbook values).
REFERENCE_HU: Mapping[str, float] = MappingProxyType(
    {"air": -1000.0, "fat": -100.0, "muscle": 50.0, "blood": 40.0}
)

#: Expected inter-patient spread of each tissue's true HU (weights of the fit are 1/SD^2).
TISSUE_SD_HU: Mapping[str, float] = MappingProxyType({"air": 8.0, "fat": 10.0, "muscle": 10.0, "blood": 8.0})

#: Reference-scanner relation HU_ref = HU_AT_ZERO_MINERAL + HU_PER_MG_CM3 * vBMD (see module docstring).
HU_AT_ZERO_MINERAL: float = 20.0
HU_PER_MG_CM3: float = 1.2

#: Population contrast offsets of trabecular bone (HU), subtracted in "offset" mode.
CONTRAST_OFFSET_HU: Mapping[ContrastPhase, float] = MappingProxyType(
    {
        ContrastPhase.NATIVE: 0.0,
        ContrastPhase.ARTERIAL: 14.0,  # Grunewald et al. (ECR, DECT, 288 pts): late arterial +14.4 HU
        ContrastPhase.PORTAL_VENOUS: 11.0,  # Pickhardt et al. 2016: +11.2 +/- 19.2 HU
    }
)

#: Aortic blood HU (calibrated) separating phases: native blood 35-50 HU; portal venous aorta ~130-200 HU;
#: arterial aorta > 200 HU (typical enhancement curves; TotalSegmentator's phase bins, clinical.md 1.4).
AORTA_NATIVE_MAX_HU: float = 100.0
AORTA_PORTAL_MAX_HU: float = 220.0

METHOD_SOURCE = (
    "internal calibration: air, subcutaneous fat, psoas muscle and native aortic blood mapped by weighted "
    "least squares to reference HU -1000 / -100 / 50 / 40 (Engelke et al., Curr Osteoporos Rep 2023, "
    "PMC9925590; Comp2Comp air/fat normalisation); reference relation HU = 20 + 1.2 x vBMD (mg/cm3 CHA), "
    "anchored on Pickhardt 2013 L1 cut-offs against the ACR QCT categories (not phantom-validated)"
)


@dataclass(frozen=True)
class TissueFit:
    """The fitted map measured HU -> reference HU and its inputs."""

    gain: float
    offset: float
    measured: Mapping[str, float]
    used: tuple[str, ...]
    flags: tuple[str, ...]

    def apply(self, hu: float) -> float:
        return self.gain * hu + self.offset

    def invert(self, hu_ref: float) -> float:
        return (hu_ref - self.offset) / self.gain


def _wls(meas: Mapping[str, float], used: tuple[str, ...]) -> tuple[float, float]:
    x = np.array([meas[t] for t in used])
    y = np.array([REFERENCE_HU[t] for t in used])
    sw = np.array([1.0 / TISSUE_SD_HU[t] for t in used])
    a = np.vstack([x, np.ones_like(x)]).T
    sol, *_ = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)
    return float(sol[0]), float(sol[1])


def _offset_only(meas: Mapping[str, float], used: tuple[str, ...]) -> float:
    """Weighted mean of ``reference - measured`` over ``used`` (weights 1 / SD^2): the offset of a map
    whose gain is 1."""
    w = np.array([1.0 / TISSUE_SD_HU[t] ** 2 for t in used])
    d = np.array([REFERENCE_HU[t] - meas[t] for t in used])
    return float((w * d).sum() / w.sum())


def fit_tissue_map(measured: Mapping[str, float | None], phase: ContrastPhase) -> TissueFit:
    """Fit ``HU_ref = gain * HU_measured + offset`` on the available internal tissues.

    Air and fat (900 HU apart, stable between patients) set the map; muscle and blood join the weighted
    fit only in native scans and only when they agree with the air/fat map within 30 HU (paraspinal muscle
    of older patients is often fatty, aortic ROIs can catch the wall or a thrombus): a disagreeing tissue
    is reported, not used. Without air in view (a small field of view) only the offset is fitted, gain 1,
    on the soft tissues: 150 HU apart, they cannot fix a gain.

    Parameters
    ----------
    measured
        Tissue name (keys of :data:`REFERENCE_HU`) -> measured mean HU, or None when not measurable.
    phase
        Contrast phase; muscle and blood are left out after contrast because they enhance.

    Returns
    -------
    TissueFit
        The map, with flags; the identity map (flagged) when too few tissues or an implausible fit.
    """
    flags: list[str] = []
    meas = {k: float(v) for k, v in measured.items() if v is not None and np.isfinite(v)}
    for t in ("air", "fat"):
        if t not in meas and t in measured:
            flags.append(f"calibration tissue not measurable: {t}")
    optional = ["muscle", "blood"] if phase == ContrastPhase.NATIVE else []
    primary = tuple(t for t in ("air", "fat") if t in meas)
    if len(primary) == 2:
        gain, offset = _wls(meas, primary)
        used: list[str] = list(primary)
        for t in optional:
            if t not in meas:
                continue
            res = gain * meas[t] + offset - REFERENCE_HU[t]
            if abs(res) > 30.0:
                flags.append(
                    f"{t} reads {gain * meas[t] + offset:.0f} HU after air/fat calibration (reference "
                    f"{REFERENCE_HU[t]:.0f}): not used as a reference"
                )
            else:
                used.append(t)
    else:
        used = [t for t in (*primary, *optional) if t in meas]
    used_t = tuple(used)
    if len(used_t) < 2 or not ("air" in used_t or "fat" in used_t):
        flags.append("internal calibration not possible (too few reference tissues): identity map used")
        return TissueFit(1.0, 0.0, meas, (), tuple(flags))
    if "air" in used_t:
        gain, offset = _wls(meas, used_t)
    else:
        # the soft tissues span 150 HU (fat -100 to muscle +50) and each varies by ~10 HU between patients
        # and with where it is sampled: a gain fitted on them alone is uncertain by ~0.1 (10-20 HU at bone
        # density). Without air (a small field of view) only the offset is fitted; the gain is the
        # scanner's own, which the air-water calibration every scanner runs daily keeps within ~1 %.
        gain, offset = 1.0, _offset_only(meas, used_t)
        flags.append(
            "air not in view: internal calibration corrects the offset only "
            f"({'/'.join(used_t)}, {offset:+.1f} HU)"
        )
    x = np.array([meas[t] for t in used_t])
    y = np.array([REFERENCE_HU[t] for t in used_t])
    resid = np.abs(gain * x + offset - y)
    if not (0.8 <= gain <= 1.25) or abs(offset) > 100.0 or float(resid.max()) > 30.0:
        flags.append(
            f"internal calibration implausible (gain {gain:.3f}, offset {offset:.1f} HU, max residual "
            f"{float(resid.max()):.1f} HU): identity map used"
        )
        return TissueFit(1.0, 0.0, meas, used_t, tuple(flags))
    return TissueFit(gain, offset, meas, used_t, tuple(flags))


def vbmd_from_hu(hu_calibrated: float, contrast_correction_hu: float = 0.0) -> float:
    """CHA-equivalent vBMD (mg/cm3) from a calibrated trabecular HU (contrast offset subtracted first)."""
    return (hu_calibrated - contrast_correction_hu - HU_AT_ZERO_MINERAL) / HU_PER_MG_CM3


def _text(header: Mapping[str, Any], key: str) -> str:
    v = header.get(key)
    if v is None:
        return ""
    if isinstance(v, list | tuple):
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def _float(header: Mapping[str, Any], key: str) -> float | None:
    v = header.get(key)
    if isinstance(v, list | tuple):
        v = v[0] if v else None
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def acquisition_flags(header: Mapping[str, Any]) -> tuple[float | None, str | None, list[str]]:
    """kVp, kernel and flags for acquisition conditions outside the calibration's references."""
    flags: list[str] = []
    kvp = _float(header, "KVP")
    kernel = _text(header, "ConvolutionKernel") or None
    if kvp is None:
        flags.append("kVp unknown")
    elif not 100.0 <= kvp <= 140.0:
        flags.append(f"kVp {kvp:g} outside 100-140 kV: HU thresholds and calibration unreliable")
    if kernel is not None and is_sharp_kernel(kernel):
        flags.append(f"sharp/bone reconstruction kernel {kernel!r}: trabecular HU may be biased")
    image_type = _text(header, "ImageType").upper()
    desc = (_text(header, "SeriesDescription") + " " + image_type).upper()
    if any(s in desc for s in ("MONOE", "MONO_E", "VMI", "KEV", "VIRTUAL", "IODINE", "VNC")):
        flags.append("virtual monoenergetic or material image: not supported by the calibration")
    return kvp, kernel, flags


def _seconds(value: str) -> float | None:
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", value.strip().replace(":", ""))
    if not m:
        return None
    h, mi, s, frac = m.group(1), m.group(2) or "0", m.group(3) or "0", m.group(4) or ""
    return int(h) * 3600 + int(mi) * 60 + int(s) + (float(frac) if frac else 0.0)


def contrast_from_header(header: Mapping[str, Any]) -> tuple[bool | None, float | None]:
    """(contrast given?, seconds from bolus start to acquisition) from the header; None when unknown."""
    agent = _text(header, "ContrastBolusAgent")
    route = _text(header, "ContrastBolusRoute").upper()
    given: bool | None = None
    if agent:
        given = contrast_agent_given(agent)
        if route and ("ORAL" in route and "IV" not in route and "INTRAVENOUS" not in route):
            given = False  # oral contrast does not enhance bone or blood
    delay = None
    start = _text(header, "ContrastBolusStartTime")
    acq = _text(header, "AcquisitionTime") or _text(header, "SeriesTime")
    if start and acq:
        s0, s1 = _seconds(start), _seconds(acq)
        if s0 is not None and s1 is not None:
            d = s1 - s0
            if d < -43200:
                d += 86400
            if 0.0 <= d <= 1800.0:
                delay = d
    return given, delay


def decide_phase(
    header: Mapping[str, Any], aorta_hu_calibrated: float | None
) -> tuple[ContrastPhase, list[str]]:
    """Contrast phase from header tags and the calibrated aortic HU, with notes saying why."""
    notes: list[str] = []
    given, delay = contrast_from_header(header)
    a = aorta_hu_calibrated
    if a is not None:
        by_image = (
            ContrastPhase.NATIVE
            if a < AORTA_NATIVE_MAX_HU
            else ContrastPhase.PORTAL_VENOUS
            if a < AORTA_PORTAL_MAX_HU
            else ContrastPhase.ARTERIAL
        )
    else:
        by_image = ContrastPhase.UNKNOWN
    if delay is not None and given is not False:
        by_time = (
            ContrastPhase.NATIVE
            if delay < 10
            else ContrastPhase.ARTERIAL
            if delay < 50
            else ContrastPhase.PORTAL_VENOUS
        )
        notes.append(f"contrast delay {delay:.0f} s from header -> {by_time.value}")
        if by_image not in (ContrastPhase.UNKNOWN, by_time):
            notes.append(f"aortic blood {a:.0f} HU suggests {by_image.value}; header timing used")
        return by_time, notes
    if a is not None:
        notes.append(f"aortic blood {a:.0f} HU (calibrated) -> {by_image.value}")
    if given is True and by_image == ContrastPhase.NATIVE:
        notes.append("header says IV contrast but the aorta is not enhanced: phase unknown")
        return ContrastPhase.UNKNOWN, notes
    if given is False and by_image not in (ContrastPhase.NATIVE, ContrastPhase.UNKNOWN):
        notes.append("header says no contrast but the aorta is enhanced: image evidence used")
    if given is True and by_image == ContrastPhase.UNKNOWN:
        return ContrastPhase.UNKNOWN, notes
    if given is None and by_image == ContrastPhase.UNKNOWN:
        return ContrastPhase.UNKNOWN, notes
    if given is False and by_image == ContrastPhase.UNKNOWN:
        return ContrastPhase.NATIVE, notes
    return by_image, notes


def build_calibration(
    fit: TissueFit,
    kvp: float | None,
    kernel: str | None,
    contrast_correction_hu: float,
    extra_flags: list[str],
    vbmd_available: bool,
) -> Calibration:
    """The ``Calibration`` record: slope/intercept of the composed map raw HU -> vBMD."""
    # tissue -> measured mean HU (the domain contract); the targets are REFERENCE_HU, named in ``source``
    ref = {k: float(v) for k, v in fit.measured.items()}
    if vbmd_available:
        slope: float | None = fit.gain / HU_PER_MG_CM3
        intercept: float | None = (fit.offset - contrast_correction_hu - HU_AT_ZERO_MINERAL) / HU_PER_MG_CM3
        method = "internal-" + "-".join(fit.used) if fit.used else "reference-relation-uncalibrated"
    else:
        slope, intercept, method = None, None, "none"
    return Calibration(
        method=method,
        source=METHOD_SOURCE,
        slope_mg_cm3_per_hu=slope,
        intercept_mg_cm3=intercept,
        reference_hu=ref,
        kvp=kvp,
        kernel=kernel,
        contrast_correction_hu=contrast_correction_hu,
        flags=tuple(dict.fromkeys(list(fit.flags) + extra_flags)),
    )
