"""The working grid's fast paths give exactly what the plain scipy / numpy operations give
(dicomnode.bmd.grid): the threaded block mean and the sparse opening are speed-ups, never approximations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from dicomnode.bmd.grid import _block_mean_axis, make_coarse, sparse_binary_opening
from dicomnode.imaging.volume import Volume


def _ball(r: int) -> np.ndarray:
    return np.asarray(np.sum(np.square(np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]), axis=0) <= r * r)


def _plain_block_mean(d: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """The block mean as written before: one new array per strided add."""
    for axis, fa in enumerate(factors):
        if fa <= 1:
            continue
        n = (d.shape[axis] // fa) * fa
        acc = None
        for o in range(fa):
            sl = [slice(None)] * 3
            sl[axis] = slice(o, n, fa)
            part = d[tuple(sl)]
            acc = part.astype(np.float32, copy=True) if acc is None else acc + part
        assert acc is not None
        d = acc * np.float32(1.0 / fa)
    return d


@pytest.mark.parametrize(
    ("shape", "factors"),
    [
        ((7, 9, 11), (3, 2, 1)),
        ((1, 5, 5), (1, 3, 3)),
        ((33, 17, 20), (2, 4, 3)),
        ((120, 130, 140), (2, 2, 2)),
    ],
)
def test_block_mean_is_bit_identical(shape: tuple[int, int, int], factors: tuple[int, int, int]) -> None:
    # the last case is over the threading threshold (two slabs per axis)
    a = (np.random.default_rng(1).standard_normal(shape) * 300).astype(np.float32)
    d = a
    for axis, fa in enumerate(factors):
        if fa > 1:
            d = _block_mean_axis(d, axis, fa)
    ref = _plain_block_mean(a, factors)
    assert d.dtype == np.float32 and d.shape == ref.shape
    assert np.array_equal(d.view(np.uint32), ref.view(np.uint32))


def test_make_coarse_of_a_small_volume() -> None:
    data = (np.random.default_rng(2).standard_normal((40, 64, 64)) * 10).astype(np.float32)
    grid = make_coarse(Volume(data=data, affine=np.diag([0.7, 0.7, 1.0, 1.0])))
    assert grid.hu.dtype == np.float32
    assert grid.hu.shape == (20, 23, 23)
    assert abs(float(grid.hu.mean()) - float(data.mean())) < 0.5


@pytest.mark.parametrize("density", [0.01, 0.3, 0.9, 1.0])
def test_sparse_opening_equals_scipy(density: float) -> None:
    rng = np.random.default_rng(3)
    for _ in range(8):
        shape = tuple(int(v) for v in rng.integers(1, 25, 3))
        mask = rng.random(shape) < density
        for st in (_ball(1), _ball(2), _ball(3), np.ones((3, 3, 3), dtype=bool)):
            assert np.array_equal(sparse_binary_opening(mask, st), ndi.binary_opening(mask, structure=st))


def test_sparse_opening_of_blobs_touching_the_border() -> None:
    rng = np.random.default_rng(4)
    mask = ndi.binary_dilation(rng.random((30, 40, 35)) < 0.01, iterations=3)
    mask[:, :, 0] |= mask[:, :, 1]
    ball = _ball(3)
    assert np.array_equal(sparse_binary_opening(mask, ball), ndi.binary_opening(mask, structure=ball))


def test_sparse_opening_of_an_asymmetric_structure_falls_back_to_scipy() -> None:
    mask = np.random.default_rng(5).random((12, 12, 12)) < 0.6
    st = np.zeros((3, 3, 3), dtype=bool)
    st[1, 1, 1:] = True
    assert np.array_equal(sparse_binary_opening(mask, st), ndi.binary_opening(mask, structure=st))
