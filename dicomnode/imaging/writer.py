"""Write a :class:`~dicomnode.imaging.volume.Volume` as a DICOM CT series (one file per slice); re-grid it.

Used by the phantom generator, the demo and the tests; never by the analysis path. What is written:

* CT Image Storage, one instance per slice ``k`` of the volume, MONOCHROME2, 16-bit stored values with
  RescaleSlope 1 / RescaleIntercept (default -1024), unsigned when the values fit, signed otherwise.
* Geometry straight from the volume's affine (any orientation, including oblique):
  ImageOrientationPatient = normalised affine columns 0 and 1, PixelSpacing = (row spacing, column
  spacing) = (|col 1|, |col 0|), ImagePositionPatient = affine @ (0, 0, k), SpacingBetweenSlices = |col 2|.
* Patient, study, series, equipment, frame-of-reference, contrast and CT image modules, overridable with
  ``header`` (DICOM keywords -> values).

Re-gridding (:func:`reorient`, :func:`reorient_arrays`, :func:`crop_z`) only permutes/flips/selects voxels
and adjusts the affine, so every voxel keeps its world (LPS) position: the same anatomy written as FFS, prone
or with flipped rows/columns sits at the same patient coordinates.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume

#: Patient position -> sign of (row direction along x, column direction along y, slice direction along z)
#: for an axial acquisition, as scanners write it (HFS: rows run to the patient's left, columns posterior).
PATIENT_POSITIONS: Mapping[str, tuple[int, int, int]] = {
    "HFS": (1, 1, 1),
    "FFS": (-1, 1, -1),
    "HFP": (-1, -1, 1),
    "FFP": (1, -1, -1),
}
#: Accepted aliases.
POSITION_ALIASES: Mapping[str, str] = {"PRONE": "HFP", "SUPINE": "HFS"}

_NP_AXIS = {0: 2, 1: 1, 2: 0}  # voxel axis (i, j, k) -> numpy axis of data[k, j, i]


def normalise_position(orientation: str) -> str:
    """Map ``HFS``/``FFS``/``HFP``/``FFP`` (or ``PRONE``/``SUPINE``) to a DICOM PatientPosition."""
    key = orientation.strip().upper()
    key = POSITION_ALIASES.get(key, key)
    if key not in PATIENT_POSITIONS:
        raise InputError(f"unknown patient orientation {orientation!r} (HFS, FFS, HFP/PRONE, FFP)")
    return key


def _flip(
    arrays: list[npt.NDArray[Any]], affine: npt.NDArray[np.float64], axis: int
) -> tuple[list[npt.NDArray[Any]], npt.NDArray[np.float64]]:
    """Reverse voxel axis ``axis`` (0 = i, 1 = j, 2 = k) keeping world positions."""
    n = arrays[0].shape[_NP_AXIS[axis]]
    aff = affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, axis] * (n - 1)
    aff[:3, axis] = -aff[:3, axis]
    return [np.flip(a, axis=_NP_AXIS[axis]) for a in arrays], aff


def reorient_arrays(
    arrays: Sequence[npt.NDArray[Any]],
    affine: npt.NDArray[np.float64],
    orientation: str = "HFS",
    *,
    flip_rows: bool = False,
    flip_cols: bool = False,
) -> tuple[list[npt.NDArray[Any]], npt.NDArray[np.float64]]:
    """Re-grid arrays (all ``[k, j, i]`` on the same grid) to a patient position, world positions unchanged.

    The arrays are first brought to the canonical grid (i -> L, j -> P, k -> S, see
    :meth:`Volume.canonical`), then the axes are flipped as a scanner writes ``orientation``; ``flip_rows``
    then reverses the row order (image upside down) and ``flip_cols`` the column order (left-right).

    Parameters
    ----------
    arrays
        One or more arrays of identical shape ``[k, j, i]`` (HU volume, label maps...).
    affine
        Their common 4x4 voxel-to-LPS affine.
    orientation
        ``HFS``, ``FFS``, ``HFP`` (``PRONE``) or ``FFP``.
    flip_rows, flip_cols
        Extra flips of the in-plane axes.

    Returns
    -------
    (list of arrays, affine)
        Contiguous re-gridded arrays and the new affine.
    """
    pos = normalise_position(orientation)
    if not arrays:
        return [], affine
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise InputError("reorient_arrays: arrays must share one shape")
    # canonical permutation (no resampling); mirrors Volume.canonical for several arrays at once
    dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    order: list[int] = []
    for world_axis in range(3):
        cands = [ax for ax in range(3) if ax not in order]
        order.append(max(cands, key=lambda ax: abs(dirs[world_axis, ax])))
    out = [np.transpose(a, (_NP_AXIS[order[2]], _NP_AXIS[order[1]], _NP_AXIS[order[0]])) for a in arrays]
    aff = np.eye(4)
    for w in range(3):
        aff[:3, w] = affine[:3, order[w]]
    aff[:3, 3] = affine[:3, 3]
    signs = PATIENT_POSITIONS[pos]
    for w in range(3):
        if np.sign(aff[w, w]) != signs[w]:
            out, aff = _flip(out, aff, w)
    if flip_rows:
        out, aff = _flip(out, aff, 1)
    if flip_cols:
        out, aff = _flip(out, aff, 0)
    return [np.ascontiguousarray(a) for a in out], aff


def reorient(
    volume: Volume, orientation: str = "HFS", *, flip_rows: bool = False, flip_cols: bool = False
) -> Volume:
    """The same anatomy on the grid a scanner writes for ``orientation`` (see :func:`reorient_arrays`)."""
    (data,), aff = reorient_arrays(
        [volume.data], volume.affine, orientation, flip_rows=flip_rows, flip_cols=flip_cols
    )
    header = dict(volume.header)
    header["PatientPosition"] = normalise_position(orientation)
    return replace(
        volume, data=data, affine=aff, header=header, slice_sop_instance_uids=(), slice_frame_numbers=()
    )


def crop_z(volume: Volume, z_min: float, z_max: float) -> Volume:
    """Keep the slices whose centre lies within ``[z_min, z_max]`` (LPS z, mm)."""
    n = volume.shape[0]
    zs = volume.affine[2, 3] + volume.affine[2, 2] * np.arange(n)
    keep = np.nonzero((zs >= min(z_min, z_max) - 1e-6) & (zs <= max(z_min, z_max) + 1e-6))[0]
    if keep.size == 0:
        raise InputError(f"z-range {z_min:.1f}..{z_max:.1f} mm contains no slice")
    k0, k1 = int(keep[0]), int(keep[-1]) + 1
    aff = volume.affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, 2] * k0
    sop = volume.slice_sop_instance_uids[k0:k1] if volume.slice_sop_instance_uids else ()
    frames = volume.slice_frame_numbers[k0:k1] if volume.slice_frame_numbers else ()
    return replace(
        volume,
        data=np.ascontiguousarray(volume.data[k0:k1]),
        affine=aff,
        slice_sop_instance_uids=sop,
        slice_frame_numbers=frames,
    )


def slab_average(volume: Volume, thickness_mm: float) -> Volume:
    """Average groups of consecutive slices into thicker non-overlapping slabs (a thick reconstruction).

    ``n = round(thickness_mm / slice spacing)`` slices are averaged; the trailing remainder is dropped. The
    affine keeps world positions (each slab sits at the centre of its source slices).
    """
    dz = volume.spacing[2]
    n = max(1, round(thickness_mm / dz))
    n_out = volume.shape[0] // n
    if n_out < 1:
        raise InputError(f"volume too short for {thickness_mm} mm slabs")
    data = volume.data[: n_out * n].reshape(n_out, n, *volume.shape[1:]).mean(axis=1, dtype=np.float32)
    aff = volume.affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, 2] * (n - 1) / 2.0
    aff[:3, 2] = aff[:3, 2] * n
    header = dict(volume.header)
    header["SliceThickness"] = float(n * dz)
    return replace(
        volume, data=np.ascontiguousarray(data), affine=aff, header=header, slice_sop_instance_uids=(),
        slice_frame_numbers=(),
    )  # fmt: skip


#: Defaults for a synthetic patient/study; everything can be overridden with ``header``.
DEFAULT_HEADER: Mapping[str, Any] = {
    "PatientName": "PHANTOM^ABDOMEN",
    "PatientID": "PHANTOM0001",
    "PatientBirthDate": "19600101",
    "PatientSex": "F",
    "PatientAge": "065Y",
    "StudyDate": "20250101",
    "StudyTime": "120000",
    "AccessionNumber": "PH0001",
    "StudyID": "1",
    "ReferringPhysicianName": "",
    "StudyDescription": "CT ABDOMEN PHANTOM",
    "Manufacturer": "dicomnode",
    "ManufacturerModelName": "phantom",
    "InstitutionName": "dicomnode",
    "BodyPartExamined": "ABDOMEN",
    "KVP": 120.0,
    "ConvolutionKernel": "STANDARD",
    "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
    "PositionReferenceIndicator": "",
    "AcquisitionNumber": 1,
    "SeriesNumber": 1,
    "WindowCenter": 40.0,
    "WindowWidth": 400.0,
}

# keywords the writer computes itself (a header value for them is ignored)
_COMPUTED = {
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SpacingBetweenSlices", "SliceLocation", "Rows", "Columns", "PixelData", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality",
}  # fmt: skip


def _header_items(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Merge header mappings (later wins), keeping only DICOM keywords with plain values (never file meta
    elements, group 0002, nor the image pixel description, group 0028: the writer makes its own meta header
    and pixel encoding, and a source's padding value or bit depth does not fit it)."""
    out: dict[str, Any] = {}
    for src in sources:
        for key, val in src.items():
            tag = pydicom.datadict.tag_for_keyword(key)
            if key in _COMPUTED or tag is None or tag >> 16 in (0x0002, 0x0028):
                continue
            out[key] = val
    return out


def _set(ds: Dataset, key: str, val: Any) -> None:
    if val is None:
        return
    if isinstance(val, float) and pydicom.datadict.dictionary_VR(key) == "DS":
        val = format_ds(val)
    elif isinstance(val, (tuple, list)):
        val = [format_ds(float(x)) for x in val] if pydicom.datadict.dictionary_VR(key) == "DS" else list(val)
    setattr(ds, key, val)


def format_ds(x: float) -> str:
    """A decimal string (<= 16 characters) for a float."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s if len(s) <= 16 else f"{x:.8g}"


def _geometry(
    affine: npt.NDArray[np.float64],
) -> tuple[list[float], list[float], float, npt.NDArray[np.float64]]:
    col0, col1, col2 = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(c)) for c in (col0, col1, col2))
    if min(dx, dy, dz) <= 0:
        raise InputError("volume affine is degenerate (zero spacing)")
    row_dir, col_dir = col0 / dx, col1 / dy
    if abs(float(np.dot(row_dir, col_dir))) > 1e-3:
        raise InputError(
            "volume affine has non-orthogonal in-plane axes; cannot write ImageOrientationPatient"
        )
    normal = np.cross(row_dir, col_dir)
    if abs(float(np.dot(normal, col2 / dz))) < 1e-3:
        raise InputError("volume slice axis lies in the image plane")
    iop = [float(v) for v in (*row_dir, *col_dir)]
    return iop, [dy, dx], dz, normal


def _stored(
    data: npt.NDArray[np.float32], intercept: float, slope: float
) -> tuple[npt.NDArray[np.int16] | npt.NDArray[np.uint16], int]:
    """Quantise HU to stored values; unsigned when everything fits, else signed (clipped to int16)."""
    # float32 is exact for the integers a 16-bit store can hold, and halves the memory of float64
    q = np.rint((data.astype(np.float32, copy=False) - np.float32(intercept)) / np.float32(slope))
    lo, hi = float(q.min()), float(q.max())
    if lo >= 0 and hi <= 65535:
        return q.astype(np.uint16), 0
    return np.clip(q, -32768, 32767).astype(np.int16), 1


def _base_dataset(
    merged: Mapping[str, Any], *, study_uid: str, series_uid: str, frame_uid: str, modality: str = "CT"
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    for key, val in merged.items():
        _set(ds, key, val)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "KVP",
                "AcquisitionNumber", "SeriesNumber", "PositionReferenceIndicator"):  # fmt: skip
        if key not in ds:  # type 2: present, possibly empty
            setattr(ds, key, None)
    if "ContrastBolusAgent" in ds and "ContrastBolusRoute" not in ds:
        ds.ContrastBolusRoute = "IV"
    if "SeriesDate" not in ds:
        ds.SeriesDate = ds.StudyDate
    if "SeriesTime" not in ds:
        ds.SeriesTime = ds.StudyTime
    return ds


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    uncompressed = transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    meta.TransferSyntaxUID = UID(transfer_syntax) if uncompressed else ExplicitVRLittleEndian
    ds.file_meta = meta
    if not uncompressed:
        try:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        except Exception as exc:  # pydicom raises assorted errors when no encoder plugin is installed
            raise InputError(f"cannot encode transfer syntax {transfer_syntax}: {exc}") from exc
    tmp = path.with_name(path.name + ".part")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def write_dicom_series(
    volume: Volume,
    out_dir: str | Path,
    *,
    header: Mapping[str, Any] | None = None,
    orientation: str | None = None,
    flip_rows: bool = False,
    flip_cols: bool = False,
    z_range: tuple[float, float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    filename_prefix: str = "CT",
) -> list[Path]:
    """Write ``volume`` as a CT Image Storage series, one file per slice.

    Parameters
    ----------
    volume
        HU volume; its affine may have any orientation (oblique included, in-plane axes orthogonal).
    out_dir
        Folder to write into (created). Files are named ``{prefix}{instance:05d}.dcm``.
    header
        DICOM keywords -> values overriding :data:`DEFAULT_HEADER` and ``volume.header`` (patient, study,
        series and CT fields such as ``PatientName``, ``KVP``, ``ConvolutionKernel``, ``SeriesNumber``,
        ``SeriesDescription``, ``ContrastBolusAgent``). Geometry, pixel and UID fields are computed.
    orientation, flip_rows, flip_cols
        Re-grid first (see :func:`reorient`); None keeps the volume's grid.
    z_range
        Keep only slices whose centre z (LPS mm) is in this range (see :func:`crop_z`).
    transfer_syntax
        Explicit/Implicit VR Little Endian, or a lossless compressed syntax pydicom can encode (RLE Lossless,
        JPEG-LS Lossless, JPEG 2000 Lossless).
    series_uid, study_uid, frame_of_reference_uid
        UIDs to use (new ones from :func:`pydicom.uid.generate_uid` otherwise; ``header`` may also carry
        ``StudyInstanceUID``/``SeriesInstanceUID``/``FrameOfReferenceUID``).
    rescale_intercept, rescale_slope
        Stored value = round((HU - intercept) / slope).
    filename_prefix
        File name prefix.

    Returns
    -------
    list of Path
        The written files, in slice order ``k``.
    """
    if orientation is not None or flip_rows or flip_cols:
        volume = reorient(
            volume, orientation or _position_of(volume), flip_rows=flip_rows, flip_cols=flip_cols
        )
    if z_range is not None:
        volume = crop_z(volume, *z_range)
    if volume.data.ndim != 3 or min(volume.shape) < 1:
        raise InputError("volume must be a non-empty 3-D array")
    hdr = dict(header or {})
    study_uid = study_uid or str(
        hdr.get("StudyInstanceUID") or volume.header.get("StudyInstanceUID") or generate_uid()
    )
    series_uid = series_uid or str(hdr.get("SeriesInstanceUID") or generate_uid())
    frame_uid = frame_of_reference_uid or str(hdr.get("FrameOfReferenceUID") or generate_uid())
    merged = _header_items(DEFAULT_HEADER, volume.header, hdr)
    if "SliceThickness" not in merged:
        merged["SliceThickness"] = volume.spacing[2]
    iop, pixel_spacing, dz, normal = _geometry(volume.affine)
    stored, pixel_rep = _stored(volume.data, rescale_intercept, rescale_slope)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(merged, study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid)
    n_k, rows, cols = volume.shape
    paths: list[Path] = []
    now = _dt.datetime.now(_dt.UTC)
    for k in range(n_k):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        ipp = volume.affine @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [format_ds(float(v)) for v in ipp[:3]]
        ds.ImageOrientationPatient = [format_ds(v) for v in iop]
        ds.PixelSpacing = [format_ds(v) for v in pixel_spacing]
        ds.SpacingBetweenSlices = format_ds(dz)
        ds.SliceLocation = format_ds(float(np.dot(ipp[:3], normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = pixel_rep
        ds.RescaleIntercept = format_ds(rescale_intercept)
        ds.RescaleSlope = format_ds(rescale_slope)
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = out / f"{filename_prefix}{k + 1:05d}.dcm"
        _save(ds, path, transfer_syntax)
        paths.append(path)
    return paths


def _position_of(volume: Volume) -> str:
    pos = str(volume.header.get("PatientPosition") or "HFS")
    return pos if pos in PATIENT_POSITIONS else "HFS"


def write_localizer(
    volume: Volume,
    out_dir: str | Path,
    *,
    header: Mapping[str, Any] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write an AP localizer (scout) projected from ``volume``: one CT image, ImageType LOCALIZER.

    The projection is the line integral of ``(HU + 1000) / 1000`` along the patient's AP axis (water-mm),
    scaled to 12 bits; rows run from head to feet, columns from the patient's right to left (as an AP
    topogram is displayed). Geometry (IOP/IPP/PixelSpacing) is that coronal plane at the volume's AP centre.

    Returns
    -------
    Path
        The written file.
    """
    can = volume.canonical()
    dx, dy, dz = can.spacing
    mu = np.clip((can.data + 1000.0) / 1000.0, 0.0, None)
    proj = mu.sum(axis=1, dtype=np.float64) * dy  # [k, i], water-equivalent mm
    img = proj[::-1]  # rows head -> feet
    scale = 4000.0 / max(float(img.max()), 1e-6)
    pix = np.rint(img * scale).astype(np.uint16)
    hdr = dict(header or {})
    merged = _header_items(DEFAULT_HEADER, volume.header, hdr)
    merged["ImageType"] = hdr.get("ImageType", ("ORIGINAL", "PRIMARY", "LOCALIZER"))
    merged.setdefault("SeriesDescription", "Topogram AP")
    merged.pop("SliceThickness", None)
    merged.pop("WindowCenter", None)
    merged.pop("WindowWidth", None)
    study_uid = study_uid or str(
        hdr.get("StudyInstanceUID") or volume.header.get("StudyInstanceUID") or generate_uid()
    )
    ds = _base_dataset(
        merged,
        study_uid=study_uid,
        series_uid=series_uid or generate_uid(),
        frame_uid=frame_of_reference_uid or generate_uid(),
    )
    n_k, n_j, _ = can.shape
    top_left = can.affine @ np.array([0.0, (n_j - 1) / 2.0, float(n_k - 1), 1.0])
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [format_ds(float(v)) for v in top_left[:3]]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [format_ds(dz), format_ds(dx)]
    ds.SliceThickness = format_ds(float(n_j * dy))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pix.shape[0]), int(pix.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "2000"
    ds.WindowWidth = "4000"
    ds.PixelData = np.ascontiguousarray(np.minimum(pix, 4095)).tobytes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "LOC00001.dcm"
    _save(ds, path, transfer_syntax)
    return path


def sharpen(volume: Volume, amount: float = 1.0, sigma_mm: float = 0.8) -> Volume:
    """A crude "bone kernel": unsharp masking in-plane (edges and noise both get stronger)."""
    from scipy import ndimage  # local: keeps scipy out of the import path of light users

    dx, dy, _ = volume.spacing
    sig = (0.0, sigma_mm / dy, sigma_mm / dx)
    blurred = ndimage.gaussian_filter(volume.data, sig)
    data = (volume.data + np.float32(amount) * (volume.data - blurred)).astype(np.float32)
    return replace(volume, data=data)


def write_study(
    volume: Volume,
    out_dir: str | Path,
    *,
    header: Mapping[str, Any] | None = None,
    soft_thickness_mm: float = 3.0,
    bone_thickness_mm: float = 5.0,
    soft_kernel: str = "STANDARD",
    bone_kernel: str = "BONE",
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
) -> dict[str, list[Path]]:
    """Write a three-series CT study from a thin-slice volume: localizer, thick bone-kernel, soft series.

    ``localizer/`` (series 1, one LOCALIZER image), ``soft/`` (series 2, ``soft_thickness_mm`` slabs,
    soft kernel) and ``bone/`` (series 3, ``bone_thickness_mm`` slabs, sharpened, bone kernel), all sharing
    one StudyInstanceUID and FrameOfReferenceUID. The soft series is the one a screening node should pick.

    Returns
    -------
    dict
        ``{"localizer": [path], "soft": [...], "bone": [...]}``.
    """
    hdr = dict(header or {})
    study = study_uid or str(hdr.get("StudyInstanceUID") or generate_uid())
    frame = str(hdr.get("FrameOfReferenceUID") or generate_uid())
    hdr.pop("StudyInstanceUID", None)
    hdr.pop("FrameOfReferenceUID", None)
    hdr.pop("SeriesInstanceUID", None)
    out = Path(out_dir)
    loc = write_localizer(
        volume,
        out / "localizer",
        header={**hdr, "SeriesNumber": 1, "SeriesDescription": "Topogram AP"},
        study_uid=study,
        frame_of_reference_uid=frame,
        transfer_syntax=transfer_syntax,
    )
    soft = slab_average(volume, soft_thickness_mm)
    soft_paths = write_dicom_series(
        soft,
        out / "soft",
        header={
            **hdr,
            "SeriesNumber": 2,
            "ConvolutionKernel": soft_kernel,
            "SeriesDescription": f"Abdomen {soft.spacing[2]:.1f} mm {soft_kernel}",
        },
        study_uid=study,
        frame_of_reference_uid=frame,
        transfer_syntax=transfer_syntax,
    )
    bone = sharpen(slab_average(volume, bone_thickness_mm))
    bone_paths = write_dicom_series(
        bone,
        out / "bone",
        header={
            **hdr,
            "SeriesNumber": 3,
            "ConvolutionKernel": bone_kernel,
            "SeriesDescription": f"Abdomen {bone.spacing[2]:.1f} mm {bone_kernel}",
            "WindowCenter": 400.0,
            "WindowWidth": 1800.0,
        },
        study_uid=study,
        frame_of_reference_uid=frame,
        transfer_syntax=transfer_syntax,
    )
    return {"localizer": [loc], "soft": soft_paths, "bone": bone_paths}
