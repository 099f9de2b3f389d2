"""FHIR R4 Observation resources (JSON) as lab values.

Accepted: one ``Observation``, or a ``Bundle`` (any type) whose entries are Observations. Each needs
(FHIR R4, hl7.org/fhir/R4/observation.html): ``status`` final, amended or corrected (a preliminary or
cancelled result is not used); ``code.coding`` with system ``http://loinc.org`` and one of the analytes'
codes; ``subject`` naming the patient; ``effectiveDateTime`` (or ``effectivePeriod.start`` or
``effectiveInstant``); ``valueQuantity`` with ``value`` and a unit (``code`` when the system is UCUM, else
``unit``).

The patient is the DICOM Patient ID of the images: ``subject.identifier.value`` when the integration engine
sends the identifier (the usual medical record number), else the id of ``subject.reference``
("Patient/<id>"). A request is all or nothing: the first resource that cannot be accepted rejects it with
one line naming the entry and the field.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from dicomnode.labs.values import LabInputError, LabValue, analyte_for_loinc, make_value

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
USABLE_STATUS = frozenset({"final", "amended", "corrected"})
MAX_ENTRIES = 1000


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LabInputError(f"{where}: expected a JSON object")
    return value


def _patient(obs: dict[str, Any], where: str) -> str:
    subject = obs.get("subject")
    if not isinstance(subject, dict):
        raise LabInputError(f"{where}: subject (the patient) is missing")
    ident = subject.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"].strip():
        return str(ident["value"]).strip()
    ref = subject.get("reference")
    if isinstance(ref, str) and ref.startswith("Patient/") and ref[8:].strip():
        return ref[8:].strip()
    raise LabInputError(f"{where}: subject needs identifier.value or a reference Patient/<id>")


def _effective(obs: dict[str, Any], where: str) -> date:
    text = obs.get("effectiveDateTime") or obs.get("effectiveInstant")
    period = obs.get("effectivePeriod")
    if text is None and isinstance(period, dict):
        text = period.get("start")
    if not isinstance(text, str) or len(text) < 10:
        raise LabInputError(f"{where}: effectiveDateTime (the sampling date) is missing")
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        raise LabInputError(f"{where}: effectiveDateTime {text[:40]!r} is not a FHIR date") from None


def _loinc(obs: dict[str, Any], where: str) -> str:
    code = obs.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    if not isinstance(codings, list) or not codings:
        raise LabInputError(f"{where}: code.coding is missing")
    loinc = [c.get("code") for c in codings if isinstance(c, dict) and c.get("system") == LOINC_SYSTEM]
    for c in loinc:
        if isinstance(c, str) and analyte_for_loinc(c) is not None:
            return c
    if loinc:
        return str(loinc[0])  # make_value names the accepted codes
    raise LabInputError(f"{where}: no coding with system {LOINC_SYSTEM}")


def _quantity(obs: dict[str, Any], where: str) -> tuple[float, str]:
    q = obs.get("valueQuantity")
    if not isinstance(q, dict):
        raise LabInputError(f"{where}: valueQuantity is missing (a numeric result is needed)")
    value = q.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LabInputError(f"{where}: valueQuantity.value must be a number")
    unit = q.get("code") if q.get("system") == UCUM_SYSTEM and q.get("code") else q.get("unit")
    if not isinstance(unit, str) or not unit.strip():
        raise LabInputError(f"{where}: valueQuantity has no unit")
    return float(value), unit


def observation_value(obs: dict[str, Any], where: str = "Observation") -> LabValue | None:
    """One Observation as a lab value; None for a result whose status means it is not to be used.

    Raises
    ------
    LabInputError
        Not an Observation, or a field missing or invalid (one line).
    """
    if obs.get("resourceType") != "Observation":
        raise LabInputError(f"{where}: resourceType {obs.get('resourceType')!r}, an Observation is expected")
    status = obs.get("status")
    if not isinstance(status, str):
        raise LabInputError(f"{where}: status is missing")
    oid = obs.get("id") if isinstance(obs.get("id"), str) else None
    label = f"{where} {oid}" if oid else where
    if status not in USABLE_STATUS:
        return None
    value, unit = _quantity(obs, label)
    try:
        return make_value(
            _patient(obs, label),
            _loinc(obs, label),
            value,
            unit,
            _effective(obs, label),
            source="fhir",
            source_id=oid,
        )
    except LabInputError as exc:
        msg = str(exc)
        raise LabInputError(msg if msg.startswith(label) else f"{label}: {msg}") from None


def parse_observations(doc: Any) -> tuple[list[LabValue], int]:
    """Lab values of an Observation or a Bundle of Observations, and how many were skipped by status.

    Raises
    ------
    LabInputError
        Anything that cannot be accepted (the whole request is refused).
    """
    root = _obj(doc, "request body")
    kind = root.get("resourceType")
    if kind == "Observation":
        resources = [("Observation", root)]
    elif kind == "Bundle":
        entries = root.get("entry")
        if not isinstance(entries, list) or not entries:
            raise LabInputError("Bundle: entry is missing or empty")
        if len(entries) > MAX_ENTRIES:
            raise LabInputError(f"Bundle: {len(entries)} entries, at most {MAX_ENTRIES} per request")
        resources = []
        for n, e in enumerate(entries):
            entry = _obj(e, f"Bundle entry {n}")
            resources.append((f"Bundle entry {n}", _obj(entry.get("resource"), f"Bundle entry {n} resource")))
    else:
        raise LabInputError(f"resourceType {kind!r}: an Observation or a Bundle of Observations is expected")
    values: list[LabValue] = []
    skipped = 0
    for where, res in resources:
        v = observation_value(res, where)
        if v is None:
            skipped += 1
        else:
            values.append(v)
    return values, skipped
