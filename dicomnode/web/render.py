"""Render result images (secondary captures written by ``report``) to PNG for the job page, on the fly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicomnode.errors import InputError

__all__ = ["dicom_to_png", "overlay_files"]

_MAX_SIDE = 2048


def overlay_files(files: tuple[Path, ...] | list[Path]) -> list[Path]:
    """The secondary-capture DICOM files of a result (its ``sc_*.dcm``), in their written order."""
    return [Path(f) for f in files if Path(f).suffix == ".dcm" and Path(f).name.startswith("sc")]


def dicom_to_png(path: Path) -> bytes:
    """PNG bytes of the first frame of a DICOM image (RGB as is, greyscale windowed).

    Raises
    ------
    InputError
        The file is missing, not DICOM, or holds no decodable pixel data.
    """
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except FileNotFoundError:
        raise InputError(f"{path.name}: file not found (removed by retention?)") from None
    except Exception as exc:  # pydicom raises many types for unreadable data
        raise InputError(f"{path.name}: cannot decode the image: {exc}") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels.processing import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        img = Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8), mode="RGB")
    elif arr.ndim == 2:
        img = Image.fromarray(_window(ds, arr), mode="L")
    else:
        raise InputError(f"{path.name}: unsupported pixel layout {arr.shape}")
    if max(img.size) > _MAX_SIDE:
        img.thumbnail((_MAX_SIDE, _MAX_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _window(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    data = arr.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    wc, ww = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if wc is not None and ww is not None:
        c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        w = max(float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww), 1.0)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = float(np.percentile(data, 1)), float(np.percentile(data, 99))
        hi = max(hi, lo + 1.0)
    out = np.clip((data - lo) / (hi - lo), 0, 1) * 255
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    result: np.ndarray = out.astype(np.uint8)
    return result
