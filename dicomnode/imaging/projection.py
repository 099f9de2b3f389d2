"""Projection radiographs (CR, DX) as a display-oriented 2-D image in millimetres.

What a CR/DX image needs before a network sees it, and why:

* **Modality LUT** (Rescale Slope/Intercept or a Modality LUT Sequence) first, then the **VOI LUT**
  (a VOI LUT Sequence, else Window Center/Width) as the modality meant the image to be displayed;
  PS3.3 C.11.1 and C.11.2 define that order. An image "for processing" usually has no VOI: then the raw
  values are used and the percentile normalisation below does the windowing.
* **MONOCHROME1** means the minimum value is displayed white (PS3.3 C.7.6.3.1.2), so it is inverted after
  the VOI: whatever the photometric interpretation, bone comes out bright.
* Intensities are mapped to [0, 1] by the 1st and 99th percentile: detector dose, bit depth (8 to 16 bits
  stored) and window choices then give the same picture.
* **Spacing**: Pixel Spacing (0028,0030), when present, is calibrated in the patient; Imager Pixel Spacing
  (0018,1164) is measured at the detector front plane and is divided by the Estimated Radiographic
  Magnification Factor (0018,1114) when the header gives one (PS3.3 section 10.7.1, Basic Pixel Spacing
  Calibration Macro, and C.8.11.7 DX Detector). Without either, a radiograph cannot be scaled to millimetres
  and is refused with that reason.

Compressed transfer syntaxes are decoded by pydicom with the pylibjpeg plugins the package depends on
(JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from dicomnode.errors import InputError, NotQualifyingError

FloatArray = npt.NDArray[np.float32]

#: Modalities of projection radiographs this module reads.
RADIOGRAPH_MODALITIES: frozenset[str] = frozenset({"CR", "DX"})
#: CR Image Storage, Digital X-Ray Image Storage for Presentation and for Processing.
RADIOGRAPH_SOP_CLASSES: frozenset[str] = frozenset(
    {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"}
)
#: What in a description names the knee (word match, case-insensitive).
KNEE_WORDS = re.compile(r"\b(knee|knees|genu|patella|tibiofemoral)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Radiograph:
    """One projection radiograph, display-oriented (bone bright), intensities in [0, 1]."""

    pixels: FloatArray
    #: (row, column) spacing in mm.
    spacing_mm: tuple[float, float]
    #: Which attribute the spacing came from, in words (written into the report).
    spacing_source: str
    laterality: str | None
    view_position: str | None
    body_part: str | None
    modality: str
    photometric: str
    #: The header (pixel data removed): patient, study, series and SOP identification for the outputs.
    header: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.get("SOPClassUID", ""))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _positive_pair(value: Any) -> tuple[float, float] | None:
    try:
        pair = (float(value[0]), float(value[1]))
    except (TypeError, ValueError, IndexError):
        return None
    if not all(np.isfinite(p) and p > 0 for p in pair):
        return None
    return pair


def radiograph_spacing(ds: Dataset) -> tuple[tuple[float, float], str]:
    """The (row, column) pixel spacing of a radiograph in the patient, and where it came from.

    Raises
    ------
    NotQualifyingError
        Neither Pixel Spacing nor Imager Pixel Spacing is usable.
    """
    pixel = _positive_pair(ds.get("PixelSpacing"))
    if pixel is not None:
        return pixel, "Pixel Spacing (calibrated in the patient)"
    imager = _positive_pair(ds.get("ImagerPixelSpacing"))
    if imager is not None:
        try:
            magnification = float(ds.get("EstimatedRadiographicMagnificationFactor", 0) or 0)
        except (TypeError, ValueError):
            magnification = 0.0
        if magnification >= 1.0:
            return (
                (imager[0] / magnification, imager[1] / magnification),
                f"Imager Pixel Spacing / magnification {magnification:g}",
            )
        return imager, "Imager Pixel Spacing (at the detector, no magnification given)"
    raise NotQualifyingError(
        "radiograph has no Pixel Spacing or Imager Pixel Spacing: it cannot be scaled to millimetres"
    )


def is_knee(ds: Dataset) -> bool:
    """Whether the header says the image shows a knee (Body Part Examined, or a description naming it)."""
    if _text(ds, "BodyPartExamined").upper() in ("KNEE", "KNEES"):
        return True
    return any(
        KNEE_WORDS.search(_text(ds, kw))
        for kw in ("SeriesDescription", "ProtocolName", "StudyDescription", "ViewName")
    )


def check_radiograph_header(ds: Dataset) -> None:
    """Refuse what is not a single-channel CR/DX image, with one line saying why.

    Raises
    ------
    NotQualifyingError
        Not CR/DX, colour, more than 16 bits stored, no pixel data.
    """
    modality = _text(ds, "Modality").upper()
    if modality not in RADIOGRAPH_MODALITIES:
        raise NotQualifyingError(
            f"modality {modality or 'missing'}: not a projection radiograph (CR or DX expected)"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NotQualifyingError("radiograph has no pixel data")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotQualifyingError(
            f"photometric interpretation {photometric or 'missing'}: a greyscale "
            "radiograph (MONOCHROME1 or MONOCHROME2) is expected"
        )
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 1 <= bits <= 16:
        raise NotQualifyingError(f"{bits} bits stored: 8 to 16 bit radiographs are supported")


def to_display(ds: Dataset, raw: npt.NDArray[Any]) -> FloatArray:
    """Modality LUT, VOI LUT, MONOCHROME1 inversion and [0, 1] scaling of one frame (bone bright)."""
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        # an unusable VOI: the percentile scaling below windows the raw values instead
        with contextlib.suppress(ValueError, TypeError, IndexError, AttributeError):
            values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        values = -values
    lo, hi = np.percentile(values, [1.0, 99.0]) if values.size else (0.0, 1.0)
    if not hi > lo:
        raise NotQualifyingError("radiograph has no contrast (all pixels about the same value)")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def read_radiograph(ds: Dataset) -> Radiograph:
    """A dataset (with pixels) as a :class:`Radiograph`.

    Raises
    ------
    NotQualifyingError
        Not a usable radiograph (one line why).
    InputError
        Pixel data that cannot be decoded.
    """
    check_radiograph_header(ds)
    spacing, source = radiograph_spacing(ds)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise InputError(f"cannot decode the radiograph's pixel data ({name}): {exc}") from None
    if raw.ndim == 3:  # multi-frame: the first frame
        raw = raw[0]
    if raw.ndim != 2 or min(raw.shape) < 16:
        raise NotQualifyingError(f"radiograph pixel array of shape {raw.shape} is not an image")
    pixels = to_display(ds, raw)
    header = ds.copy()
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in header:
            del header[kw]
    laterality = (_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper() or None
    return Radiograph(
        pixels=pixels,
        spacing_mm=spacing,
        spacing_source=source,
        laterality=laterality if laterality in ("L", "R", "B") else None,
        view_position=_text(ds, "ViewPosition").upper() or None,
        body_part=_text(ds, "BodyPartExamined").upper() or None,
        modality=_text(ds, "Modality").upper(),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        header=header,
    )


def load_radiograph(path: str | os.PathLike[str]) -> Radiograph:
    """Read one CR/DX file as a :class:`Radiograph`.

    Raises
    ------
    InputError
        Unreadable or not DICOM (one line); :class:`NotQualifyingError` for a DICOM file that is not a
        usable radiograph.
    """
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except (OSError, InvalidDicomError, EOFError, ValueError) as exc:
        raise InputError(f"{os.fspath(path)}: not a readable DICOM file ({exc})") from None
    return read_radiograph(ds)
