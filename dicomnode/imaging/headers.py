"""DICOM header summaries for routing: pydicom + stdlib only (``ingest`` imports this module).

Public API
----------
``header_dict(ds, keywords=SUMMARY_KEYWORDS) -> dict[str, Any]``
    Plain Python values (str, int, float, tuples of those) of the wanted keywords, looked up at the top
    level and, for enhanced multi-frame objects, in the shared / first per-frame functional groups.
    Absent or empty elements are left out, so ``d.get(kw)`` is ``None`` for "not known".
``summarize(datasets, series_instance_uid=None) -> SeriesSummary``
    One ``SeriesSummary`` for the instances of one series (headers read with ``stop_before_pixels``).
``z_extent_mm(datasets) -> float | None``
    Extent of the series along its slice normal, from Image Position / Orientation (Patient).
``element_is_valid(elem) -> bool``
    Whether a string-VR element's value is valid DICOM (dates, times, ages, code strings, names, numbers).
    The header reading treats an invalid date, time or age as missing; ``dicomnode.report`` writes no
    invalid value (tolerant decode, strict encode).
``patient_age_years(ds) -> float | None``
    Age from PatientAge (``058Y``), else from PatientBirthDate and the study date. The birth date itself
    never leaves this module.

Nothing here reads pixel data, numpy or the environment.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, IS, DSdecimal, DSfloat, PersonName, validate_value

from dicomnode.domain import SeriesSummary

#: Series- and study-level keywords kept in ``SeriesSummary.attributes`` (routing-relevant, no names/IDs).
SUMMARY_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImageType",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ConvolutionKernel",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusIngredient",
    "KVP",
    "XRayTubeCurrent",
    "Exposure",
    "CTDIvol",
    "SpiralPitchFactor",
    "GantryDetectorTilt",
    "ReconstructionDiameter",
    "PixelSpacing",
    "Rows",
    "Columns",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageOrientationPatient",
    "PatientPosition",
    "NumberOfFrames",
    "SeriesNumber",
    "AcquisitionNumber",
    "AccessionNumber",
    "PatientAge",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "RescaleType",
    "LossyImageCompression",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    # projection radiographs (knee routing): which view and which side
    "ViewPosition",
    "ImageLaterality",
)

#: Extra per-instance keywords used by ``header_dict`` for a Volume header (first instance).
INSTANCE_KEYWORDS: tuple[str, ...] = (
    *SUMMARY_KEYWORDS,
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelPaddingValue",
    "WindowCenter",
    "WindowWidth",
)

_TRANSFER_SYNTAX = "TransferSyntaxUID"


def plain_value(value: Any) -> Any:
    """Convert a pydicom element value to plain Python (None for empty, binary or sequence values)."""
    if value is None or isinstance(value, bytes | bytearray | DicomSequence):
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = tuple(plain_value(v) for v in value)
        return items if items and all(v is not None for v in items) else None
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat | DSdecimal):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PersonName):
        return str(value) or None
    if isinstance(value, str):
        s = value.strip().strip("\x00").strip()
        return s or None
    return str(value) or None


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
        validate_value(vr, text, config.RAISE)
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


def element_is_valid(elem: DataElement) -> bool:
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


def _functional_group_items(ds: Dataset) -> list[Dataset]:
    """Items of the shared and first per-frame functional groups, one level down (enhanced objects)."""
    items: list[Dataset] = []
    for group_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group_kw)
        if not seq:
            continue
        for elem in seq[0]:
            if elem.VR == "SQ" and elem.value:
                items.append(elem.value[0])
    return items


def _lookup(ds: Dataset, keyword: str, fg_items: list[Dataset]) -> Any:
    if keyword == _TRANSFER_SYNTAX:
        meta = getattr(ds, "file_meta", None)
        return plain_value(meta.get(keyword)) if meta is not None else None
    for source in (ds, *fg_items):
        value = _tolerant_value(source, keyword)
        if value is not None:
            return value
    return None


#: VRs whose invalid values count as missing when read (a UUID as a birth date, letters as a number say
#: nothing). Invalid code strings and the like are kept as read: routing compares them tolerantly.
_MISSING_WHEN_INVALID = frozenset({"DA", "TM", "DT", "AS", "DS", "IS"})


def _tolerant_value(ds: Dataset, keyword: str) -> Any:
    """The plain value of ``keyword`` in ``ds``; None when absent, empty, undecodable or an invalid
    date/time/age. A malformed value never breaks a summary (tolerant reading)."""
    try:
        if keyword not in ds:
            return None
        elem = ds.data_element(keyword)
        if elem is None:
            return None
        if elem.VR in _MISSING_WHEN_INVALID and not element_is_valid(elem):
            return None
        return plain_value(elem.value)
    except Exception:
        return None


def header_dict(ds: Dataset, keywords: Iterable[str] = INSTANCE_KEYWORDS) -> dict[str, Any]:
    """Plain values of ``keywords`` in ``ds`` (absent/empty ones left out).

    Parameters
    ----------
    ds
        A dataset, usually read with ``stop_before_pixels=True``.
    keywords
        DICOM keywords to extract. Enhanced multi-frame objects keep many of them inside functional
        group sequences (PixelSpacing, SliceThickness, KVP, ConvolutionKernel...): those are found too.

    Returns
    -------
    dict
        ``keyword -> value`` with str / int / float / tuple values, plus ``TransferSyntaxUID`` from the
        file meta when known and ``PatientAgeYears`` (float) when the age can be computed.
    """
    fg_items = _functional_group_items(ds)
    out: dict[str, Any] = {}
    for kw in keywords:
        value = _lookup(ds, kw, fg_items)
        if value is not None:
            out[kw] = value
    ts = _lookup(ds, _TRANSFER_SYNTAX, fg_items)
    if ts is not None:
        out[_TRANSFER_SYNTAX] = ts
    # SOP Instance UID is sometimes blank in the dataset but present in the file meta
    if "SOPInstanceUID" in keywords and "SOPInstanceUID" not in out:
        meta = getattr(ds, "file_meta", None)
        uid = plain_value(meta.get("MediaStorageSOPInstanceUID")) if meta is not None else None
        if uid is not None:
            out["SOPInstanceUID"] = uid
    age = patient_age_years(ds)
    if age is not None:
        out["PatientAgeYears"] = age
    return out


def _parse_da(value: Any) -> _dt.date | None:
    if value is None:
        return None
    text = str(value).strip().replace(".", "").replace("-", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        d = DA(text)
    except (ValueError, TypeError):
        return None
    return _dt.date(d.year, d.month, d.day) if d is not None else None


def patient_age_years(ds: Dataset) -> float | None:
    """Patient age in years: PatientAge (nnnD/W/M/Y) first, else birth date to study/series date."""
    age = plain_value(ds.get("PatientAge")) if "PatientAge" in ds else None
    if isinstance(age, str) and len(age) >= 2 and age[:-1].isdigit():
        n = float(age[:-1])
        unit = age[-1].upper()
        per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.2425}.get(unit)
        if per_year is not None:
            return round(n / per_year, 2)
    birth = _parse_da(ds.get("PatientBirthDate"))
    if birth is None:
        return None
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _parse_da(ds.get(kw))
        if when is not None:
            years = (when - birth).days / 365.2425
            return round(years, 2) if 0 <= years < 150 else None
    return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(items) != n or not all(math.isfinite(v) for v in items):
        return None
    return items


def image_orientation(ds: Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient (6 floats), falling back to the retired ACR-NEMA Image Orientation."""
    for value in (ds.get("ImageOrientationPatient"), ds.get((0x0020, 0x0035))):
        if value is None:
            continue
        raw = value.value if hasattr(value, "value") else value
        vals = _floats(raw, 6)
        if vals is not None:
            return vals
    for item in _functional_group_items(ds):
        if "ImageOrientationPatient" in item:
            vals = _floats(item.ImageOrientationPatient, 6)
            if vals is not None:
                return vals
    return None


def image_position(ds: Dataset) -> tuple[float, float, float] | None:
    """ImagePositionPatient (3 floats), falling back to the retired ACR-NEMA Image Position."""
    for value in (ds.get("ImagePositionPatient"), ds.get((0x0020, 0x0030))):
        if value is None:
            continue
        raw = value.value if hasattr(value, "value") else value
        vals = _floats(raw, 3)
        if vals is not None:
            return (vals[0], vals[1], vals[2])
    return None


def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float] | None:
    """Unit normal (row cosine x column cosine) of an ImageOrientationPatient, None when degenerate."""
    r = orientation[:3]
    c = orientation[3:6]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def _frame_positions(ds: Dataset) -> list[tuple[float, float, float]]:
    out: list[tuple[float, float, float]] = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
        pps = frame.get("PlanePositionSequence")
        if pps:
            vals = _floats(pps[0].get("ImagePositionPatient"), 3)
            if vals is not None:
                out.append((vals[0], vals[1], vals[2]))
    return out


def z_extent_mm(datasets: Sequence[Dataset]) -> float | None:
    """Extent (mm) along the slice normal between the outermost image positions; 0 for one image.

    Works for single-frame series (one position per instance) and enhanced multi-frame objects (one
    position per frame). None when orientation or positions are missing.
    """
    if not datasets:
        return None
    orientation = image_orientation(datasets[0])
    if orientation is None:
        return None
    normal = slice_normal(orientation)
    if normal is None:
        return None
    positions: list[tuple[float, float, float]] = []
    for ds in datasets:
        frames = _frame_positions(ds)
        if frames:
            positions.extend(frames)
        else:
            pos = image_position(ds)
            if pos is not None:
                positions.append(pos)
    if not positions:
        return None
    d = [sum(p[i] * normal[i] for i in range(3)) for p in positions]
    return round(max(d) - min(d), 3)


def summarize(datasets: Sequence[Dataset], series_instance_uid: str | None = None) -> SeriesSummary:
    """Build the routing summary of one series.

    Parameters
    ----------
    datasets
        Headers of the instances of one series (order irrelevant; pixels not needed).
    series_instance_uid
        Overrides the (possibly blank) SeriesInstanceUID of the headers, e.g. with the key chosen by
        ``scan_path`` for a series without UID.

    Returns
    -------
    SeriesSummary
        Attributes from the first instance that has them (series/study level keywords of
        ``SUMMARY_KEYWORDS``, ``PatientAgeYears``, ``TransferSyntaxUID``), ``n_instances`` and
        ``z_extent_mm``. ``NumberOfFrames`` is kept for multi-frame objects.
    """
    attrs: dict[str, Any] = {}
    # each instance is asked only for the keywords no earlier instance had (same values, same order: the
    # first instance that has a keyword gives it); most come from the first, so a 300-slice series
    # costs far fewer look-ups than every keyword of every header
    remaining = list(SUMMARY_KEYWORDS)
    for ds in datasets:
        for kw, value in header_dict(ds, remaining).items():
            attrs.setdefault(kw, value)
        remaining = [kw for kw in remaining if kw not in attrs]
    study = str(attrs.get("StudyInstanceUID") or "")
    series = series_instance_uid or str(attrs.get("SeriesInstanceUID") or "")
    if series_instance_uid and not attrs.get("SeriesInstanceUID"):
        attrs["SeriesInstanceUIDSynthesized"] = True
    return SeriesSummary(
        study_instance_uid=study,
        series_instance_uid=series,
        attributes=attrs,
        n_instances=len(datasets),
        z_extent_mm=z_extent_mm(datasets),
    )
