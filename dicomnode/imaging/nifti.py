"""NIfTI -> ``Volume`` (RAS -> LPS) and a physical plausibility check that values are CT HU.

Public API
----------
``load_nifti(path) -> Volume``
    float32 ``[k, j, i]`` data (nibabel's ``[i, j, k]`` transposed; scaling applied), affine converted
    from RAS to LPS. NIfTI carries no modality: ``header`` is ``{"Modality": None, "source_format":
    "nifti", ...}``; whether it is CT is for ``check_ct_hu`` to judge.
``check_ct_hu(volume) -> None``
    Raise ``NotQualifyingError`` when the intensities do not look like CT Hounsfield units.

The check is physics, not a fingerprint of any file: every CT of the trunk contains air (inside the
reconstructed field of view, outside the body, in lungs and bowel), which is about -1000 HU, and the
bulk of the voxels lie between air and dense bone (-1024 ... ~3000 HU). MR, PET or rescaled CT stored
in arbitrary units have no population of voxels near -1000 (their minimum is usually 0 or slightly
negative), so they fail the air test; images in other units fail the range test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.errors import InputError, NotQualifyingError
from dicomnode.imaging.volume import Volume

#: RAS <-> LPS: negate x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: HU window counted as air (true air is -1000 HU; noise and scanner offsets spread it).
AIR_WINDOW_HU = (-1100.0, -850.0)
#: Minimum fraction of voxels inside the air window.
MIN_AIR_FRACTION = 0.001
#: HU window of water-like soft tissue and fat.
SOFT_TISSUE_WINDOW_HU = (-200.0, 300.0)
MIN_SOFT_TISSUE_FRACTION = 0.01
#: Upper percentile (99.5 %) above this is not a CT of a body (cortical bone ~1000-2000 HU).
MAX_P995_HU = 3500.0
#: Values below this are fill markers (outside the reconstruction circle), ignored by the check.
FILL_BELOW_HU = -2048.0
#: Voxels examined at most (a regular subsample keeps the check fast on large volumes).
_MAX_SAMPLES = 2_000_000


def load_nifti(path: str | os.PathLike[str]) -> Volume:
    """Load a 3-D NIfTI file as a ``Volume`` in LPS.

    Parameters
    ----------
    path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    Volume
        Data float32 ``[k, j, i]``; ``affine`` maps (i, j, k) to LPS mm; header
        ``{"Modality": None, "source_format": "nifti", "nan_voxels": n}``.

    Raises
    ------
    InputError
        Unreadable file, not 3-D (a 4-D image with one volume is accepted), degenerate affine.
    """
    import nibabel as nib

    p = Path(path)
    try:
        img: Any = nib.load(str(p))
        arr = np.asarray(img.get_fdata(dtype=np.float32))
        affine_ras = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError as exc:
        raise InputError(f"{p.name}: no such file") from exc
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{p.name}: unreadable NIfTI ({' '.join(str(exc).split())[:160]})") from exc
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., np.newaxis]
    if arr.ndim != 3:
        raise InputError(f"{p.name}: expected a 3-D image, got shape {arr.shape}")
    if not np.all(np.isfinite(affine_ras)) or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-9:
        raise InputError(f"{p.name}: degenerate affine in the NIfTI header")
    nan = ~np.isfinite(arr)
    n_nan = int(nan.sum())
    if n_nan:
        arr = np.where(nan, np.float32(-1024.0), arr)
    data: npt.NDArray[np.float32] = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)), dtype=np.float32)
    return Volume(
        data=data,
        affine=RAS_TO_LPS @ affine_ras,
        header={"Modality": None, "source_format": "nifti", "nan_voxels": n_nan},
        source=(str(p),),
    )


def check_ct_hu(volume: Volume) -> None:
    """Refuse volumes whose intensities are not plausible CT Hounsfield units.

    Parameters
    ----------
    volume
        Any volume (NIfTI has no modality, so this is the only evidence that it is CT).

    Raises
    ------
    NotQualifyingError
        No air population near -1000 HU, hardly any soft-tissue values, or a value range beyond what a
        body CT produces. The message gives the observed range.
    """
    flat = volume.data.reshape(-1)
    stride = max(1, flat.size // _MAX_SAMPLES)
    sample = flat[::stride]
    sample = sample[np.isfinite(sample)]
    values = sample[sample >= FILL_BELOW_HU]
    if values.size == 0:
        raise NotQualifyingError("intensities do not look like CT HU: no finite values above fill level")
    lo = float(np.percentile(values, 0.5))
    hi = float(np.percentile(values, 99.5))
    rng = f"0.5-99.5 percentile range {lo:.0f}..{hi:.0f}"
    air = float(np.mean((values >= AIR_WINDOW_HU[0]) & (values <= AIR_WINDOW_HU[1])))
    soft = float(np.mean((values >= SOFT_TISSUE_WINDOW_HU[0]) & (values <= SOFT_TISSUE_WINDOW_HU[1])))
    if air < MIN_AIR_FRACTION:
        raise NotQualifyingError(
            f"intensities do not look like CT HU: no air near -1000 HU ({rng}); MR, PET or non-HU units?"
        )
    if hi > MAX_P995_HU:
        raise NotQualifyingError(f"intensities do not look like CT HU: implausibly high values ({rng})")
    if soft < MIN_SOFT_TISSUE_FRACTION:
        raise NotQualifyingError(f"intensities do not look like CT HU: almost no soft-tissue values ({rng})")
