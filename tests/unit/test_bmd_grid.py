"""The working grid's fast paths give exactly what the plain scipy / numpy operations give
(dicomnode.bmd.grid): the threaded block mean and the sparse opening are speed-ups, never approximations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from dicomnode.bmd.grid import (
    CoarseGrid,
    _block_mean,
    _block_mean_axis,
    coarse_to_full,
    fill_holes_2d,
    full_bbox_of_coarse,
    make_coarse,
    sparse_binary_opening,
)
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


#: shapes and block factors: odd remainders, a single slice, and one over the threading threshold
BLOCK_CASES = [
    ((7, 9, 11), (3, 2, 1)),
    ((1, 5, 5), (1, 3, 3)),
    ((33, 17, 20), (2, 4, 3)),
    ((120, 130, 140), (2, 2, 2)),
]


@pytest.mark.parametrize(("shape", "factors"), BLOCK_CASES)
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


@pytest.mark.parametrize(("shape", "factors"), BLOCK_CASES)
def test_slab_block_mean_is_bit_identical(shape: tuple[int, int, int], factors: tuple[int, int, int]) -> None:
    # the slab by slab mean (make_coarse's) against the whole-volume passes, axis by axis
    a = (np.random.default_rng(6).standard_normal(shape) * 300).astype(np.float32)
    ref = _plain_block_mean(a, factors)
    d = _block_mean(a, factors)
    assert d.dtype == np.float32 and d.shape == ref.shape
    assert np.array_equal(d.view(np.uint32), ref.view(np.uint32))


def _plain_fill_holes_2d(m: np.ndarray) -> np.ndarray:
    """Slice by slice hole filling as written before: scipy's fill on a z-padded volume."""
    st2 = np.zeros((3, 3, 3), dtype=bool)
    st2[1] = ndi.generate_binary_structure(2, 1)
    padded = np.pad(m, ((1, 1), (0, 0), (0, 0)))
    return np.asarray(ndi.binary_fill_holes(padded, structure=st2)[1:-1], dtype=bool)


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_2d_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 40, 3))
    m = ndi.gaussian_filter(rng.random(shape), 1.2) > rng.uniform(0.45, 0.55)
    assert np.array_equal(fill_holes_2d(m), _plain_fill_holes_2d(m))
    for full in (np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)):
        assert np.array_equal(fill_holes_2d(full), _plain_fill_holes_2d(full))


def test_coarse_to_full_from_a_crop_equals_the_whole_grid() -> None:
    rng = np.random.default_rng(7)
    for spacing in ((0.7, 0.7, 1.0), (0.8, 0.8, 5.0), (2.0, 2.0, 0.625)):
        full_shape = (40, 60, 50)
        step = (2.0 / spacing[0], 2.0 / spacing[1], 2.0 / spacing[2])
        coarse = (int(full_shape[0] / step[2]) + 1, int(full_shape[1] / step[1]) + 1, 26)
        grid = CoarseGrid(np.zeros(coarse, dtype=np.float32), 2.0, step, full_shape)
        labels = np.zeros(coarse, dtype=np.uint8)
        z0, y0, x0 = (int(v) for v in rng.integers(0, 4, 3))
        labels[z0 : z0 + 6, y0 + 3 : y0 + 12, x0 + 5 : x0 + 14] = ndi.binary_opening(
            rng.random((6, 9, 9)) < 0.8
        )
        m = labels > 0
        if not m.any():
            continue
        bbox = full_bbox_of_coarse(grid, m, 4.0)
        ref, _ = coarse_to_full(grid, m, bbox)
        # the crop _labels_to_full takes: the label's box plus the margin it reads
        box = ndi.find_objects(labels)[0]
        pad = [int(np.ceil(4.0 / 2.0 + 1.0 / st)) + 2 for st in (step[2], step[1], step[0])]
        crop = tuple(
            slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, coarse, strict=True)
        )
        origin = (crop[0].start, crop[1].start, crop[2].start)
        assert full_bbox_of_coarse(grid, m[crop], 4.0, origin=origin) == bbox
        got, _ = coarse_to_full(grid, m[crop], bbox, origin=origin)
        assert np.array_equal(got, ref)
        ref_n, _ = coarse_to_full(grid, m, bbox, smooth=False)
        got_n, _ = coarse_to_full(grid, m[crop], bbox, smooth=False, origin=origin)
        assert np.array_equal(got_n, ref_n)
