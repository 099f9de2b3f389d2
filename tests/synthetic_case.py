"""A small synthetic CT series with a hand-made analysis result, for the report tests and previews.

Not a phantom for validating the measurement (that is ``dicomnode.phantom``): the anatomy is a few
cylinders, and the result's numbers are computed from the voxels inside hand-placed ROIs, so every number the
report writes can be checked against the data it was drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.domain import (
    AnalysisResult,
    AnalysisStatus,
    BoneCategory,
    Calibration,
    ContrastPhase,
    PatientInfo,
    RoiOutline,
    Summary,
    VertebraResult,
)
from dicomnode.imaging.volume import Volume

BoolArray = npt.NDArray[np.bool_]

LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
#: Trabecular HU per level (cranial to caudal), typical of an older adult.
TRABECULAR_HU = (150.0, 140.0, 118.0, 112.0, 125.0, 131.0, 136.0)


@dataclass(frozen=True)
class SyntheticCase:
    datasets: list[Dataset]  # one CT Image per slice, with pixel data, superior slice first
    volume: Volume  # as loaded (slice order of the datasets)
    canonical: Volume
    roi_masks: dict[str, BoolArray]  # in canonical space
    result: AnalysisResult


def _slice_datasets(
    hu: npt.NDArray[np.float32], spacing: tuple[float, float, float], origin_z: float, study_uid: str
) -> list[Dataset]:
    """CT Image datasets for volume ``hu[k, j, i]`` whose slice k is at z = origin_z - k * dz."""
    nk, nj, ni = hu.shape
    dx, dy, dz = spacing
    series_uid = generate_uid()
    frame_uid = generate_uid()
    out: list[Dataset] = []
    for k in range(nk):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Synthetic^Spine"
        ds.PatientID = "SYNTH-0001"
        ds.PatientBirthDate = "19550101"
        ds.PatientSex = "F"
        ds.PatientAge = "068Y"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.SeriesDate = "20240102"
        ds.ContentDate = "20240102"
        ds.ContentTime = "101600"
        ds.AccessionNumber = "ACC0001"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN WO"
        ds.SeriesDescription = "Abdomen 3.0 B30f"
        ds.Modality = "CT"
        ds.Manufacturer = "dicomnode-synthetic"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "FFS"
        ds.KVP = "120"
        ds.ConvolutionKernel = "B30f"
        ds.SliceThickness = f"{dz:g}"
        ds.ImagePositionPatient = [
            f"{-dx * (ni - 1) / 2:.3f}",
            f"{-dy * (nj - 1) / 2:.3f}",
            f"{origin_z - k * dz:.3f}",
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
        ds.SliceLocation = f"{origin_z - k * dz:.3f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.round(hu[k] + 1024).astype(np.int16).tobytes()
        out.append(ds)
    return out


def make_case(
    shape: tuple[int, int, int] = (84, 176, 176),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    *,
    seed: int = 7,
    uncertain: tuple[str, ...] = ("T11",),
    excluded: dict[str, str] | None = None,
) -> SyntheticCase:
    """Build the synthetic series and its hand-made result.

    Parameters
    ----------
    shape
        (slices, rows, columns).
    spacing
        (column, row, slice) spacing in mm.
    seed
        Noise seed (the image noise is what makes mean, median and SD differ).
    uncertain, excluded
        Levels to flag as uncertain, and level -> exclusion reason.
    """
    excluded = {"L3": "fracture suspected (height ratio 0.72)"} if excluded is None else excluded
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    dx, dy, dz = spacing
    z_top = dz * (nk - 1) / 2
    # physical coordinates of every voxel (slice k at z_top - k*dz: superior first)
    x = (np.arange(ni) - (ni - 1) / 2) * dx
    y = (np.arange(nj) - (nj - 1) / 2) * dy
    z = z_top - np.arange(nk) * dz
    yy, xx = np.meshgrid(y, x, indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (xx / 120) ** 2 + (yy / 95) ** 2 <= 1
    inner = (xx / 108) ** 2 + (yy / 83) ** 2 <= 1
    hu[:, body] = -100.0  # subcutaneous fat
    hu[:, inner] = 45.0  # muscle / organs
    # vertebral bodies: cylinders centred at y = +35 mm (posterior), 26 mm high, 6 mm discs
    spine_y = 35.0
    height, pitch = 26.0, 32.0
    centres_z = [z_top - 24 - n * pitch for n in range(len(LEVELS))]
    r_body = np.hypot(xx, yy - spine_y)
    canal = np.hypot(xx, yy - (spine_y + 32)) <= 9
    ring = (np.hypot(xx, yy - (spine_y + 32)) <= 15) & ~canal
    for n, zc in enumerate(centres_z):
        ks = np.flatnonzero(np.abs(z - zc) <= height / 2)
        for k in ks:
            sl = hu[k]
            sl[r_body <= 20] = 600.0  # cortex
            sl[r_body <= 17] = TRABECULAR_HU[n]
            sl[ring] = 500.0
            sl[canal] = 10.0
        disc = np.flatnonzero((np.abs(z - zc) > height / 2) & (np.abs(z - zc) <= pitch / 2))
        for k in disc:
            hu[k][r_body <= 20] = 80.0
    hu += rng.normal(0.0, 18.0, size=shape).astype(np.float32)
    study_uid = generate_uid()
    datasets = _slice_datasets(hu, spacing, z_top, study_uid)

    affine = np.eye(4)
    affine[:3, 0] = (dx, 0, 0)
    affine[:3, 1] = (0, dy, 0)
    affine[:3, 2] = (0, 0, -dz)
    affine[:3, 3] = (-dx * (ni - 1) / 2, -dy * (nj - 1) / 2, z_top)
    header = {
        "Modality": "CT",
        "KVP": 120.0,
        "ConvolutionKernel": "B30f",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": datasets[0].SeriesInstanceUID,
        "PatientAge": "068Y",
        "PatientSex": "F",
    }
    volume = Volume(
        data=hu,
        affine=affine,
        header=header,
        slice_sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in datasets),
        slice_frame_numbers=tuple(None for _ in datasets),
        source=("synthetic",),
    )
    canonical = volume.canonical()
    cz = canonical.data
    # canonical voxel coordinates
    ci = np.arange(cz.shape[2])
    cj = np.arange(cz.shape[1])
    ck = np.arange(cz.shape[0])
    aff = canonical.affine
    xs = aff[0, 3] + ci * aff[0, 0]
    ys = aff[1, 3] + cj * aff[1, 1]
    zs = aff[2, 3] + ck * aff[2, 2]
    slope, intercept = 0.8, -5.0  # a made-up calibration, only so that vBMD differs from HU
    masks: dict[str, BoolArray] = {}
    vertebrae: list[VertebraResult] = []
    inv_src = np.linalg.inv(affine)
    for n, level in enumerate(LEVELS):
        zc = centres_z[n]
        r_xy = ((xs[None, None, :] / 12) ** 2 + ((ys[None, :, None] - spine_y) / 12) ** 2) <= 1
        in_z = (np.abs(zs - zc) <= 7)[:, None, None]
        mask = np.asarray(r_xy & in_z, dtype=bool)
        masks[level] = mask
        vals = cz[mask].astype(np.float64)
        k_mid = int(np.argmin(np.abs(zs - zc)))
        # the outline on the source image that holds the mid slice
        src_k = round(float((inv_src[2, :3] @ np.array([0.0, spine_y, zs[k_mid]])) + inv_src[2, 3]))
        ang = np.linspace(0, 2 * math.pi, 33)
        pts_lps = [(12 * math.cos(a), spine_y + 12 * math.sin(a), float(zs[k_mid])) for a in ang]
        pts_lps[-1] = pts_lps[0]
        pts_idx = [inv_src[:3, :3] @ np.asarray(p) + inv_src[:3, 3] for p in pts_lps]
        outline = RoiOutline(
            sop_instance_uid=str(datasets[src_k].SOPInstanceUID),
            frame_number=None,
            points_cr=tuple((float(p[0]) + 0.5, float(p[1]) + 0.5) for p in pts_idx),
            points_lps_mm=tuple(pts_lps),
        )
        mean = float(vals.mean())
        is_excluded = level in excluded
        vertebrae.append(
            VertebraResult(
                level=level,
                level_uncertain=level in uncertain,
                excluded=is_excluded,
                qc=("fracture suspected",) if is_excluded and "fracture" in excluded[level] else (),
                trabecular_hu_mean=mean,
                trabecular_hu_median=float(np.median(vals)),
                trabecular_hu_sd=float(vals.std(ddof=1)),
                roi_volume_mm3=float(mask.sum() * dx * dy * dz),
                roi_centroid_lps_mm=(0.0, spine_y, float(zc)),
                vbmd_mg_cm3=slope * mean + intercept,
                exclusion_reason=excluded.get(level),
                height_ratio=0.72 if is_excluded else 0.97,
                mid_slice_index=k_mid,
                outline=outline,
            )
        )
    used = tuple(v.level for v in vertebrae if v.level in ("L1", "L2") and not v.excluded)
    vb = [v.vbmd_mg_cm3 for v in vertebrae if v.level in used and v.vbmd_mg_cm3 is not None]
    mean_vbmd = float(np.mean(vb)) if vb else None
    category = None
    if mean_vbmd is not None:
        category = (
            BoneCategory.NORMAL
            if mean_vbmd > 120
            else BoneCategory.OSTEOPENIA
            if mean_vbmd >= 80
            else BoneCategory.OSTEOPOROSIS
        )
    l1 = next(v for v in vertebrae if v.level == "L1")
    calibration = Calibration(
        method="internal-air-fat-muscle",
        source="synthetic (hand-made, not a real calibration)",
        slope_mg_cm3_per_hu=slope,
        intercept_mg_cm3=intercept,
        reference_hu={"air": -1000.0, "fat": -100.0, "muscle": 45.0},
        kvp=120.0,
        kernel="B30f",
        contrast_correction_hu=0.0,
    )
    result = AnalysisResult(
        status=AnalysisStatus.OK,
        reason=None,
        study_instance_uid=study_uid,
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        vertebrae=tuple(vertebrae),
        summary=Summary(
            l1_hu=l1.trabecular_hu_mean,
            vbmd_l1_l2_mg_cm3=mean_vbmd,
            category=category,
            levels_used=used,
            contrast_phase=ContrastPhase.NATIVE,
            calibration=calibration,
        ),
        patient=PatientInfo(age_years=68.0, sex="F"),
        algorithm_name="dicomnode-synthetic",
        algorithm_version="0.0-test",
        series_selection=("synthetic series",),
    )
    return SyntheticCase(datasets, volume, canonical, masks, result)
