"""The measurement's fast paths give exactly what the plain scipy forms give: the 2-D openings and
closings of the working grid's slices, the labelled marrow holes of a slice and the column distance of an
ROI are speed-ups, never approximations."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage as ndi

from dicomnode.bmd.classical import _fill_bright_holes
from dicomnode.bmd.grid import binary_closing_2d, binary_opening_2d, disk
from dicomnode.bmd.roi import _column_distance

STRUCTURES = [
    disk(1),
    disk(2),
    disk(4),
    ndi.generate_binary_structure(2, 1),
    np.ones((3, 3), dtype=bool),
    np.ones((1, 3), dtype=bool),
]


def _blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    return np.asarray(ndi.gaussian_filter(rng.random(shape), rng.uniform(0.7, 2.0)) > rng.uniform(0.4, 0.6))


@pytest.mark.parametrize("seed", range(5))
def test_2d_opening_and_closing_equal_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(10):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        m = _blobs(rng, shape) if rng.random() < 0.8 else rng.random(shape) < 0.7
        for st in STRUCTURES:
            assert np.array_equal(binary_opening_2d(m, st), ndi.binary_opening(m, structure=st))
            assert np.array_equal(binary_closing_2d(m, st), ndi.binary_closing(m, structure=st))


def test_2d_opening_of_an_asymmetric_structure_falls_back_to_scipy() -> None:
    m = np.random.default_rng(6).random((15, 17)) < 0.6
    st = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    assert np.array_equal(binary_opening_2d(m, st), ndi.binary_opening(m, structure=st))
    assert np.array_equal(binary_closing_2d(m, st), ndi.binary_closing(m, structure=st))


def _plain_fill_bright_holes(
    closed: npt.NDArray[np.bool_], hu2: npt.NDArray[np.float32], min_hu: float, behind_y: float | None
) -> npt.NDArray[np.bool_]:
    """The marrow-hole filling as written before: scipy's fill, then the holes labelled again."""
    filled = np.asarray(ndi.binary_fill_holes(closed), dtype=bool)
    holes = filled & ~closed
    if not holes.any():
        return filled
    lab, n = ndi.label(holes)
    idx = np.arange(1, n + 1)
    med = np.asarray(ndi.median(hu2, lab, idx))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = med > min_hu
    if behind_y is not None:
        cy = np.array([c[0] for c in ndi.center_of_mass(holes, lab, idx)])
        keep[1:] &= cy <= behind_y
    return np.asarray(closed | keep[lab], dtype=bool)


@pytest.mark.parametrize("seed", range(5))
def test_fill_bright_holes_equals_the_scipy_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    holes_seen = 0
    for _ in range(30):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        closed = _blobs(rng, shape)
        hu2 = rng.normal(40.0, 30.0, shape).astype(np.float32)
        holes_seen += int((ndi.binary_fill_holes(closed) & ~closed).any())
        for behind_y in (None, shape[0] / 2):
            got = _fill_bright_holes(closed, hu2, 40.0, behind_y)
            assert got.dtype == np.bool_
            assert np.array_equal(got, _plain_fill_bright_holes(closed, hu2, 40.0, behind_y))
    assert holes_seen > 0


@pytest.mark.parametrize("sz", [0.625, 0.7, 1.0, 1.25, 3.0])
def test_column_distance_equals_the_anisotropic_edt(sz: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        shape = tuple(int(v) for v in rng.integers(1, 25, 3))
        padded = np.pad(_blobs(rng, shape), 1)
        ref = ndi.distance_transform_edt(padded, sampling=(sz, 1e4, 1e4))
        got = _column_distance(padded, sz)
        assert got.dtype == np.float64
        assert np.array_equal(got.view(np.uint64), np.asarray(ref).view(np.uint64))
