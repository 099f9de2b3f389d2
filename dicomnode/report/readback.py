"""Read our own SR back (round-trip checks, and the web UI's "what did we send")."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import highdicom as hd

from dicomnode.report import codes as c

Value = float | str


def _key(name: hd.sr.CodedConcept, derivation: hd.sr.CodedConcept | None) -> str | None:
    d = derivation.value if derivation is not None else None
    if name.value == c.ATTENUATION_COEFFICIENT.value and name.scheme_designator == "DCM":
        return {
            c.MEAN.value: "hu_mean",
            c.MEDIAN.value: "hu_median",
            c.STANDARD_DEVIATION.value: "hu_sd",
        }.get(d or "", "hu")
    simple = {
        (c.VBMD.value, c.PRIVATE_SCHEME): "vbmd_mg_cm3",
        (c.VOLUME.value, "SCT"): "roi_volume_mm3",
        (c.KVP.value, "DCM"): "kvp",
        (c.CALIBRATION_SLOPE.value, c.PRIVATE_SCHEME): "calibration_slope",
        (c.CALIBRATION_INTERCEPT.value, c.PRIVATE_SCHEME): "calibration_intercept",
        (c.CONTRAST_CORRECTION.value, c.PRIVATE_SCHEME): "contrast_correction_hu",
    }
    return simple.get((name.value, name.scheme_designator))


def _evaluation_key(name: hd.sr.CodedConcept) -> str | None:
    return {
        c.LEVEL_UNCERTAIN.value: "level_uncertain",
        c.EXCLUDED.value: "excluded",
        c.EXCLUSION_REASON.value: "exclusion_reason",
        c.FRACTURE_SUSPECTED.value: "fracture_suspected",
        c.BMD_CATEGORY.value: "category",
        c.CONTRAST_PHASE.value: "contrast_phase",
    }.get(name.value)


def _category(value: hd.sr.CodedConcept) -> str:
    for name, code in c.CATEGORY_VALUES.items():
        if code.value == value.value:
            return name
    for name, code in c.CONTRAST_PHASE_VALUES.items():
        if code.value == value.value:
            return name
    return str(value.meaning)


def read_sr_measurements(path: Path | str) -> dict[str, dict[str, Value]]:
    """Read the numbers (and coded evaluations) of one of our SRs.

    Returns
    -------
    dict
        ``level -> {name: value}`` for every vertebra group (names: ``hu_mean``, ``hu_median``, ``hu_sd``,
        ``roi_volume_mm3``, ``vbmd_mg_cm3``, ``level_uncertain``, ``excluded``, ``fracture_suspected``, ...),
        plus ``"summary"`` with ``vbmd_l1_l2_mg_cm3``, ``l1_hu``, ``kvp``, ``ref_hu_<tissue>``,
        ``calibration_slope``, ``calibration_intercept``, ``category``, ``contrast_phase``.
        Coded values are returned as their meaning (``"Yes"``/``"No"``) or our enum value (category, phase).
    """
    sr = hd.sr.srread(str(path))
    content = cast(hd.sr.MeasurementReport, sr.content)  # our SRs always hold a TID 1500 report
    groups = list(content.get_planar_roi_measurement_groups()) + list(content.get_image_measurement_groups())
    out: dict[str, dict[str, Value]] = {}
    for group in groups:
        ident = str(group.tracking_identifier or "")
        is_summary = ident == "vBMD summary"
        level = None
        for site in group.finding_sites:
            level = c.level_of_site(site.value.value, site.value.scheme_designator) or level
        key = "summary" if is_summary else level
        if key is None:
            continue
        values: dict[str, Value] = {}
        for m in group.get_measurements():
            sites = [(s.value.value, s.value.scheme_designator) for s in m.finding_sites]
            if is_summary and m.name.value == c.ATTENUATION_COEFFICIENT.value:
                tissue = next((c.tissue_of_site(*s) for s in sites if c.tissue_of_site(*s)), None)
                name = f"ref_hu_{tissue}" if tissue else "l1_hu"
            elif is_summary and m.name.value == c.VBMD.value:
                name = "vbmd_l1_l2_mg_cm3"
            else:
                name = _key(m.name, m.derivation) or str(m.name.meaning)
            values[name] = float(m.value)
        for e in group.get_qualitative_evaluations():
            ekey = _evaluation_key(e.name)
            if ekey is None:
                continue
            coded = cast(hd.sr.CodedConcept, e.value)
            values[ekey] = _category(coded) if ekey in ("category", "contrast_phase") else str(coded.meaning)
        out[key] = values
    return out
