"""Strict encode: the source attributes that go into what we write carry only valid values.

Real PACS and de-identification tools send invalid values (a UUID in PatientBirthDate, ``sixty`` in
PatientAge, a lower-case sex, a time with letters). We read them tolerantly (``imaging.headers``: such a
value counts as missing), but we never copy one into an SR or SC: highdicom copies the patient, study and
equipment modules from the source datasets, so every source dataset passes through :func:`sanitized_source`
first. An invalid value becomes empty (valid for Type 2 and 3 attributes; the patient and study attributes
highdicom copies are of those types), so the object stays valid for ``dciodvfy``.

This is the one place where source values are checked for encoding; ``dicomnode.report`` uses it for the SR
(``sr.build_sr``) and the SC (``sc.build_sc``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from decimal import Decimal
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

#: VRs whose values we check (the string VRs that carry dates, codes, names, numbers and identifiers).
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})

_AS = re.compile(r"^\d{3}[DWMY]$")


def _date_ok(text: str) -> bool:
    if not re.fullmatch(r"\d{8}", text):
        return False
    try:
        _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _time_ok(text: str) -> bool:
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", text)
    if m is None:
        return False
    hh = int(m.group(1))
    mm = int(m.group(2) or 0)
    ss = int(m.group(3) or 0)
    # a fraction needs all of HHMMSS before it
    return hh < 24 and mm < 60 and ss < 61 and (m.group(4) is None or m.group(3) is not None)


def _datetime_ok(text: str) -> bool:
    m = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?", text)
    if m is None:
        return False
    year, month, day, time = m.group(1), m.group(2), m.group(3), m.group(4)
    if day is not None and not _date_ok(year + (month or "01") + day):
        return False
    if month is not None and not 1 <= int(month) <= 12:
        return False
    return time is None or _time_ok(time)


def _one_value_ok(vr: str, value: Any) -> bool:
    """Whether one value of an element with this VR is valid DICOM (empty is valid)."""
    if value is None:
        return True
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        # IS / DS held as numbers (pydicom's IS, DSfloat, DSdecimal): pydicom writes them; finite is enough
        return vr in ("DS", "IS") and math.isfinite(float(value))
    text = str(value)
    if text.strip() == "":
        return True
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError):
        return False
    stripped = text.strip()
    if vr == "DA":
        return _date_ok(stripped)
    if vr == "TM":
        return _time_ok(stripped)
    if vr == "DT":
        return _datetime_ok(stripped)
    if vr == "AS":
        return _AS.fullmatch(stripped) is not None
    return True


def value_is_valid(elem: DataElement) -> bool:
    """Whether ``elem`` (a string-VR element) may be written as it is. Other VRs are taken as valid."""
    if elem.VR not in _CHECKED_VRS:
        return True
    try:
        value = elem.value
    except Exception:  # a raw value pydicom cannot even decode
        return False
    if value is None:
        return True
    if isinstance(value, bytes | bytearray):
        return False
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return all(_one_value_ok(elem.VR, v) for v in values)


def sanitized_source(ds: Dataset) -> Dataset:
    """A copy of ``ds``'s top level, without pixel data, where every invalid string value is made empty.

    Parameters
    ----------
    ds
        A source dataset (header or full). It is not changed.

    Returns
    -------
    pydicom.dataset.Dataset
        The same attributes (sequences shared, not copied; ``file_meta`` kept), invalid values emptied.
        The keywords emptied are logged at DEBUG (never the values: they may be patient data).
    """
    out = Dataset()
    emptied: list[str] = []
    for elem in ds:
        if elem.tag.group == 0x7FE0:  # pixel data: not needed to copy modules
            continue
        if elem.tag.group & 0x0001 == 0 and not value_is_valid(elem):
            out.add(DataElement(elem.tag, elem.VR, None))
            emptied.append(elem.keyword or str(elem.tag))
            continue
        out.add(elem)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = meta
    if emptied:
        log.debug("invalid source values left empty in what we write: %s", ", ".join(emptied))
    return out
