"""Read our own SR back (round-trip checks, and the web UI's "what did we send")."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.report import codes as c

_FINDING_SITE = codes.SCT.FindingSite  # 363698007 SCT

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


def _code_of(item: Dataset, keyword: str) -> tuple[str, str] | None:
    seq = item.get(keyword)
    if not seq:
        return None
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _summary_from_containers(root: Dataset) -> dict[str, Value]:
    """The exam-level values of the Derived Imaging Measurements and Qualitative Evaluations containers."""
    values: dict[str, Value] = {}
    derived = (c.DERIVED_IMAGING_MEASUREMENTS.value, c.DERIVED_IMAGING_MEASUREMENTS.scheme_designator)
    qualitative = (c.QUALITATIVE_EVALUATIONS.value, c.QUALITATIVE_EVALUATIONS.scheme_designator)
    for container in root.get("ContentSequence", []):
        name = _code_of(container, "ConceptNameCodeSequence")
        if name == derived:
            for item in container.get("ContentSequence", []):
                if item.get("ValueType") != "NUM" or not item.get("MeasuredValueSequence"):
                    continue
                m = hd.sr.NumContentItem.from_dataset(item)
                sites = [
                    _code_of(mod, "ConceptCodeSequence")
                    for mod in item.get("ContentSequence", [])
                    if _code_of(mod, "ConceptNameCodeSequence") == (_FINDING_SITE.value, "SCT")
                ]
                key: str | None
                if m.name.value == c.ATTENUATION_COEFFICIENT.value:
                    tissue = next((c.tissue_of_site(*s) for s in sites if s and c.tissue_of_site(*s)), None)
                    key = f"ref_hu_{tissue}" if tissue else "l1_hu"
                elif m.name.value == c.VBMD.value:
                    key = "vbmd_l1_l2_mg_cm3"
                else:
                    key = _key(m.name, None)
                if key is not None:
                    values[key] = float(m.value)
        elif name == qualitative:
            for item in container.get("ContentSequence", []):
                concept = _code_of(item, "ConceptNameCodeSequence")
                if item.get("ValueType") == "CODE" and concept is not None:
                    ekey = {
                        (c.BMD_CATEGORY.value, c.BMD_CATEGORY.scheme_designator): "category",
                        (c.CONTRAST_PHASE.value, c.CONTRAST_PHASE.scheme_designator): "contrast_phase",
                    }.get(concept)
                    if ekey is not None:
                        values[ekey] = _category(hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0]))
                elif item.get("ValueType") == "TEXT" and concept is not None:
                    tkey = {
                        (c.ALGORITHM_NAME.value, "DCM"): "algorithm_name",
                        (c.ALGORITHM_VERSION.value, "DCM"): "algorithm_version",
                        (c.COMMENT.value, "DCM"): "comments",
                    }.get(concept)
                    if tkey == "comments" and "comments" in values:
                        values[tkey] = f"{values[tkey]}\n{item.TextValue}"
                    elif tkey is not None:
                        values[tkey] = str(item.TextValue)
    return values


def read_sr_measurements(path: Path | str) -> dict[str, dict[str, Value]]:
    """Read the numbers (and coded evaluations) of one of our SRs.

    Returns
    -------
    dict
        ``level -> {name: value}`` for every vertebra group (names: ``hu_mean``, ``hu_median``, ``hu_sd``,
        ``roi_volume_mm3``, ``vbmd_mg_cm3``, ``level_uncertain``, ``excluded``, ``fracture_suspected``, ...),
        plus ``"summary"`` with ``vbmd_l1_l2_mg_cm3``, ``l1_hu``, ``kvp``, ``ref_hu_<tissue>``,
        ``calibration_slope``, ``calibration_intercept``, ``category``, ``contrast_phase``,
        ``algorithm_name``, ``algorithm_version``, ``comments`` (one per line; e.g. why no category was
        given, or a vertebra without an outline) (from the Derived Imaging Measurements and Qualitative
        Evaluations containers; SRs of earlier versions kept them in a "vBMD summary" group, read too).
        Coded values are returned as their meaning (``"Yes"``/``"No"``) or our enum value (category, phase).
    """
    sr = hd.sr.srread(str(path))
    content = cast(hd.sr.MeasurementReport, sr.content)  # our SRs always hold a TID 1500 report
    groups = list(content.get_planar_roi_measurement_groups()) + list(content.get_image_measurement_groups())
    out: dict[str, dict[str, Value]] = {}
    summary = _summary_from_containers(sr)  # the document dataset is the root container
    if summary:
        out["summary"] = summary
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
        out.setdefault(key, {}).update(values)
    return out
