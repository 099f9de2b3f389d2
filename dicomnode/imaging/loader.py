"""DICOM series (or NIfTI file) -> validated HU ``Volume`` with exact LPS geometry.

Public API
----------
``scan_path(path) -> list[SeriesFiles]`` / ``scan(path) -> ScanResult``
    Find series in a folder (recursive) or file; re-exported from ``dicomnode.imaging.series``.
``load_series(series: SeriesFiles) -> Volume``
    Decode one series into a float32 HU volume ``[k, j, i]`` with its (i, j, k) -> LPS affine
    (conventions in ``dicomnode.imaging.volume``). Single-frame CT series and enhanced multi-frame CT
    (per-frame functional groups) are supported.
``load_path(path, require_ct_hu=True) -> LoadedInput``
    What ``dicomnode analyze`` calls: a ``.nii``/``.nii.gz`` file gives ``volume`` (checked for
    plausible CT HU unless ``require_ct_hu=False``); a DICOM folder/file gives ``series`` (load each with
    ``load_series``) plus ``unreadable`` files. Raises ``InputError`` when nothing usable is found.

Errors (one-line messages, never other exception types for bad input)
----------------------------------------------------------------------
``NotQualifyingError``: not CT (MR, PT, NM, SR, SEG, missing modality), no pixel data, localizer/scout,
colour images, non-CT SOP classes.
``InputError``: undecodable or truncated pixel data, missing or inconsistent geometry, gaps or
conflicting duplicate slice positions, gantry tilt.

Typical use (what ``dicomnode analyze`` does)::

    loaded = load_path(path)
    if loaded.volume is not None:            # NIfTI
        volumes = [loaded.volume]
    else:                                    # DICOM: route on s.summary, then load the chosen series
        volumes = [load_series(s) for s in loaded.series]

``Volume.header`` holds the first slice's ``header_dict`` (DICOM keywords, plain values), series-level
summary attributes, and loader notes in snake_case: ``n_slices``, ``slice_spacing_mm``,
``padding_voxels``, ``outside_fov_voxels``, ``dropped_duplicate_slices``, ``dropped_localizer_images``,
``transfer_syntax_assumed``, ``source_format`` ("dicom").

Each file is parsed once: ``scan`` keeps the header-only datasets (``SeriesFiles.headers``) and the
offset of native Pixel Data; ``load_series`` then reads uncompressed little-endian pixels straight from that
offset (checking that the element is still there) and rescales them in float32, in a small thread pool.
Anything unusual (compressed, big endian, multi-frame, missing attributes, a file changed since the scan)
takes the ordinary pydicom decoding, with the same result.

Sorting is by position along the slice normal (row x column cosine), never by InstanceNumber. Stored
values are rescaled with RescaleSlope/Intercept (or the Modality LUT); Pixel Padding Value (and range)
and values below -2048 HU (outside the reconstruction circle; not a physical attenuation) are set to
air, -1024 HU, and counted in the header (``padding_voxels``, ``outside_fov_voxels``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicomnode.errors import InputError, NotQualifyingError
from dicomnode.imaging.headers import INSTANCE_KEYWORDS, header_dict, plain_value, slice_normal
from dicomnode.imaging.series import (
    InstanceInfo,
    ScanResult,
    SeriesFiles,
    read_dicom,
    scan,
    scan_path,
    transfer_syntax_name,
)
from dicomnode.imaging.volume import Volume
from dicomnode.vocab import CT_IMAGE_STORAGE_SOP_CLASSES, MULTIFRAME_CT_SOP_CLASSES

__all__ = [
    "AIR_HU",
    "InstanceInfo",
    "LoadedInput",
    "ScanResult",
    "SeriesFiles",
    "load_path",
    "load_series",
    "scan",
    "scan_path",
]

log = logging.getLogger(__name__)

#: HU written where the scanner marked padding / outside the field of view.
AIR_HU = -1024.0
#: Below this (HU) a value is a fill marker, not an attenuation (air is about -1000 HU).
FILL_BELOW_HU = -2048.0


#: Tolerances (mm / cosine units). Orientation cosines agree to ~0.06 deg; positions closer than
#: ``_DUP_MM`` along the normal are the same slice.
_ORIENT_TOL = 1e-3
_DUP_MM = 0.05

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LoadedInput:
    """What ``load_path`` found: DICOM series to load, or one NIfTI volume."""

    series: tuple[SeriesFiles, ...] = ()
    volume: Volume | None = None
    unreadable: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()


@dataclass
class _Slice:
    position: npt.NDArray[np.float64]
    orientation: tuple[float, ...]
    spacing: tuple[float, float]  # (row spacing, column spacing) = PixelSpacing
    sop_instance_uid: str | None
    frame_number: int | None
    path: str
    pixels: Callable[[], FloatArray]  # decoded HU of this slice
    d: float = 0.0  # position along the normal
    _cache: FloatArray | None = field(default=None, repr=False)

    def hu(self) -> FloatArray:
        if self._cache is None:
            self._cache = self.pixels()
        return self._cache


@dataclass
class _Counters:
    padding: int = 0
    outside_fov: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, padding: int = 0, outside_fov: int = 0) -> None:
        # slices are decoded by a thread pool: += on a shared int is not atomic
        with self._lock:
            self.padding += padding
            self.outside_fov += outside_fov


#: Native (uncompressed) little-endian transfer syntaxes whose Pixel Data the loader reads directly.
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: (7FE0,0010) as stored in little endian.
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
#: Slices decoded by at most this many threads (file reads and numpy release the GIL).
MAX_DECODE_THREADS = 4


def _decode_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DECODE_THREADS, cpus))


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """True for ``.nii`` / ``.nii.gz`` file names."""
    name = os.fspath(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def load_path(path: str | os.PathLike[str], require_ct_hu: bool = True) -> LoadedInput:
    """Open what ``dicomnode analyze`` was given.

    Parameters
    ----------
    path
        A DICOM folder (searched recursively), a DICOM file, or a ``.nii``/``.nii.gz`` file.
    require_ct_hu
        For NIfTI (no modality in the header): run ``check_ct_hu`` and raise ``NotQualifyingError``
        when the intensities do not look like CT HU.

    Returns
    -------
    LoadedInput
        ``volume`` for NIfTI; ``series`` (+ ``unreadable``, ``ignored``) for DICOM.

    Raises
    ------
    InputError
        Path missing, or no DICOM series found (the reason of the first unreadable file is given).
    NotQualifyingError
        NIfTI whose values are not plausible CT HU.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_file() and is_nifti(p):
        from dicomnode.imaging.nifti import check_ct_hu, load_nifti

        volume = load_nifti(p)
        if require_ct_hu:
            check_ct_hu(volume)
        return LoadedInput(volume=volume)
    result = scan(p)
    if not result.series:
        if result.unreadable:
            first = result.unreadable[0][1]
            more = (
                f" (and {len(result.unreadable) - 1} more unreadable)" if len(result.unreadable) > 1 else ""
            )
            raise InputError(f"{first}{more}")
        if p.is_file():
            raise InputError(f"{p.name}: not a DICOM file (no DICM preamble and no DICOM image attributes)")
        raise InputError(f"{p}: no DICOM series found")
    return LoadedInput(
        series=tuple(result.series),
        unreadable=tuple(result.unreadable),
        ignored=tuple(result.ignored),
    )


# --------------------------------------------------------------------------------------------------
# qualification (headers only)


def _not_qualifying_reason(info: InstanceInfo) -> str | None:
    name = Path(info.path).name
    if not info.has_pixel_data:
        what = info.modality or "object"
        return f"{name}: {what} object has no pixel data (not an image)"
    if info.modality is None:
        return f"{name}: no Modality in the header; not a CT image"
    if info.modality.upper() != "CT":
        return f"{name}: modality {info.modality} is not CT"
    if info.sop_class_uid and info.sop_class_uid not in CT_IMAGE_STORAGE_SOP_CLASSES:
        from pydicom.uid import UID

        return f"{name}: SOP class {UID(info.sop_class_uid).name} is not a CT image"
    if "LOCALIZER" in info.image_type:
        return f"{name}: localizer (scout) image, not an axial series"
    return None


def _qualify(series: SeriesFiles) -> tuple[list[InstanceInfo], int]:
    """Instances to load and the number of localizer images dropped; raise when none qualify."""
    keep: list[InstanceInfo] = []
    localizers = 0
    reasons: list[str] = []
    for info in series.instances:
        reason = _not_qualifying_reason(info)
        if reason is None:
            keep.append(info)
        else:
            if "LOCALIZER" in info.image_type:
                localizers += 1
            reasons.append(reason)
    if not keep:
        raise NotQualifyingError(reasons[0])
    if reasons and localizers == len(reasons):
        # scouts stored in the same series as the axial images: tolerate, drop them
        log.info("series %s: dropped %d localizer image(s)", series.series_instance_uid, localizers)
    elif reasons:
        raise NotQualifyingError(f"series mixes CT images with other objects: {reasons[0]}")
    return keep, localizers


# --------------------------------------------------------------------------------------------------
# decoding


def _prepare_pixel_module(ds: Dataset, name: str) -> None:
    """Fill in what old headers omit (tolerant reading) or refuse what cannot be CT HU."""
    spp = plain_value(ds.get("SamplesPerPixel"))
    pi = plain_value(ds.get("PhotometricInterpretation"))
    if spp is not None and int(spp) != 1:
        raise NotQualifyingError(f"{name}: colour image ({spp} samples per pixel), not CT attenuation")
    if pi is not None and str(pi).upper() not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotQualifyingError(f"{name}: photometric interpretation {pi}, not CT attenuation")
    for kw in ("Rows", "Columns", "BitsAllocated"):
        if plain_value(ds.get(kw)) is None:
            raise InputError(f"{name}: missing {kw}; cannot interpret the pixel data")
    if spp is None:
        ds.SamplesPerPixel = 1
    if pi is None:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if plain_value(ds.get("BitsStored")) is None:
        ds.BitsStored = int(ds.BitsAllocated)
    if plain_value(ds.get("HighBit")) is None:
        ds.HighBit = int(ds.BitsStored) - 1
    if plain_value(ds.get("PixelRepresentation")) is None:
        ds.PixelRepresentation = 0


def _decode_error(name: str, ts: str | None, exc: BaseException) -> InputError:
    text = " ".join(str(exc).split())
    tsn = transfer_syntax_name(ts)
    if "less than expected" in text or "truncat" in text.lower() or isinstance(exc, EOFError):
        return InputError(f"{name}: truncated pixel data ({text[:160]})")
    if (
        isinstance(exc, NotImplementedError)
        or "not supported" in text
        or "no pixel data handler" in text.lower()
    ):
        return InputError(f"{name}: cannot decode pixel data (transfer syntax {tsn})")
    return InputError(f"{name}: cannot decode pixel data (transfer syntax {tsn}): {text[:160]}")


def _pixel_array(ds: Dataset, name: str) -> npt.NDArray[Any]:
    ts = plain_value(ds.file_meta.get("TransferSyntaxUID")) if hasattr(ds, "file_meta") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # any decoder failure is bad input for us
        if getattr(ds, "dicomnode_ts_assumed", False):
            name = f"{name} (no transfer syntax in the file; assumed from its encoding)"
        raise _decode_error(name, ts, exc) from exc
    return np.asarray(arr)


def _padding_mask(raw: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.bool_] | None:
    pad = plain_value(ds.get("PixelPaddingValue"))
    if pad is None or not isinstance(pad, int):
        return None
    limit = plain_value(ds.get("PixelPaddingRangeLimit"))
    values = [pad] if not isinstance(limit, int) else [pad, limit]
    if np.issubdtype(raw.dtype, np.unsignedinteger):
        # a padding value written with the other signedness: compare the bit pattern
        bits = raw.dtype.itemsize * 8
        values = [v & ((1 << bits) - 1) if v < 0 else v for v in values]
    elif np.issubdtype(raw.dtype, np.signedinteger):
        bits = raw.dtype.itemsize * 8
        values = [v - (1 << bits) if v >= (1 << (bits - 1)) else v for v in values]
    lo, hi = min(values), max(values)
    mask: npt.NDArray[np.bool_] = (raw >= lo) & (raw <= hi)
    return mask


def _rescale(
    raw: npt.NDArray[Any], slope: float, intercept: float, ds: Dataset | None, counters: _Counters
) -> FloatArray:
    if ds is not None and "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        from pydicom.pixels.processing import apply_modality_lut

        hu: npt.NDArray[Any] = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    elif slope == 1.0 and float(np.float32(intercept)) == intercept and raw.dtype.itemsize <= 2:
        # the common CT case, computed in float32 directly: 16-bit integers and an intercept exact in
        # float32 give the same single rounding as the float64 route, at half the memory traffic
        hu = raw.astype(np.float32)
        if intercept:
            hu += np.float32(intercept)
    else:
        hu = raw.astype(np.float64) * slope + intercept
    n_pad = 0
    if ds is not None:
        mask = _padding_mask(raw, ds)
        if mask is not None:
            n_pad = int(np.count_nonzero(mask))
            hu[mask] = AIR_HU
    fill = hu < FILL_BELOW_HU
    n_fill = int(np.count_nonzero(fill))
    if n_fill:
        hu[fill] = AIR_HU
    if n_pad or n_fill:
        counters.add(padding=n_pad, outside_fov=n_fill)
    out: FloatArray = np.asarray(hu, dtype=np.float32)  # no copy when already float32
    return out


def _float(value: Any, default: float) -> float:
    v = plain_value(value)
    try:
        f = float(v) if v is not None else default
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _native_raw(info: InstanceInfo, hdr: Dataset | None) -> npt.NDArray[Any] | None:
    """The stored values of one native single-frame image, read straight from the file at the Pixel Data
    offset seen by the scan (no second header parse); None whenever anything is unusual, so that the
    ordinary pydicom decoding (and its precise error messages) takes over.
    """
    if hdr is None or info.pixel_offset is None or info.pixel_length is None or info.number_of_frames != 1:
        return None
    ts = info.transfer_syntax_uid
    if ts not in (_IMPLICIT_LE, _EXPLICIT_LE) or getattr(hdr, "dicomnode_ts_assumed", False):
        return None
    if "ModalityLUTSequence" in hdr and "RescaleSlope" not in hdr:
        return None
    rows, cols = plain_value(hdr.get("Rows")), plain_value(hdr.get("Columns"))
    bits = plain_value(hdr.get("BitsAllocated"))
    stored = plain_value(hdr.get("BitsStored"))
    rep = plain_value(hdr.get("PixelRepresentation"))
    spp = plain_value(hdr.get("SamplesPerPixel"))
    pi = str(plain_value(hdr.get("PhotometricInterpretation")) or "").upper()
    ints = (rows, cols, bits, stored, rep, spp)
    if not all(isinstance(v, int) for v in ints) or spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    assert isinstance(rows, int) and isinstance(cols, int) and isinstance(bits, int)
    assert isinstance(stored, int) and isinstance(rep, int)
    if bits not in (8, 16, 32) or not 0 < stored <= bits or rep not in (0, 1) or rows < 1 or cols < 1:
        return None
    nbytes = rows * cols * (bits // 8)
    if info.pixel_length < nbytes:
        return None  # truncated: let pydicom say so
    head_len = 8 if ts == _IMPLICIT_LE else 12  # tag + (VR + reserved) + 4-byte length
    if info.pixel_offset < head_len:
        return None
    try:
        with open(info.path, "rb") as fh:
            fh.seek(info.pixel_offset - head_len)
            head = fh.read(head_len)
            buf = fh.read(nbytes)
    except OSError:
        return None
    # the file must still be the one scanned: Pixel Data element header where it was, same length
    if len(buf) != nbytes or head[:4] != _PIXEL_DATA_TAG_LE:
        return None
    if int.from_bytes(head[-4:], "little") != info.pixel_length:
        return None
    dtype = np.dtype(f"<{'i' if rep == 1 else 'u'}{bits // 8}")
    raw: npt.NDArray[Any] = np.frombuffer(buf, dtype=dtype).reshape(rows, cols)
    if stored < bits:
        # as pydicom does for native data: ignore the unused high bits (sign-extending signed values)
        shift = bits - stored
        raw = np.right_shift(np.left_shift(raw, shift), shift)
    return raw


def _single_frame_pixels(
    info: InstanceInfo, counters: _Counters, hdr: Dataset | None = None
) -> Callable[[], FloatArray]:
    def decode() -> FloatArray:
        name = Path(info.path).name
        raw_fast = _native_raw(info, hdr)
        if raw_fast is not None and hdr is not None:
            slope = _float(hdr.get("RescaleSlope"), 1.0)
            intercept = _float(hdr.get("RescaleIntercept"), 0.0)
            return _rescale(raw_fast, slope, intercept, hdr, counters)
        ds = read_dicom(info.path)
        _prepare_pixel_module(ds, name)
        raw = _pixel_array(ds, name)
        if raw.ndim != 2:
            raise InputError(f"{name}: expected one 2-D frame, got pixel array of shape {raw.shape}")
        slope = _float(ds.get("RescaleSlope"), 1.0)
        intercept = _float(ds.get("RescaleIntercept"), 0.0)
        return _rescale(raw, slope, intercept, ds, counters)

    return decode


# --------------------------------------------------------------------------------------------------
# geometry


def _check_same(slices: Sequence[_Slice], what: str) -> None:
    o0 = np.asarray(slices[0].orientation)
    s0 = np.asarray(slices[0].spacing)
    for s in slices[1:]:
        if np.max(np.abs(np.asarray(s.orientation) - o0)) > _ORIENT_TOL:
            raise InputError(f"{what}: images have different orientations; not one volume")
        if np.max(np.abs(np.asarray(s.spacing) - s0)) > 1e-3 * max(1.0, float(s0.max())):
            raise InputError(f"{what}: images have different pixel spacings; not one volume")


def _drop_duplicates(slices: list[_Slice], what: str) -> tuple[list[_Slice], int]:
    out: list[_Slice] = [slices[0]]
    dropped = 0
    for s in slices[1:]:
        prev = out[-1]
        if abs(s.d - prev.d) >= _DUP_MM:
            out.append(s)
            continue
        same_pos = np.allclose(s.position, prev.position, atol=_DUP_MM)
        if same_pos and np.array_equal(s.hu(), prev.hu()):
            dropped += 1  # the same image received twice (e.g. resent with another SOP UID)
            continue
        raise InputError(
            f"{what}: two different images at the same slice position ({s.d:.2f} mm along the normal); "
            "several acquisitions or reconstructions mixed in one series?"
        )
    return out, dropped


def _check_spacing(slices: Sequence[_Slice], what: str) -> float:
    d = np.array([s.d for s in slices], dtype=np.float64)
    diffs = np.diff(d)
    step = float(np.median(diffs))
    tol = max(0.02, 0.1 * step)
    for k, diff in enumerate(diffs):
        if abs(diff - step) > tol:
            kind = "gap" if diff > step else "uneven step"
            raise InputError(
                f"{what}: uneven slice spacing: {kind} of {diff:.2f} mm between slices at "
                f"{d[k]:.2f} and {d[k + 1]:.2f} mm (expected {step:.2f} mm); missing slices?"
            )
    mean_step = (d[-1] - d[0]) / (len(d) - 1)
    drift = np.abs(d - (d[0] + mean_step * np.arange(len(d))))
    if float(drift.max()) > max(0.05, 0.2 * mean_step):
        raise InputError(f"{what}: irregular slice positions (deviation {float(drift.max()):.2f} mm)")
    return float(mean_step)


def _tilt(
    slices: Sequence[_Slice], normal: npt.NDArray[np.float64]
) -> tuple[float, list[tuple[float, float]]]:
    """Gantry tilt angle (deg) and each slice's in-plane offset (rows, columns) from the normal line.

    A tilted acquisition reconstructed in the gantry plane keeps axial-looking orientation cosines while
    successive Image Positions drift sideways: the stack is sheared, not orthogonal.
    """
    p0 = slices[0].position
    row_cos = np.asarray(slices[0].orientation[:3], dtype=np.float64)
    col_cos = np.asarray(slices[0].orientation[3:6], dtype=np.float64)
    row_spacing, col_spacing = slices[0].spacing
    offsets: list[tuple[float, float]] = []
    for s in slices:
        lateral = (s.position - p0) - normal * (s.d - slices[0].d)
        # rounded to 1/1000 pixel: positions are written with limited precision anyway
        offsets.append(
            (
                round(float(lateral @ col_cos) / row_spacing, 3),
                round(float(lateral @ row_cos) / col_spacing, 3),
            )
        )
    last = slices[-1]
    along = last.d - slices[0].d
    shift = float(np.linalg.norm((last.position - p0) - normal * along))
    angle = math.degrees(math.atan2(shift, abs(along))) if along else 0.0
    return angle, offsets


def _assemble(
    slices: list[_Slice], what: str, single_slice_spacing: float, resample_tilt: bool = False
) -> tuple[FloatArray, npt.NDArray[np.float64], list[_Slice], int, float, float]:
    """Sort, check and stack the slices; returns (data, affine, slices used, dropped, step, tilt deg)."""
    _check_same(slices, what)
    orientation = slices[0].orientation
    normal_t = slice_normal(orientation)
    if normal_t is None:
        raise InputError(f"{what}: degenerate ImageOrientationPatient {orientation}")
    normal = np.asarray(normal_t, dtype=np.float64)
    for s in slices:
        s.d = float(np.dot(normal, s.position))
    slices.sort(key=lambda s: s.d)
    slices, dropped = _drop_duplicates(slices, what)
    angle, offsets = 0.0, [(0.0, 0.0)] * len(slices)
    if len(slices) > 1:
        step = _check_spacing(slices, what)
        angle, offsets = _tilt(slices, normal)
        # a shear below half a pixel over the whole stack is invisible at this resolution
        sheared = max(abs(v) for off in offsets for v in off) > 0.5
        if sheared and not resample_tilt:
            raise InputError(
                f"{what}: gantry tilt of {angle:.1f} deg not supported "
                "(slice positions are not along the slice normal)"
            )
        if not sheared:
            angle, offsets = 0.0, [(0.0, 0.0)] * len(slices)
    else:
        step = single_slice_spacing
    first = slices[0].hu()
    rows, cols = first.shape
    data = np.empty((len(slices), rows, cols), dtype=np.float32)

    def fill(k: int) -> None:
        s = slices[k]
        hu = s.hu()
        if hu.shape != (rows, cols):
            raise InputError(f"{what}: images have different sizes ({hu.shape} vs {(rows, cols)})")
        if offsets[k] != (0.0, 0.0):
            # move slice k onto the orthogonal grid of slice 0: output[j, i] = input[j - dj, i - di]
            # (linear interpolation in-plane only; what falls outside the image becomes air)
            from scipy import ndimage

            hu = ndimage.shift(hu, offsets[k], order=1, mode="grid-constant", cval=AIR_HU).astype(np.float32)
        data[k] = hu
        s._cache = None  # free per-slice memory as we go

    threads = _decode_threads() if len(slices) >= 16 else 1
    if threads > 1:
        # file reads, decoders and numpy release the GIL for much of their time; results are consumed in
        # slice order, so the first failing slice is the one reported, as in the serial loop
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dicomnode-decode") as pool:
            for _ in pool.map(fill, range(len(slices))):
                pass
    else:
        for k in range(len(slices)):
            fill(k)
    # PatientPosition (HFS/FFS/prone) is already encoded in IPP/IOP: the affine follows them only
    row_cos = np.asarray(orientation[:3], dtype=np.float64)
    col_cos = np.asarray(orientation[3:6], dtype=np.float64)
    row_spacing, col_spacing = slices[0].spacing
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = slices[0].position
    return data, affine, slices, dropped, step, angle


# --------------------------------------------------------------------------------------------------
# loading


def _spacing_of(ds_or_info: InstanceInfo, name: str) -> tuple[float, float]:
    if ds_or_info.pixel_spacing is None:
        raise InputError(f"{name}: no PixelSpacing; geometry unknown")
    ps = ds_or_info.pixel_spacing
    if not all(v > 0 for v in ps):
        raise InputError(f"{name}: invalid PixelSpacing {ps}")
    return ps


def _single_slice_spacing(ds: Dataset | None) -> float:
    if ds is None:
        return 1.0
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        v = _float(ds.get(kw), 0.0)
        if v > 0:
            return abs(v)
    return 1.0


def load_series(series: SeriesFiles, resample_tilt: bool = False) -> Volume:
    """Decode one series into a HU ``Volume``.

    Parameters
    ----------
    series
        As returned by ``scan_path``.
    resample_tilt
        A gantry-tilted (sheared) stack is refused by default. When True, each slice is shifted in its
        own plane onto the orthogonal grid of the first slice (linear interpolation, air outside);
        ``header["gantry_tilt_resampled_deg"]`` then records the angle.

    Returns
    -------
    Volume
        float32 HU ``[k, j, i]``, affine (i, j, k) -> LPS mm, ``header`` (first slice's
        ``header_dict`` + series attributes + loader notes), SOP Instance UIDs (and frame numbers for
        multi-frame) of the slices in sorted order.

    Raises
    ------
    NotQualifyingError
        Not a CT image series (modality, no pixel data, localizer, colour).
    InputError
        Undecodable/truncated pixels, missing or inconsistent geometry, gaps, conflicting duplicates,
        gantry tilt (unless ``resample_tilt``).
    """
    what = f"series {series.series_instance_uid}"
    instances, localizers = _qualify(series)
    multiframe = [
        i for i in instances if i.number_of_frames > 1 or i.sop_class_uid in MULTIFRAME_CT_SOP_CLASSES
    ]
    if multiframe:
        if len(instances) > 1:
            raise InputError(
                f"{what}: {len(instances)} instances including a multi-frame object; not supported"
            )
        return _load_multiframe(series, instances[0], localizers, resample_tilt)
    counters = _Counters()
    slices: list[_Slice] = []
    headers = dict(zip(series.paths, series.headers, strict=True)) if series.headers else {}
    for info in instances:
        name = Path(info.path).name
        if info.image_orientation is None or info.image_position is None:
            if len(instances) > 1:
                raise InputError(
                    f"{name}: no ImagePositionPatient/ImageOrientationPatient; cannot sort slices"
                )
            raise InputError(f"{name}: no ImagePositionPatient/ImageOrientationPatient; geometry unknown")
        slices.append(
            _Slice(
                position=np.asarray(info.image_position, dtype=np.float64),
                orientation=info.image_orientation,
                spacing=_spacing_of(info, name),
                sop_instance_uid=info.sop_instance_uid,
                frame_number=None,
                path=info.path,
                pixels=_single_frame_pixels(info, counters, headers.get(info.path)),
            )
        )
    single = None
    if len(slices) == 1:
        first_ds = read_dicom(slices[0].path, header_only=True)
        single = _single_slice_spacing(first_ds)
    data, affine, used, dropped, step, tilt = _assemble(slices, what, single or 1.0, resample_tilt)
    first_header = headers.get(used[0].path) or read_dicom(used[0].path, header_only=True)
    header = _volume_header(first_header, series, len(used), step, counters, dropped, localizers, tilt)
    return Volume(
        data=data,
        affine=affine,
        header=header,
        slice_sop_instance_uids=tuple(s.sop_instance_uid for s in used),
        slice_frame_numbers=tuple(None for _ in used),
        source=tuple(s.path for s in used),
    )


def _volume_header(
    ds: Dataset,
    series: SeriesFiles,
    n_slices: int,
    step: float,
    counters: _Counters,
    dropped: int,
    localizers: int,
    tilt_deg: float = 0.0,
) -> dict[str, Any]:
    header = header_dict(ds, INSTANCE_KEYWORDS)
    for kw, value in series.summary.attributes.items():
        header.setdefault(kw, value)
    header["SeriesInstanceUID"] = series.series_instance_uid
    header["n_slices"] = n_slices
    header["slice_spacing_mm"] = round(step, 6)
    header["padding_voxels"] = counters.padding
    header["outside_fov_voxels"] = counters.outside_fov
    header["dropped_duplicate_slices"] = dropped
    header["dropped_localizer_images"] = localizers
    header["transfer_syntax_assumed"] = bool(getattr(ds, "dicomnode_ts_assumed", False))
    header["source_format"] = "dicom"
    if tilt_deg:
        header["gantry_tilt_resampled_deg"] = round(tilt_deg, 3)
    return header


def _fg_item(frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    for group in (frame, shared):
        if group is None:
            continue
        seq = group.get(keyword)
        if seq:
            item: Dataset = seq[0]
            return item
    return None


def _load_multiframe(series: SeriesFiles, info: InstanceInfo, localizers: int, resample_tilt: bool) -> Volume:
    name = Path(info.path).name
    ds = read_dicom(info.path)
    _prepare_pixel_module(ds, name)
    n_frames = int(plain_value(ds.get("NumberOfFrames")) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    if len(per_frame) != n_frames:
        raise InputError(
            f"{name}: multi-frame object without per-frame functional groups for each of its {n_frames} "
            "frames; frame positions unknown"
        )
    raw = _pixel_array(ds, name)
    if raw.ndim == 2:
        raw = raw[np.newaxis]
    if raw.ndim != 3 or raw.shape[0] != n_frames:
        raise InputError(f"{name}: pixel array of shape {raw.shape} does not match {n_frames} frames")
    counters = _Counters()
    slices: list[_Slice] = []
    top_slope = _float(ds.get("RescaleSlope"), 1.0)
    top_intercept = _float(ds.get("RescaleIntercept"), 0.0)
    for f in range(n_frames):
        frame = per_frame[f]
        ftype = _fg_item(frame, shared, "CTImageFrameTypeSequence")
        frame_type = plain_value(ftype.get("FrameType")) if ftype is not None else None
        if isinstance(frame_type, tuple) and "LOCALIZER" in (str(v).upper() for v in frame_type):
            raise NotQualifyingError(f"{name}: frame {f + 1} is a localizer (scout), not an axial series")
        pos_item = _fg_item(frame, shared, "PlanePositionSequence")
        ori_item = _fg_item(frame, shared, "PlaneOrientationSequence")
        pm_item = _fg_item(frame, shared, "PixelMeasuresSequence")
        pos = plain_value(pos_item.get("ImagePositionPatient")) if pos_item is not None else None
        ori = plain_value(ori_item.get("ImageOrientationPatient")) if ori_item is not None else None
        ps = plain_value(pm_item.get("PixelSpacing")) if pm_item is not None else None
        if not (isinstance(pos, tuple) and len(pos) == 3 and isinstance(ori, tuple) and len(ori) == 6):
            raise InputError(f"{name}: frame {f + 1} has no plane position/orientation; geometry unknown")
        if not (isinstance(ps, tuple) and len(ps) == 2 and all(float(v) > 0 for v in ps)):
            raise InputError(f"{name}: frame {f + 1} has no valid PixelSpacing; geometry unknown")
        pvt = _fg_item(frame, shared, "PixelValueTransformationSequence")
        slope = _float(pvt.get("RescaleSlope"), top_slope) if pvt is not None else top_slope
        intercept = _float(pvt.get("RescaleIntercept"), top_intercept) if pvt is not None else top_intercept

        def pixels(f: int = f, slope: float = slope, intercept: float = intercept) -> FloatArray:
            return _rescale(raw[f], slope, intercept, ds, counters)

        slices.append(
            _Slice(
                position=np.asarray([float(v) for v in pos], dtype=np.float64),
                orientation=tuple(float(v) for v in ori),
                spacing=(float(ps[0]), float(ps[1])),
                sop_instance_uid=info.sop_instance_uid,
                frame_number=f + 1,
                path=info.path,
                pixels=pixels,
            )
        )
    single = None
    if n_frames == 1:
        pm_item = _fg_item(per_frame[0], shared, "PixelMeasuresSequence")
        single = _single_slice_spacing(pm_item) if pm_item is not None else 1.0
    data, affine, used, dropped, step, tilt = _assemble(slices, name, single or 1.0, resample_tilt)
    header = _volume_header(ds, series, len(used), step, counters, dropped, localizers, tilt)
    return Volume(
        data=data,
        affine=affine,
        header=header,
        slice_sop_instance_uids=tuple(s.sop_instance_uid for s in used),
        slice_frame_numbers=tuple(s.frame_number for s in used),
        source=(info.path,),
    )
