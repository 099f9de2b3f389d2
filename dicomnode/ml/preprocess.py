"""Pure preprocessing shared by training and inference (numpy/scipy, no torch).

A network sees exactly what its bundle's :class:`~dicomnode.ml.bundle.InputSpec` describes: the canonical
(LPS) volume resampled to ``spacing_mm``, intensity-normalised, clipped to ``intensity_window`` and scaled to
[0, 1]. Training and inference both call :func:`prepare`, so they cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.imaging.volume import Volume

F32 = npt.NDArray[np.float32]

#: Reference HU the fat and soft-tissue histogram peaks are mapped to by "fat-soft-tissue" normalisation.
FAT_REF_HU = -100.0
SOFT_REF_HU = 50.0


@dataclass(frozen=True)
class Grid:
    """How a resampled array relates to the canonical one: ``old_index = new_index * scale + shift``
    per numpy axis (k, j, i), plus the resampled array's LPS affine."""

    scale: tuple[float, float, float]
    shift: tuple[float, float, float]
    shape: tuple[int, int, int]  # resampled shape
    source_shape: tuple[int, int, int]  # canonical shape
    affine: npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Prepared:
    """A series ready for a network: ``array`` in [0, 1] on ``grid``; ``canonical`` is the source volume."""

    array: F32
    grid: Grid
    canonical: Volume
    normalisation: tuple[float, float]  # (gain, offset) applied to HU before windowing
    notes: tuple[str, ...] = ()


def resample_grid(canonical: Volume, spacing_mm: tuple[float, float, float]) -> Grid:
    """The resampled grid (centre-aligned, like ``scipy.ndimage.zoom(grid_mode=True)``).

    Parameters
    ----------
    canonical : Volume
        Canonical volume.
    spacing_mm : (float, float, float)
        Target spacing along i, j, k.

    Returns
    -------
    Grid
        The index mapping.
    """
    src_sp_kji = canonical.spacing[::-1]
    tgt_kji = tuple(spacing_mm)[::-1]
    shape_in = canonical.shape
    scale = tuple(t / s for t, s in zip(tgt_kji, src_sp_kji, strict=True))
    shape = tuple(max(1, round(n / sc)) for n, sc in zip(shape_in, scale, strict=True))
    shift = tuple(0.5 * sc - 0.5 for sc in scale)
    aff = canonical.affine.copy()
    # voxel axis i is numpy axis 2 etc.; column c of the affine scales with that axis' factor
    for col, ax in ((0, 2), (1, 1), (2, 0)):
        aff[:3, 3] = aff[:3, 3] + canonical.affine[:3, col] * shift[ax]
        aff[:3, col] = canonical.affine[:3, col] * scale[ax]
    return Grid(
        scale=(scale[0], scale[1], scale[2]),
        shift=(shift[0], shift[1], shift[2]),
        shape=(shape[0], shape[1], shape[2]),
        source_shape=shape_in,
        affine=aff,
    )


def _coords(grid: Grid, to_source: bool, out_shape: tuple[int, int, int]) -> list[npt.NDArray[np.float64]]:
    axes = []
    for ax in range(3):
        n = np.arange(out_shape[ax], dtype=np.float64)
        if to_source:  # sample the source at the resampled grid's points
            axes.append(n * grid.scale[ax] + grid.shift[ax])
        else:  # sample the resampled array at the source grid's points
            axes.append((n - grid.shift[ax]) / grid.scale[ax])
    return axes


def _separable_resample(arr: npt.NDArray[Any], axes: list[npt.NDArray[np.float64]], order: int) -> Any:
    """Resample along each axis in turn (linear or nearest): exact for axis-aligned grids, low memory."""
    out = arr
    for ax, coords in enumerate(axes):
        n = out.shape[ax]
        c = np.clip(coords, 0, n - 1)
        if order == 0:
            idx = np.clip(np.round(c).astype(np.int64), 0, n - 1)
            out = np.take(out, idx, axis=ax)
        else:
            lo = np.floor(c).astype(np.int64)
            hi = np.minimum(lo + 1, n - 1)
            w = (c - lo).astype(np.float32)
            shape = [1, 1, 1]
            shape[ax] = len(c)
            w = w.reshape(shape)
            out = np.take(out, lo, axis=ax) * (1.0 - w) + np.take(out, hi, axis=ax) * w
    return out


def resample_to(arr: npt.NDArray[Any], grid: Grid, order: int = 1) -> Any:
    """Canonical-grid array -> resampled grid (order 1 linear for images, 0 nearest for labels)."""
    src = arr.astype(np.float32) if order else arr
    return _separable_resample(src, _coords(grid, True, grid.shape), order)


def resample_back(arr: npt.NDArray[Any], grid: Grid, order: int = 1) -> Any:
    """Resampled-grid array -> canonical grid (e.g. class probabilities before argmax)."""
    src = arr.astype(np.float32) if order else arr
    return _separable_resample(src, _coords(grid, False, grid.source_shape), order)


def tissue_peaks(hu: npt.NDArray[Any]) -> tuple[float, float] | None:
    """Modes of the fat (-200..-40 HU) and soft-tissue (0..120 HU) histogram peaks, or None if absent.

    Why: a phantomless internal reference (as in internal QCT calibration) that removes the per-scanner gain
    and offset of HU before a network sees them.
    """
    v = hu[(hu > -250.0) & (hu < 170.0)]
    if v.size < 1000:
        return None
    hist, edges = np.histogram(v, bins=np.arange(-250.0, 172.0, 2.0))
    kernel = np.exp(-0.5 * (np.arange(-5, 6) / 2.0) ** 2)
    smooth = np.convolve(hist.astype(np.float64), kernel / kernel.sum(), mode="same")
    centres = (edges[:-1] + edges[1:]) / 2.0
    fat_sel = (centres >= -200.0) & (centres <= -40.0)
    soft_sel = (centres >= 0.0) & (centres <= 120.0)
    if (
        smooth[fat_sel].max(initial=0.0) < 0.002 * v.size
        or smooth[soft_sel].max(initial=0.0) < 0.002 * v.size
    ):
        return None
    fat = float(centres[fat_sel][np.argmax(smooth[fat_sel])])
    soft = float(centres[soft_sel][np.argmax(smooth[soft_sel])])
    if soft - fat < 60.0:
        return None
    return fat, soft


def prepare(
    volume: Volume,
    spacing_mm: tuple[float, float, float],
    window: tuple[float, float],
    normalisation: str = "none",
) -> Prepared:
    """Canonical -> resampled -> normalised -> windowed to [0, 1].

    Parameters
    ----------
    volume : Volume
        HU volume.
    spacing_mm : (float, float, float)
        Target spacing (i, j, k).
    window : (float, float)
        HU range mapped to [0, 1] (clipped).
    normalisation : str
        ``none`` or ``fat-soft-tissue`` (map the fat and soft-tissue peaks to -100 / 50 HU).

    Returns
    -------
    Prepared
        The array and how to map back.
    """
    canonical = volume.canonical()
    grid = resample_grid(canonical, spacing_mm)
    arr = resample_to(canonical.data, grid, order=1).astype(np.float32)
    gain, offset = 1.0, 0.0
    notes: list[str] = []
    if normalisation == "fat-soft-tissue":
        peaks = tissue_peaks(arr)
        if peaks is None:
            notes.append("intensity normalisation skipped: no fat/soft-tissue peaks")
        else:
            fat, soft = peaks
            gain = (SOFT_REF_HU - FAT_REF_HU) / (soft - fat)
            offset = FAT_REF_HU - gain * fat
            arr = arr * np.float32(gain) + np.float32(offset)
    elif normalisation != "none":
        raise ValueError(f"unknown intensity normalisation {normalisation!r}")
    lo, hi = window
    arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return Prepared(arr, grid, canonical, (gain, offset), tuple(notes))


def crop(
    arr: npt.NDArray[Any], center: tuple[float, float, float], size: tuple[int, int, int], fill: float = 0.0
) -> Any:
    """A box of ``size`` around ``center`` (k, j, i, voxel units), padded with ``fill`` outside the array."""
    out = np.full(size, fill, dtype=arr.dtype)
    src_sl = []
    dst_sl = []
    for ax in range(3):
        start = math.floor(center[ax] - size[ax] / 2.0 + 0.5)
        s0, s1 = max(start, 0), min(start + size[ax], arr.shape[ax])
        if s1 <= s0:
            return out
        src_sl.append(slice(s0, s1))
        dst_sl.append(slice(s0 - start, s1 - start))
    out[tuple(dst_sl)] = arr[tuple(src_sl)]
    return out


def pad_to_multiple(
    arr: npt.NDArray[Any], multiple: int, fill: float = 0.0
) -> tuple[Any, tuple[int, int, int]]:
    """Pad at the end of each axis to a multiple of ``multiple``; returns the array and the original shape."""
    shape = arr.shape
    pads = [(0, (-n) % multiple) for n in shape]
    return np.pad(arr, pads, constant_values=fill), (int(shape[0]), int(shape[1]), int(shape[2]))


def hu_normalisation(canonical: Volume, normalisation: str) -> tuple[float, float, tuple[str, ...]]:
    """``(gain, offset, notes)`` mapping a volume's HU onto the reference fat / soft-tissue peaks.

    The peaks are found on a subsample of at most about four million voxels: the histogram modes do not
    need every voxel, and a full-resolution series has a hundred million.

    Parameters
    ----------
    canonical : Volume
        Canonical HU volume.
    normalisation : str
        ``none`` or ``fat-soft-tissue``.

    Returns
    -------
    (gain, offset, notes)
        ``hu * gain + offset`` is normalised; ``notes`` says when the peaks were not found.
    """
    if normalisation == "none":
        return 1.0, 0.0, ()
    if normalisation != "fat-soft-tissue":
        raise ValueError(f"unknown intensity normalisation {normalisation!r}")
    step = max(1, math.ceil((canonical.data.size / 4e6) ** (1.0 / 3.0)))
    peaks = tissue_peaks(np.asarray(canonical.data[::step, ::step, ::step], np.float32))
    if peaks is None:
        return 1.0, 0.0, ("intensity normalisation skipped: no fat/soft-tissue peaks",)
    fat, soft = peaks
    gain = (SOFT_REF_HU - FAT_REF_HU) / (soft - fat)
    return gain, FAT_REF_HU - gain * fat, ()


def sagittal_planes(
    volume: Volume,
    centre_lps: tuple[float, float, float],
    size: tuple[int, int],
    spacing_mm: float,
    slab_mm: float,
    window: tuple[float, float],
    normalisation: str = "none",
    lr_offsets_mm: tuple[float, ...] = (0.0,),
) -> tuple[F32, tuple[str, ...]]:
    """Sagittal reformats centred on ``centre_lps``, normalised and windowed to [0, 1].

    Each plane is the mean of planes spread over ``slab_mm`` across left-right (a thin slab, as a
    radiologist's sagittal MPR, which averages noise out), sampled with linear interpolation on a square grid
    of ``spacing_mm``. Rows run superior to inferior, columns anterior to posterior (the usual sagittal
    display). Outside the volume counts as air.

    Parameters
    ----------
    volume : Volume
        HU volume (any orientation; it is made canonical first).
    centre_lps : (float, float, float)
        The reformat's centre (LPS mm); its x is the sagittal plane.
    size : (int, int)
        Rows (S-I) and columns (A-P) in pixels.
    spacing_mm : float
        Pixel size (mm).
    slab_mm : float
        Left-right thickness averaged into each plane (0 = a single plane).
    window : (float, float)
        HU range mapped to [0, 1] (clipped).
    normalisation : str
        ``none`` or ``fat-soft-tissue`` (see :func:`hu_normalisation`).
    lr_offsets_mm : tuple of float
        Planes to make, as left-right shifts of the centre (mm); training uses a few for augmentation.

    Returns
    -------
    (planes, notes)
        ``(len(lr_offsets_mm), rows, cols)`` float32 and the normalisation notes.
    """
    from scipy import ndimage

    canonical = volume.canonical()
    gain, offset, notes = hu_normalisation(canonical, normalisation)
    rows, cols = int(size[0]), int(size[1])
    cx, cy, cz = (float(v) for v in centre_lps)
    z = cz + ((rows - 1) / 2.0 - np.arange(rows)) * spacing_mm
    y = cy + (np.arange(cols) - (cols - 1) / 2.0) * spacing_mm
    n_slab = max(1, math.ceil(slab_mm / canonical.spacing[0])) if slab_mm > 0 else 1
    slab = np.linspace(-slab_mm / 2.0, slab_mm / 2.0, n_slab) if n_slab > 1 else np.zeros(1)
    out = np.empty((len(lr_offsets_mm), rows, cols), np.float32)
    zz, yy = np.meshgrid(z, y, indexing="ij")
    for n, dx in enumerate(lr_offsets_mm):
        acc = np.zeros((rows, cols), np.float64)
        for s in slab:
            lps = np.stack([np.full_like(zz, cx + dx + s), yy, zz], axis=-1)
            ijk = canonical.lps_to_index(lps.reshape(-1, 3))
            vals = ndimage.map_coordinates(
                canonical.data, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=1, mode="constant", cval=-1000.0
            )
            acc += vals.reshape(rows, cols)
        out[n] = (acc / len(slab)).astype(np.float32)
    lo, hi = window
    out = np.clip((out * np.float32(gain) + np.float32(offset) - lo) / (hi - lo), 0.0, 1.0)
    return out.astype(np.float32), notes
