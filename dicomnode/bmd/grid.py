"""The coarse isotropic working grid used for detection, and the mapping back to the canonical grid.

Detection runs on a ~2 mm isotropic copy of the canonical volume (block mean, then linear interpolation),
so thresholds and structuring elements are in millimetres whatever the acquisition; ROI statistics go back
to the full-resolution canonical data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from dicomnode.imaging.volume import Volume

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]

#: Working grid spacing (mm): fine enough for 25 mm vertebral bodies and 8 mm discs, coarse enough to be fast.
GRID_MM = 2.0


@dataclass(frozen=True, eq=False)
class CoarseGrid:
    """A coarse isotropic copy of a canonical volume: ``hu[z, y, x]``, x -> L, y -> P, z -> S.

    Coarse voxel ``c`` (per axis) sits at canonical fractional index ``c * step`` where
    ``step = g / spacing``.
    """

    hu: F32
    g: float
    step: tuple[float, float, float]  # canonical index per coarse index along (i, j, k)
    full_shape: tuple[int, int, int]  # canonical data shape [k, j, i]

    def to_canonical_index(self, zyx: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Coarse (z, y, x) -> canonical fractional (i, j, k)."""
        p = np.asarray(zyx, dtype=np.float64)
        return np.stack(
            [p[..., 2] * self.step[0], p[..., 1] * self.step[1], p[..., 0] * self.step[2]], axis=-1
        )


def _block_mean_axis(d: F32, axis: int, fa: int, workers: int = 2) -> F32:
    """Mean of ``fa`` consecutive samples along ``axis`` (the remainder dropped).

    The sum is taken in the order ``((d0 + d1) + d2) + ...`` then scaled by ``float32(1 / fa)``, element by
    element, so splitting the work into slabs along another axis gives the same bits. Two threads share the
    slabs: numpy releases the GIL in these element-wise loops, which are most of ``make_coarse``'s time.
    """
    n = (d.shape[axis] // fa) * fa
    shape = list(d.shape)
    shape[axis] = n // fa
    out = np.empty(shape, dtype=np.float32)
    scale = np.float32(1.0 / fa)
    split = 1 if axis == 0 else 0  # slabs along an axis that is not reduced
    edges = [shape[split] * w // workers for w in range(workers + 1)]

    def slab(lo: int, hi: int) -> None:
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[split] = dst[split] = slice(lo, hi)
        acc = out[tuple(dst)]
        for o in range(fa):
            src[axis] = slice(o, n, fa)
            part = d[tuple(src)]
            if o == 0:
                acc[...] = part
            else:
                np.add(acc, part, out=acc)
        np.multiply(acc, scale, out=acc)

    _run_slabs(slab, edges, out.size)
    return out


def _run_slabs(work: Callable[[int, int], None], edges: list[int], size: int) -> None:
    """Run ``work(lo, hi)`` for each non-empty range between consecutive ``edges``: in one thread for a
    small volume (< 1e6 output voxels, not worth a thread), else one thread per range (numpy releases the
    GIL)."""
    bounds = [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]
    if len(bounds) <= 1 or size < 1_000_000:
        for lo, hi in bounds:
            work(lo, hi)
        return
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        for fut in [pool.submit(work, lo, hi) for lo, hi in bounds]:
            fut.result()


#: Output slices (along axis 0) per slab of :func:`_block_mean`: the slab's intermediates stay in cache.
BLOCK_SLAB = 4


def _block_mean(d: F32, f: tuple[int, int, int], workers: int = 2) -> F32:
    """Block mean of ``f[a]`` consecutive samples along each axis ``a`` (remainders dropped).

    The same sums in the same order as :func:`_block_mean_axis` along axis 0, then 1, then 2 (so the
    same bits), done slab by slab of a few output slices along axis 0: each slab's intermediates are a few
    MB and stay in cache, where the whole-volume passes wrote and read back arrays of 40-160 MB (fresh
    memory that the kernel had to zero first). Two threads share the slabs (numpy releases the GIL).
    """
    if f == (1, 1, 1):
        return d
    n0 = d.shape[0] // f[0]
    out = np.empty((n0, d.shape[1] // f[1], d.shape[2] // f[2]), dtype=np.float32)

    def slabs(lo: int, hi: int) -> None:
        for s0 in range(lo, hi, BLOCK_SLAB):
            s1 = min(hi, s0 + BLOCK_SLAB)
            part = d[s0 * f[0] : s1 * f[0]]
            for axis, fa in enumerate(f):
                if fa > 1:
                    part = _block_mean_axis(part, axis, fa, workers=1)
            out[s0:s1] = part

    _run_slabs(slabs, [n0 * w // workers for w in range(workers + 1)], out.size)
    return out


def make_coarse(canon: Volume, g: float = GRID_MM) -> CoarseGrid:
    """Block-mean then linearly interpolate the canonical volume onto a ``g`` mm isotropic grid."""
    sx, sy, sz = canon.spacing
    data = canon.data
    f = [max(1, int(np.floor(g / s + 1e-6))) for s in (sz, sy, sx)]  # numpy axis order k, j, i
    # block mean one axis at a time, by strided sums written into preallocated arrays (far faster than a
    # 6-D reshape mean on big volumes), slab by slab
    d = _block_mean(np.asarray(data, dtype=np.float32), (f[0], f[1], f[2]))
    s_np = (sz, sy, sx)
    out_shape = tuple(max(1, int(np.floor((data.shape[a] - 1) * s_np[a] / g)) + 1) for a in range(3))
    # coarse index c -> original index c*g/s -> block index (c*g/s - (f-1)/2) / f
    matrix = np.array([g / (s_np[a] * f[a]) for a in range(3)])
    offset = np.array([-(f[a] - 1) / (2.0 * f[a]) for a in range(3)])
    hu = ndi.affine_transform(
        np.asarray(d, dtype=np.float32),
        matrix,
        offset=offset,
        output_shape=out_shape,
        order=1,
        mode="nearest",
    )
    hu = np.asarray(hu, dtype=np.float32)  # float32 in, float32 out: no copy
    return CoarseGrid(
        hu=equalise_noise(hu),
        g=g,
        step=(g / sx, g / sy, g / sz),
        full_shape=(data.shape[0], data.shape[1], data.shape[2]),
    )


#: Detection thresholds assume at most this much noise (HU SD of one working-grid voxel in soft tissue).
NOISE_TARGET_HU = 10.0
#: The smoothing that brings a noisy scan down to the target is capped (working-grid voxels): it must not
#: erase a rib or a thin disc.
NOISE_MAX_SIGMA = 1.0


def noise_sd(hu: F32) -> float:
    """Robust noise SD (HU) of one voxel in soft tissue (-150 ... 150 HU): the MAD of the difference between
    each voxel and the mean of its 6 face neighbours, rescaled to one voxel's SD (white noise)."""
    core = hu[1:-1, 1:-1, 1:-1]
    nb = (
        hu[:-2, 1:-1, 1:-1] + hu[2:, 1:-1, 1:-1] + hu[1:-1, :-2, 1:-1]
        + hu[1:-1, 2:, 1:-1] + hu[1:-1, 1:-1, :-2] + hu[1:-1, 1:-1, 2:]
    ) / 6.0  # fmt: skip
    soft = (core > -150.0) & (core < 150.0) & (nb > -150.0) & (nb < 150.0)
    if soft.sum() < 1000:
        return 0.0
    d = (core - nb)[soft]
    d = d[:: max(1, d.size // 200_000)]
    # var(x - mean of 6) = sigma^2 (1 + 1/6) for white noise
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(1.0 + 1.0 / 6.0))


def equalise_noise(hu: F32) -> F32:
    """Bring a noisy working grid down to ``NOISE_TARGET_HU`` with a Gaussian (sigma capped at
    ``NOISE_MAX_SIGMA`` voxels), so that the detection thresholds see the same image whatever the dose and
    kernel: the same patient scanned noisier must give the same anatomy. Quiet scans are left as they are.

    A 3-D Gaussian of sigma ``s`` voxels divides white noise by about ``(2 sqrt(pi) s)^1.5``."""
    sd = noise_sd(hu)
    if sd <= NOISE_TARGET_HU:
        return hu
    s = min(NOISE_MAX_SIGMA, (sd / NOISE_TARGET_HU) ** (2.0 / 3.0) / (2.0 * np.sqrt(np.pi)))
    return np.asarray(ndi.gaussian_filter(hu, s, mode="nearest"), dtype=np.float32)


def coarse_to_full(
    grid: CoarseGrid,
    mask: B,
    bbox: tuple[slice, slice, slice] | None = None,
    smooth: bool = True,
    origin: tuple[int, int, int] = (0, 0, 0),
) -> tuple[B, tuple[slice, slice, slice]]:
    """Bring a coarse mask onto the canonical grid (inside a canonical bbox [k, j, i]).

    Linear interpolation of the mask then 0.5 threshold gives a smooth boundary (no staircase).
    Returns the full-resolution mask of the bbox and the bbox itself.

    ``origin``: the coarse index (z, y, x) of ``mask[0, 0, 0]`` when ``mask`` is a crop of the working
    grid; the crop must hold every coarse voxel the bbox's samples read (their two neighbours per axis, or
    the grid's edge). The sample positions are shifted by whole voxels, exactly, so a crop gives the same
    mask as the whole grid.
    """
    if bbox is None:
        bbox = (slice(0, grid.full_shape[0]), slice(0, grid.full_shape[1]), slice(0, grid.full_shape[2]))
    ks = np.arange(bbox[0].start, bbox[0].stop) / grid.step[2]
    js = np.arange(bbox[1].start, bbox[1].stop) / grid.step[1]
    is_ = np.arange(bbox[2].start, bbox[2].stop) / grid.step[0]
    if smooth:
        coords = np.meshgrid(ks - origin[0], js - origin[1], is_ - origin[2], indexing="ij")
        out = ndi.map_coordinates(mask.astype(np.float32), coords, order=1, mode="nearest") >= 0.5
        return np.asarray(out, dtype=bool), bbox
    ck = np.clip(np.round(ks).astype(int), 0, origin[0] + mask.shape[0] - 1) - origin[0]
    cj = np.clip(np.round(js).astype(int), 0, origin[1] + mask.shape[1] - 1) - origin[1]
    ci = np.clip(np.round(is_).astype(int), 0, origin[2] + mask.shape[2] - 1) - origin[2]
    return np.asarray(mask[np.ix_(ck, cj, ci)], dtype=bool), bbox


def full_bbox_of_coarse(
    grid: CoarseGrid, mask: B, margin_mm: float, origin: tuple[int, int, int] = (0, 0, 0)
) -> tuple[slice, slice, slice]:
    """Canonical [k, j, i] bbox covering a coarse mask plus a margin (mm); ``origin`` as in
    :func:`coarse_to_full`."""
    zz, yy, xx = np.nonzero(mask)
    lo = np.array([zz.min() + origin[0], yy.min() + origin[1], xx.min() + origin[2]], dtype=float)
    hi = np.array([zz.max() + origin[0], yy.max() + origin[1], xx.max() + origin[2]], dtype=float)
    lo -= margin_mm / grid.g
    hi += margin_mm / grid.g
    steps = (grid.step[2], grid.step[1], grid.step[0])
    out = []
    for a in range(3):
        s0 = max(0, int(np.floor(lo[a] * steps[a])))
        s1 = min(grid.full_shape[a], int(np.ceil(hi[a] * steps[a])) + 1)
        out.append(slice(s0, s1))
    return (out[0], out[1], out[2])


def disk(radius_vox: int) -> B:
    """2-D disk structuring element."""
    r = int(radius_vox)
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(x * x + y * y <= r * r + 0.5, dtype=bool)


def body_mask(hu: F32, g: float) -> B:
    """The patient's body on the coarse grid: > -400 HU, opened by ~5 mm (drops the table and blankets that
    touch the skin), largest 3-D component, skin given back, holes filled slice by slice (lungs and bowel
    gas belong to the body). The morphology runs on every second row/column (4 mm) for speed; the final
    mask is at the working resolution."""
    m = hu > -400.0
    small = m[:, ::2, ::2]
    gs = 2.0 * g
    r = max(1, round(5.0 / gs))
    st = np.zeros((1, 2 * r + 1, 2 * r + 1), dtype=bool)
    st[0] = disk(r)
    small = ndi.binary_opening(small, structure=st)
    lab, n = ndi.label(small)
    if n == 0:
        return np.zeros_like(m)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    small = lab == int(np.argmax(sizes))
    small = ndi.binary_dilation(small, structure=st)
    up = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)[:, : m.shape[1], : m.shape[2]]
    return fill_holes_2d(up & m)


def background_holes(m: B, structure: B | None = None) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
    """The background of ``m`` labelled (``ndi.label(~m, structure)``, in scan order) and, per label, whether
    it is a hole: a component that does not reach the edge of its slice (the last two axes: a 2-D mask, or a
    stack of axial slices with an in-plane ``structure``). Label 0, the mask itself, is no hole."""
    lab, n = ndi.label(~np.asarray(m, dtype=bool), structure=structure)
    hole = np.ones(n + 1, dtype=bool)
    hole[0] = False
    for edge in (lab[..., 0, :], lab[..., -1, :], lab[..., :, 0], lab[..., :, -1]):
        hole[edge] = False
    return np.asarray(lab, dtype=np.int32), hole


def fill_holes_2d(m: B) -> B:
    """Fill holes slice by slice (axial), also in the first and last slice.

    A hole is a 4-connected component of a slice's background that does not touch the slice's edge (what
    ``ndi.binary_fill_holes`` with the in-plane cross fills; :func:`background_holes`): the same voxels as
    the iterated dilation of scipy's fill, in one labelling pass."""
    st2 = np.zeros((3, 3, 3), dtype=bool)
    st2[1] = ndi.generate_binary_structure(2, 1)
    lab, hole = background_holes(m, st2)
    filled: B = np.asarray(m, dtype=bool) | hole[lab]
    return filled


def _symmetric_offsets(structure: B, ndim: int) -> npt.NDArray[np.intp] | None:
    """The offsets (from the centre) of a structure with odd sizes that is point-symmetric (so that
    erosion and dilation need no reflection); None for any other structure."""
    st = np.asarray(structure, dtype=bool)
    if st.ndim != ndim or any(n % 2 == 0 for n in st.shape) or not np.array_equal(st, st[::-1, ::-1]):
        return None
    offsets: npt.NDArray[np.intp] = np.argwhere(st) - np.array(st.shape) // 2
    return offsets


def _shifted(mask: B, offsets: npt.NDArray[np.intp], erode: bool, border: bool = False) -> B:
    """Erosion (the AND of the mask shifted by each in-plane offset) or dilation (the OR) over the last two
    axes (a 2-D mask, or a stack of axial slices) by a point-symmetric structure's offsets; outside the
    image counts as ``border``."""
    ny, nx = mask.shape[-2:]
    r = int(np.abs(offsets).max()) if offsets.size else 0
    p = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(r, r), (r, r)], constant_values=border)
    out = np.full(mask.shape, erode, dtype=bool)
    for dy, dx in offsets:
        shifted = p[..., r + dy : r + dy + ny, r + dx : r + dx + nx]
        if erode:
            out &= shifted
        else:
            out |= shifted
    return out


def erode_in_plane(mask: B, structure: B, border: bool = False) -> B:
    """``ndi.binary_erosion`` of each axial slice (the last two axes) by a point-symmetric 2-D
    ``structure`` with odd sizes, outside the image counting as ``border``: the AND of the shifted slices,
    the same voxels without scipy's per-voxel structure loop."""
    offsets = _symmetric_offsets(structure, 2)
    if offsets is None:
        raise ValueError("erode_in_plane needs a point-symmetric 2-D structure with odd sizes")
    return _shifted(np.asarray(mask, dtype=bool), offsets, erode=True, border=border)


def _open_close_2d(mask: B, structure: B, closing: bool) -> B:
    """``ndi.binary_opening`` / ``binary_closing`` (one iteration, border 0) of a small 2-D mask.

    For a point-symmetric structure with odd sizes (a disk, a cross, a square) the erosion is the AND
    and the dilation the OR of the mask shifted by each of the structure's offsets: the same pixels as
    scipy's, several times faster on the slices of the working grid (scipy's per-pixel structure loop
    dominates there). Any other structure goes to scipy.
    """
    m = np.asarray(mask, dtype=bool)
    offsets = _symmetric_offsets(structure, 2)
    if offsets is None or m.ndim != 2 or m.size == 0:
        op = ndi.binary_closing if closing else ndi.binary_opening
        return np.asarray(op(m, structure=structure), dtype=bool)
    first = _shifted(m, offsets, erode=not closing)
    return _shifted(first, offsets, erode=closing)


def binary_opening_2d(mask: B, structure: B) -> B:
    """``ndi.binary_opening(mask, structure)`` of a small 2-D mask (see :func:`_open_close_2d`)."""
    return _open_close_2d(mask, structure, closing=False)


def binary_closing_2d(mask: B, structure: B) -> B:
    """``ndi.binary_closing(mask, structure)`` (the image edge erodes) of a small 2-D mask (see
    :func:`_open_close_2d`)."""
    return _open_close_2d(mask, structure, closing=True)


def sparse_binary_opening(mask: B, structure: B) -> B:
    """``ndi.binary_opening(mask, structure)`` (one iteration, border 0) for a sparse 3-D mask.

    The structure must have odd sizes and be point-symmetric (a ball). Only the mask's own voxels are tested
    for the erosion and only the eroded voxels are grown back, so the cost follows the number of mask voxels
    instead of the volume: bone above 180 HU is ~1 % of a trunk, and scipy's opening with a 7-voxel ball
    spent ~0.4 s scanning the rest. The result is the same set, voxel for voxel.
    """
    st = np.asarray(structure, dtype=bool)
    if (
        st.ndim != mask.ndim
        or any(n % 2 == 0 for n in st.shape)
        or not np.array_equal(st, st[::-1, ::-1, ::-1])
    ):
        return np.asarray(ndi.binary_opening(mask, structure=st), dtype=bool)
    r = np.array(st.shape) // 2
    offsets = np.argwhere(st) - r
    padded = np.pad(np.asarray(mask, dtype=bool), [(int(p), int(p)) for p in r])  # outside the volume: 0
    cand = np.argwhere(padded)
    for o in offsets:  # erosion: a voxel stays when every offset lands on the mask
        q = cand + o
        cand = cand[padded[q[:, 0], q[:, 1], q[:, 2]]]
        if cand.size == 0:
            break
    out = np.zeros(mask.shape, dtype=bool)
    eroded = cand - r
    shape = np.array(mask.shape)
    for o in offsets:  # dilation of the eroded voxels (the structure is symmetric: no reflection)
        q = eroded + o
        q = q[np.all((q >= 0) & (q < shape), axis=1)]
        out[q[:, 0], q[:, 1], q[:, 2]] = True
    return out
