"""Find the DICOM series in a folder or file: pydicom + stdlib only (no pixel decoding).

Public API
----------
``scan(path) -> ScanResult``
    Everything found: ``series`` (list of ``SeriesFiles``), ``unreadable`` ((path, one-line reason)
    pairs for files that look like DICOM but cannot be read) and ``ignored`` (non-DICOM files and
    DICOMDIR indexes).
    Never raises.
``scan_path(path) -> list[SeriesFiles]``
    ``scan(path).series``; unreadable files are logged at WARNING.
``read_dicom(path, stop_before_pixels=False) -> Dataset``
    Tolerant read (``force=True``; a missing Transfer Syntax UID is filled in from the encoding pydicom
    detected, Implicit VR Little Endian for headless ACR-NEMA style files). Raises ``InputError``.

Grouping: by Series Instance UID; instances whose UID is missing or blank are grouped by geometry
(study, modality, orientation, pixel spacing, rows/columns) and get a deterministic ``2.25.`` UID derived
from that key (``summary.get("SeriesInstanceUIDSynthesized")`` is then True).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.domain import SeriesSummary
from dicomnode.errors import InputError
from dicomnode.imaging.headers import image_orientation, image_position, plain_value, summarize

log = logging.getLogger(__name__)

#: DICOMDIR (an index of a medium, not an image): ignored by scans.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Elements of which at least one must be present for a file without the DICM preamble to count as DICOM.
_IMAGE_HINTS = ("SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "PixelData")


@dataclass(frozen=True)
class InstanceInfo:
    """Per-file header facts needed to group, qualify and sort (from ``stop_before_pixels`` reads)."""

    path: str
    sop_instance_uid: str | None
    instance_number: int | None
    modality: str | None
    sop_class_uid: str | None
    image_type: tuple[str, ...]
    transfer_syntax_uid: str | None
    has_pixel_data: bool
    rows: int | None
    columns: int | None
    number_of_frames: int
    pixel_spacing: tuple[float, float] | None
    image_orientation: tuple[float, ...] | None
    image_position: tuple[float, float, float] | None
    acquisition_number: int | None = None
    #: Where the native (uncompressed) Pixel Data value starts in the file and its length in bytes, as
    #: seen by the header read (None when encapsulated, undefined length or not deferred): lets the loader
    #: read the pixels without parsing the header a second time.
    pixel_offset: int | None = None
    pixel_length: int | None = None


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one series, its routing summary and the per-file header facts."""

    series_instance_uid: str
    summary: SeriesSummary
    instances: tuple[InstanceInfo, ...]
    #: The header-only datasets read by the scan (pixel data and private elements removed), parallel to
    #: ``instances``; empty when the series was built without them. Reused by the loader (rescale,
    #: padding) and the report (SR evidence, SC patient/study) so that no header is read twice.
    headers: tuple[Dataset, ...] = field(default=(), compare=False, repr=False)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(i.path for i in self.instances)

    @property
    def study_instance_uid(self) -> str:
        return self.summary.study_instance_uid


@dataclass(frozen=True)
class ScanResult:
    series: list[SeriesFiles] = field(default_factory=list)
    #: Files that look like DICOM but could not be read: (path, one-line reason).
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    #: Files that are not DICOM at all (ignored).
    ignored: list[str] = field(default_factory=list)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _has_preamble(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _looks_like_dicom(ds: Dataset) -> bool:
    for kw in _IMAGE_HINTS:
        try:
            if kw in ds and ds[kw].value not in (None, b"", ""):
                return True
        except Exception:
            continue
    return False


def read_dicom(path: str | os.PathLike[str], header_only: bool = False) -> Dataset:
    """Read one DICOM file tolerantly (strict on writing, tolerant on reading).

    Parameters
    ----------
    path
        The file.
    header_only
        Do not load the pixel data (values over 4 KiB are deferred, so ``"PixelData" in ds`` still
        tells whether the file has pixels, unlike ``stop_before_pixels``).

    Returns
    -------
    Dataset
        With ``file_meta.TransferSyntaxUID`` always set (filled in from the detected encoding when the
        file has no meta header or the meta lacks it; ``ds.dicomnode_ts_assumed`` is then True).

    Raises
    ------
    InputError
        Not a DICOM file, or the header cannot be parsed.
    """
    p = os.fspath(path)
    preamble = _has_preamble(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, force=True, defer_size=4096 if header_only else None)
            # convert every top-level element now so that parse errors surface here, not later
            for tag in list(ds.keys()):
                if tag.group != 0x7FE0:
                    ds[tag]
    except Exception as exc:
        raise InputError(f"{Path(p).name}: unreadable DICOM header ({_one_line(exc)})") from exc
    if preamble and len(ds) == 0:
        raise InputError(f"{Path(p).name}: DICOM file with no data set after the file meta (truncated?)")
    if not preamble and not _looks_like_dicom(ds):
        raise InputError(f"{Path(p).name}: not a DICOM file (no DICM preamble and no DICOM image attributes)")
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if not str(meta.get("TransferSyntaxUID") or "").strip():
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            implicit, little = True, True
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif little:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.dicomnode_ts_assumed = True
    return ds


def _int(value: Any) -> int | None:
    v = plain_value(value)
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    value = plain_value(ds.get("PixelSpacing"))
    if value is None:
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = ds.get(group)
            if seq and seq[0].get("PixelMeasuresSequence"):
                value = plain_value(seq[0].PixelMeasuresSequence[0].get("PixelSpacing"))
                if value is not None:
                    break
    if isinstance(value, tuple) and len(value) == 2:
        try:
            return (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            return None
    return None


def instance_info(path: str, ds: Dataset) -> InstanceInfo:
    """Extract the per-file facts from a header-only dataset."""
    meta = getattr(ds, "file_meta", None)
    sop = plain_value(ds.get("SOPInstanceUID"))
    if sop is None and meta is not None:
        sop = plain_value(meta.get("MediaStorageSOPInstanceUID"))
    sop_class = plain_value(ds.get("SOPClassUID"))
    if sop_class is None and meta is not None:
        sop_class = plain_value(meta.get("MediaStorageSOPClassUID"))
    image_type = plain_value(ds.get("ImageType"))
    if isinstance(image_type, str):
        image_type = (image_type,)
    ts = plain_value(meta.get("TransferSyntaxUID")) if meta is not None else None
    has_pixels = any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    offset, length = _native_pixel_location(ds)
    return InstanceInfo(
        path=path,
        sop_instance_uid=sop,
        instance_number=_int(ds.get("InstanceNumber")),
        modality=plain_value(ds.get("Modality")),
        sop_class_uid=sop_class,
        image_type=tuple(str(v).upper() for v in image_type) if isinstance(image_type, tuple) else (),
        transfer_syntax_uid=ts,
        has_pixel_data=has_pixels,
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        number_of_frames=_int(ds.get("NumberOfFrames")) or 1,
        pixel_spacing=_pixel_spacing(ds),
        image_orientation=image_orientation(ds),
        image_position=image_position(ds),
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        pixel_offset=offset,
        pixel_length=length,
    )


_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _native_pixel_location(ds: Dataset) -> tuple[int | None, int | None]:
    """(file offset, length) of a deferred, defined-length Pixel Data value, else (None, None)."""
    if _PIXEL_DATA_TAG not in ds:
        return None, None
    try:
        elem = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    except Exception:  # tolerant: the loader then takes the ordinary decoding path
        return None, None
    tell = getattr(elem, "value_tell", None)
    length = getattr(elem, "length", None)
    if not isinstance(tell, int) or not isinstance(length, int) or length in (0, _UNDEFINED_LENGTH):
        return None, None
    return tell, length


def _iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _strip_bulk(ds: Dataset) -> None:
    """Drop pixel data and private elements kept for the summary (thousands of headers stay small)."""
    tags = list(ds.keys())  # iterating the Dataset itself would load the deferred pixel data
    for tag in tags:
        if tag.group == 0x7FE0:
            del ds[tag]
    ds.remove_private_tags()


def _geometry_key(info: InstanceInfo, study: str) -> str:
    iop = tuple(round(v, 3) for v in info.image_orientation) if info.image_orientation else None
    ps = tuple(round(v, 4) for v in info.pixel_spacing) if info.pixel_spacing else None
    return repr((study, info.modality, iop, ps, info.rows, info.columns))


def synthesized_uid(key: str) -> str:
    """Deterministic ``2.25.<int>`` UID from a grouping key (for series whose UID is blank)."""
    digest = hashlib.sha256(key.encode()).digest()[:16]
    return f"2.25.{uuid.UUID(bytes=digest).int}"


def scan(path: str | os.PathLike[str]) -> ScanResult:
    """Find every DICOM series under ``path`` (a folder, recursively, or a single file).

    Parameters
    ----------
    path
        Folder or file. File names and order do not matter; non-DICOM files are ignored.

    Returns
    -------
    ScanResult
        Series sorted by (study, series number, UID); never raises.
    """
    root = Path(path)
    result = ScanResult()
    if not root.exists():
        result.unreadable.append((str(root), "path does not exist"))
        return result
    groups: dict[str, list[tuple[InstanceInfo, Dataset]]] = {}
    blank_uid: set[str] = set()
    for file in _iter_files(root):
        p = str(file)
        try:
            ds = read_dicom(p, header_only=True)
            info = instance_info(p, ds)
            _strip_bulk(ds)
            if info.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
                log.debug("ignored DICOMDIR %s", p)
                result.ignored.append(p)
                continue
        except InputError as exc:
            if "not a DICOM file" in str(exc):
                log.debug("ignored non-DICOM file %s", p)
                result.ignored.append(p)
            else:
                result.unreadable.append((p, str(exc)))
            continue
        except Exception as exc:  # a scan never raises: anything odd is reported per file
            result.unreadable.append((p, f"{file.name}: {_one_line(exc)}"))
            continue
        uid = plain_value(ds.get("SeriesInstanceUID"))
        if uid is None:
            study = str(plain_value(ds.get("StudyInstanceUID")) or "")
            key = synthesized_uid(_geometry_key(info, study))
            blank_uid.add(key)
        else:
            key = str(uid)
        groups.setdefault(key, []).append((info, ds))
    for key, members in groups.items():
        datasets = [ds for _, ds in members]
        summary = summarize(datasets, series_instance_uid=key if key in blank_uid else None)
        instances = tuple(info for info, _ in members)
        result.series.append(
            SeriesFiles(
                series_instance_uid=key, summary=summary, instances=instances, headers=tuple(datasets)
            )
        )
    result.series.sort(
        key=lambda s: (
            s.summary.study_instance_uid,
            s.summary.get("SeriesNumber") or 0,
            s.series_instance_uid,
        )
    )
    return result


def scan_path(path: str | os.PathLike[str]) -> list[SeriesFiles]:
    """The series found under ``path`` (see ``scan``); unreadable files are logged, never raised."""
    result = scan(path)
    for p, reason in result.unreadable:
        log.warning("unreadable DICOM file %s: %s", Path(p).name, reason)
    return result.series


def transfer_syntax_name(uid: str | None) -> str:
    """Human name of a transfer syntax UID (the UID itself when unknown)."""
    if not uid:
        return "unknown"
    name = UID(uid).name
    return f"{name} {uid}" if name and name != uid else uid
