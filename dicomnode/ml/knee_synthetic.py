"""Synthetic knee radiographs (AP view) whose trabecular density sets the osteoporosis class.

For tests and for trying ``dicomnode train knee-xray`` without patient data; no accuracy on patients is
claimed from them. Each case is a projection of a simple knee: soft tissue of the leg, femoral shaft and
condyles, tibial plateau and shaft, the fibular head on the lateral side, a joint space. Inside the bones a
trabecular network (smoothed noise, vertical grain) fills a fraction of the marrow; that fraction, the
case's ``density`` in [0, 1], sets the label (low density = osteoporosis) and thins the cortex with it.
Nuisances that a model must ignore vary per case: exposure, noise, a few degrees of rotation, a shift,
the leg's width, the side (left knees are mirrored, with the fibula on the other side).

:func:`write_dx` stores a case as a DX (or CR) DICOM file with a choice of photometric interpretation, bit
depth, spacing attribute and transfer syntax, which is what the projection loader must cope with.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]

#: Class names by number of classes.
CLASS_NAMES: dict[int, tuple[str, ...]] = {
    2: ("normal", "osteoporosis"),
    3: ("normal", "osteopenia", "osteoporosis"),
}
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(frozen=True)
class KneeCase:
    """One synthetic radiograph: pixels (bone bright, arbitrary units), its truth and its geometry."""

    case_id: str
    pixels: FloatArray
    spacing_mm: float
    density: float
    label: int
    laterality: str


def label_of(density: float, n_classes: int) -> int:
    """The class of a trabecular density: high = normal, low = osteoporosis (equal thirds / halves)."""
    if n_classes == 2:
        return 0 if density >= 0.5 else 1
    return 0 if density >= 2 / 3 else 1 if density >= 1 / 3 else 2


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> FloatArray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    field = (field - field.mean()) / (field.std() + 1e-9)
    out: FloatArray = field.astype(np.float32)
    return out


def make_knee(
    seed: int,
    *,
    density: float | None = None,
    n_classes: int = 2,
    size_mm: tuple[float, float] = (200.0, 160.0),
    spacing_mm: float = 0.8,
    laterality: str | None = None,
) -> KneeCase:
    """One synthetic AP knee radiograph.

    Parameters
    ----------
    seed
        Everything random about the case derives from it.
    density
        Trabecular fraction in [0, 1] (default: uniform from the seed); sets the label.
    n_classes
        2 (normal / osteoporosis) or 3 (normal / osteopenia / osteoporosis).
    size_mm, spacing_mm
        Field of view (rows, columns) and pixel size.
    laterality
        "L" or "R" (default from the seed).
    """
    rng = np.random.default_rng(seed)
    d = float(rng.uniform(0.0, 1.0)) if density is None else float(np.clip(density, 0.0, 1.0))
    side = laterality or ("L" if rng.random() < 0.5 else "R")
    rows, cols = (round(s / spacing_mm) for s in size_mm)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32) * spacing_mm
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    cy = size_mm[0] / 2 + rng.uniform(-8.0, 8.0)
    cx = size_mm[1] / 2 + rng.uniform(-8.0, 8.0)
    # coordinates centred on the joint line, rotated a little (u across, v along the leg, v > 0 = tibia)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    leg_half = rng.uniform(55.0, 70.0)
    soft = np.clip(1.0 - (u / leg_half) ** 2, 0.0, None) ** 0.5
    # femur: shaft 14 mm half-width widening into condyles of about 40 mm above the joint
    gap = rng.uniform(2.5, 4.0)
    fem_half = 14.0 + 26.0 * np.exp(-np.clip(-v - gap, 0.0, None) / 28.0)
    femur = (v < -gap) & (np.abs(u) < fem_half)
    # tibia: plateau of about 38 mm half-width narrowing to a 13 mm shaft
    tib_half = 13.0 + 25.0 * np.exp(-np.clip(v - gap, 0.0, None) / 25.0)
    tibia = (v > gap) & (np.abs(u) < tib_half)
    lateral = 1.0 if side == "R" else -1.0  # image right for a right knee, mirrored for a left one
    fibula = ((u * lateral - 36.0) ** 2 / 7.0**2 + (v - 28.0) ** 2 / 14.0**2 < 1.0) | (
        (np.abs(u * lateral - 35.0) < 5.0) & (v > 28.0)
    )
    bone = femur | tibia | fibula
    # cortex: a rim of the bone, thinner when the density is low
    cortex_mm = 1.2 + 2.3 * d
    inner = ndimage.binary_erosion(bone, iterations=max(1, round(cortex_mm / spacing_mm)))
    cortex = bone & ~inner
    # trabecular network: smoothed noise with a vertical grain, thresholded to a density-dependent fraction
    grain = (1.0 / spacing_mm, 0.45 / spacing_mm)
    noise = _smooth_noise(rng, (rows, cols), grain)
    fraction = 0.15 + 0.6 * d
    trabeculae = (noise > np.quantile(noise[inner], 1.0 - fraction)) & inner if inner.any() else inner
    exposure = rng.uniform(0.8, 1.2)
    image = 0.25 * soft + 0.55 * cortex + 0.32 * trabeculae + 0.06 * inner
    image = ndimage.gaussian_filter(image.astype(np.float32), 0.35 / spacing_mm) * exposure
    image += rng.normal(0.0, 0.015, image.shape).astype(np.float32)
    return KneeCase(f"knee{seed:05d}", image.astype(np.float32), spacing_mm, d, label_of(d, n_classes), side)


def write_dx(
    case: KneeCase,
    path: Path,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    spacing_attribute: str = "PixelSpacing",
    transfer_syntax: str = ExplicitVRLittleEndian,
    body_part: str = "KNEE",
    series_description: str = "KNEE AP",
    window: bool = True,
) -> Path:
    """Store a case as a CR/DX DICOM file.

    Parameters
    ----------
    photometric
        MONOCHROME2 (high = white) or MONOCHROME1 (stored inverted: high = black).
    bits
        Bits stored, 8 to 16.
    spacing_attribute
        "PixelSpacing", "ImagerPixelSpacing" (with a magnification factor of 1.1) or "none".
    transfer_syntax
        Any syntax pydicom can encode here (explicit VR little endian, RLE lossless, JPEG 2000 lossless).
    window
        Write a Window Center/Width covering the stored values.
    """
    top = (1 << bits) - 1
    scaled = np.clip(case.pixels / max(float(case.pixels.max()), 1e-6), 0.0, 1.0)
    stored = np.round(scaled * top).astype(np.uint16 if bits > 8 else np.uint8)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(stored.dtype)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientID = patient_id or case.case_id
    ds.PatientName = f"Synthetic^{case.case_id}"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = f"A{case.case_id[-5:]}"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = "dicomnode synthetic"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = body_part
    ds.SeriesDescription = series_description
    ds.ViewPosition = "AP"
    ds.ImageLaterality = case.laterality
    ds.Laterality = case.laterality
    ds.PatientOrientation = ["L", "F"]  # AP as displayed: rows run to the patient's left, columns to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
    sp = [f"{case.spacing_mm:.4f}", f"{case.spacing_mm:.4f}"]
    if spacing_attribute == "PixelSpacing":
        ds.PixelSpacing = sp
        ds.ImagerPixelSpacing = sp
    elif spacing_attribute == "ImagerPixelSpacing":
        ds.ImagerPixelSpacing = [f"{case.spacing_mm * 1.1:.4f}"] * 2
        ds.EstimatedRadiographicMagnificationFactor = 1.1
    if window:
        ds.WindowCenter = top / 2
        ds.WindowWidth = top + 1
    ds.PixelData = stored.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dataset(
    root: Path,
    seeds: Sequence[int],
    *,
    n_classes: int = 2,
    spacing_mm: float = 1.6,
    size_mm: tuple[float, float] = (200.0, 160.0),
    csv_name: str = "labels.csv",
) -> Path:
    """Write one DX file per seed under ``root/images`` and ``root/labels.csv`` (path, label, patient_id).

    Densities are spread evenly over [0, 1] (in seed order, then shuffled by the seeds) so every class is
    represented whatever the number of cases.

    Returns
    -------
    Path
        The CSV (paths relative to its folder).
    """
    root.mkdir(parents=True, exist_ok=True)
    n = len(seeds)
    rng = np.random.default_rng(int(seeds[0]) if n else 0)
    densities = (np.arange(n) + rng.uniform(0.1, 0.9, n)) / max(n, 1)
    densities = densities[rng.permutation(n)]
    rows = []
    for seed, density in zip(seeds, densities, strict=True):
        case = make_knee(
            int(seed), density=float(density), n_classes=n_classes, size_mm=size_mm, spacing_mm=spacing_mm
        )
        rel = Path("images") / f"{case.case_id}.dcm"
        write_dx(case, root / rel)
        rows.append(
            {
                "path": str(rel),
                "label": CLASS_NAMES[n_classes][case.label],
                "patient_id": case.case_id,
                "density": f"{case.density:.4f}",
            }
        )
    out = root / csv_name
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id", "density"])
        writer.writeheader()
        writer.writerows(rows)
    return out
