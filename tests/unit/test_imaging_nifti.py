"""NIfTI loading (RAS -> LPS, axis order) and the CT-HU plausibility check, on synthetic images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest

from dicomnode.errors import InputError, NotQualifyingError
from dicomnode.imaging.loader import load_path
from dicomnode.imaging.nifti import check_ct_hu, load_nifti
from dicomnode.imaging.volume import Volume


def phantom_hu(shape: tuple[int, int, int] = (40, 40, 20)) -> npt.NDArray[np.float32]:
    """A body-like phantom in HU, array order (i, j, k): air around a water cylinder with a bone rod."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(i - shape[0] / 2, j - shape[1] / 2)
    sl = np.where(r < shape[0] * 0.35, 40.0, -1000.0)
    sl = np.where(r < 3, 700.0, sl)
    rng = np.random.default_rng(1)
    vol = np.repeat(sl[:, :, None], shape[2], axis=2) + rng.normal(0, 15, shape)
    return vol.astype(np.float32)


def write(path: Path, data: npt.NDArray[np.float32], affine: npt.NDArray[np.float64]) -> Path:
    image: Any = nib.Nifti1Image  # nibabel's constructor is untyped
    nib.save(image(data, affine), str(path))
    return path


def test_load_nifti_converts_ras_to_lps_and_axis_order(tmp_path: Path) -> None:
    data = phantom_hu()
    data[5, 7, 3] = 1234.0  # marker at nibabel index (i, j, k)
    ras = np.array([[-0.7, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    vol = load_nifti(write(tmp_path / "a.nii.gz", data, ras))
    assert vol.shape == (20, 40, 40)  # [k, j, i]
    assert vol.data[3, 7, 5] == pytest.approx(1234.0)
    x, y, z = (ras @ np.array([5, 7, 3, 1.0]))[:3]
    np.testing.assert_allclose(vol.index_to_lps((5, 7, 3)), (-x, -y, z))
    assert vol.header["Modality"] is None and vol.header["source_format"] == "nifti"
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_load_nifti_4d_single_volume_and_errors(tmp_path: Path) -> None:
    data = phantom_hu()[..., None]
    vol = load_nifti(write(tmp_path / "a.nii", data, np.eye(4)))
    assert vol.shape == (20, 40, 40)
    with pytest.raises(InputError, match="expected a 3-D image"):
        load_nifti(write(tmp_path / "b.nii", np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))
    bad = tmp_path / "c.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="unreadable NIfTI"):
        load_nifti(bad)


def test_check_ct_hu_accepts_body_phantom() -> None:
    vol = Volume(data=np.ascontiguousarray(phantom_hu().transpose(2, 1, 0)), affine=np.eye(4))
    check_ct_hu(vol)


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda a: a + 1024.0, "no air"),  # stored values without the rescale intercept
        (lambda a: np.clip((a + 1000.0) * 0.3, 0, None), "no air"),  # MR-like arbitrary units
        (lambda a: np.full_like(a, -1000.0), "soft-tissue"),  # nothing but air
        (lambda a: np.where(a > 0, a * 10.0, a), "implausibly high"),  # wrong scaling of dense values
    ],
)
def test_check_ct_hu_rejects_non_hu(transform: object, message: str) -> None:
    data = transform(phantom_hu())  # type: ignore[operator]
    vol = Volume(data=np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)), affine=np.eye(4))
    with pytest.raises(NotQualifyingError, match=message):
        check_ct_hu(vol)


def test_load_path_nifti_checks_hu(tmp_path: Path) -> None:
    good = write(tmp_path / "ct.nii.gz", phantom_hu(), np.eye(4))
    loaded = load_path(good)
    assert loaded.volume is not None and loaded.series == ()
    mr = write(tmp_path / "mr.nii.gz", phantom_hu() + 1024.0, np.eye(4))
    with pytest.raises(NotQualifyingError):
        load_path(mr)
    assert load_path(mr, require_ct_hu=False).volume is not None
