"""Strict encode: the source attributes that go into what we write carry only valid values.

Real PACS and de-identification tools send invalid values (a UUID in PatientBirthDate, ``sixty`` in
PatientAge, a lower-case sex, a time with letters). We read them tolerantly (``imaging.headers``: such a
value counts as missing), but we never copy one into an SR or SC: highdicom copies the patient, study and
equipment modules from the source datasets, so every source dataset passes through :func:`sanitized_source`
first. An invalid value becomes empty (valid for Type 2 and 3 attributes; the patient and study attributes
highdicom copies are of those types), so the object stays valid for ``dciodvfy``. UIDs are the exception:
they are copied as received, because the outputs must land in the source study and reference its images.

The check itself is ``imaging.headers.element_is_valid`` (the rules the header reading uses too); the SR
(``sr.build_sr``) and the SC (``sc.build_sc``) both copy from sanitised datasets.
"""

from __future__ import annotations

import logging

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicomnode.imaging.headers import element_is_valid

log = logging.getLogger(__name__)


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
    for tag in list(ds.keys()):
        if tag.group == 0x7FE0:  # pixel data: not needed to copy modules
            continue
        try:
            elem = ds[tag]
        except Exception:  # a raw value pydicom cannot even convert (e.g. letters in a DS)
            raw_vr = str(getattr(ds.get_item(tag), "VR", None) or "UN")
            out.add(DataElement(tag, raw_vr if raw_vr != "SQ" else "UN", None))
            emptied.append(str(tag))
            continue
        # UIDs are copied as received, even one a strict reader calls invalid (a leading zero, seen in the
        # wild): the outputs must land in the source study and reference the very images analysed
        if tag.group & 0x0001 == 0 and elem.VR != "UI" and not element_is_valid(elem):
            out.add(DataElement(tag, elem.VR, None))
            emptied.append(elem.keyword or str(tag))
            continue
        out.add(elem)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = meta
    if emptied:
        log.debug("invalid source values left empty in what we write: %s", ", ".join(emptied))
    return out
