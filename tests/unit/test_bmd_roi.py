"""Trabecular ROI geometry on synthetic bodies (dicomnode.bmd.roi): erosion in mm, end-plate margin,
mid-vertebral slab, basivertebral region, heights and the outline."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.bmd.roi import (
    ENDPLATE_GUARD_RISE_HU,
    _endplate_guard,
    _height_step,
    body_heights,
    mask_height_fit,
    outline_on_slice,
    slab_weight,
    trabecular_roi,
)
from dicomnode.imaging.volume import Volume


def _cylinder(spacing: tuple[float, float, float], hu: float = 150.0) -> tuple[Volume, np.ndarray]:
    """An elliptic cylinder body 44 x 32 mm, 26 mm tall, with a 700 HU shell, in a 0 HU box."""
    sx, sy, sz = spacing
    nx, ny, nz = int(80 / sx), int(70 / sy), int(50 / sz)
    k, j, i = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    ell = ((i - 40) / 22) ** 2 + ((j - 35) / 16) ** 2
    body = (ell <= 1.0) & (np.abs(k - 25) <= 13)
    data = np.zeros((nz, ny, nx), dtype=np.float32)
    data[body] = 700.0
    inner = (((i - 40) / 21) ** 2 + ((j - 35) / 15) ** 2 <= 1.0) & (np.abs(k - 25) <= 12)
    data[inner] = hu
    aff = np.diag([sx, sy, sz, 1.0])
    return Volume(data=data, affine=aff), body


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 1.0), (1.0, 1.0, 3.0), (0.8, 0.8, 5.0)])
def test_roi_excludes_cortex_and_end_plates(spacing: tuple[float, float, float]) -> None:
    vol, body = _cylinder(spacing)
    box = (slice(0, vol.shape[0]), slice(0, vol.shape[1]), slice(0, vol.shape[2]))
    st = trabecular_roi(vol, body, box, erosion_mm=4.0, endplate_margin_mm=5.0)
    assert st.volume_mm3 > 1000.0
    assert st.mean == pytest.approx(150.0, abs=1e-3)  # no shell voxel inside
    kk, jj, ii = np.nonzero(st.roi)
    z = kk * spacing[2]
    assert z.min() >= 12 + 4.0 - 1e-6 and z.max() <= 38 - 4.0 + 1e-6  # central half of the 26 mm height
    # basivertebral region (posterior third, central half width) is empty
    y = jj * spacing[1]
    x = ii * spacing[0]
    assert not np.any((y > 51 - 32 / 3) & (np.abs(x - 40) < 0.25 * 44 - spacing[0]))


def test_heights_detect_a_wedge() -> None:
    sp = (1.0, 1.0, 1.0)
    k, j, i = np.meshgrid(np.arange(60), np.arange(60), np.arange(60), indexing="ij")
    # anterior (small j) 18 mm high, posterior 28 mm: a wedge
    top = 16 + 18 + (j - 14) * (10 / 32)
    body = (((i - 30) / 20) ** 2 + ((j - 30) / 16) ** 2 <= 1) & (k >= 16) & (k <= top)
    h = body_heights(body, sp)
    assert h is not None
    assert h[0] < 0.8 * h[2]
    flat = (((i - 30) / 20) ** 2 + ((j - 30) / 16) ** 2 <= 1) & (k >= 16) & (k <= 42)
    hf = body_heights(flat, sp)
    assert hf is not None and min(hf) / max(hf) > 0.95


def test_outline_is_closed_and_on_the_source_image() -> None:
    vol, body = _cylinder((0.8, 0.8, 2.0))
    vol = Volume(
        data=vol.data,
        affine=vol.affine,
        slice_sop_instance_uids=tuple(f"1.2.{n}" for n in range(vol.shape[0])),
    )
    box = (slice(0, vol.shape[0]), slice(0, vol.shape[1]), slice(0, vol.shape[2]))
    st = trabecular_roi(vol, body, box, 4.0, 5.0)
    k = round(st.centroid_ijk[2])
    o = outline_on_slice(vol, vol.canonical(), st, k)
    assert o is not None
    assert o.sop_instance_uid == f"1.2.{k}"
    assert o.points_cr[0] == o.points_cr[-1] and len(o.points_cr) >= 8
    assert len(o.points_lps_mm) == len(o.points_cr)
    cols = np.array([p[0] for p in o.points_cr])
    # centred on the body (x = 40 mm -> column 50 at 0.8 mm, +0.5 for the pixel-centre convention)
    assert abs(0.5 * (cols.min() + cols.max()) - 50.5) < 2.0


def test_slab_weight_counts_a_voxel_by_where_its_extent_lies() -> None:
    sp = (0.8, 0.8, 5.0)  # reach along z 2.5 mm: weight 0 at 1.5 mm inside, full at 4.5 mm inside
    beyond = np.array([2.0, 0.0, -1.5, -3.0, -4.5, -9.0])
    w = slab_weight(beyond, sp, np.array([0.0, 0.0, 1.0]))
    assert w.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    # thin slices: from 1 mm beyond the face (their extent reaches 1 mm out) to 7 mm inside
    thin = slab_weight(np.array([1.0, -3.0, -7.0]), (0.7, 0.7, 0.6), np.array([0.0, 0.0, 1.0]))
    assert thin.tolist() == pytest.approx([0.0, 0.5, 1.0], abs=0.02)
    # tilted axis: the reach is the voxel's extent along it (0.7 mm here)
    tilted = slab_weight(np.array([0.3, -6.3]), (1.0, 1.0, 1.0), np.array([0.0, 0.6, 0.8]))
    assert tilted.tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("slice_mm", [0.625, 1.0, 2.5, 3.0, 5.0])
@pytest.mark.parametrize("phase", [0.0, 0.3, 0.55, 0.8])
def test_slab_weight_samples_the_same_bone_on_every_grid(slice_mm: float, phase: float) -> None:
    """The weight folded with the slice profile: how much each depth of the patient (x mm beyond the face,
    negative inside) enters the slab's statistics. Slices abut (spacing = thickness), so a depth deep
    inside is covered by one slice of full weight: 1. On every grid and wherever the face falls between
    slice centres, nothing from more than 1 mm beyond the face enters and under 0.1 mm of bone from
    beyond it in all, and the depth the ramp costs (the integral of 1 - sampling inside) is about 3 mm."""
    a = np.array([0.0, 0.0, 1.0])
    centres = (np.arange(-round(30.0 / slice_mm), round(10.0 / slice_mm)) + phase) * slice_mm
    w = slab_weight(centres, (0.8, 0.8, slice_mm), a)
    x = np.linspace(-25.0, 8.0, 6601)
    dx = float(x[1] - x[0])
    covers = np.abs(x[:, None] - centres[None, :]) <= 0.5 * slice_mm + 1e-9
    sampling = (w[None, :] * covers).sum(axis=1)
    assert sampling[x > 1.0 + 1e-6].max() == 0.0
    assert float(sampling[x > 0.0].sum()) * dx < 0.1
    assert sampling[x < -7.0 - 1e-6].min() == pytest.approx(1.0)
    inside = (x > -20.0) & (x <= 0.0)
    lost = float(np.sum(1.0 - sampling[inside])) * dx
    assert 1.9 <= lost <= 4.1, lost
    if slice_mm <= 3.0:
        assert 2.6 <= lost <= 3.4, lost


def _banded_body(slice_mm: float, phase_mm: float = 0.0) -> tuple[Volume, np.ndarray]:
    """A 26 mm tall elliptic body (z 12-38 mm, + ``phase_mm``) on a 0.5 mm z grid with 100 HU marrow in
    its central half and 300 HU sclerotic bands in its outer quarters (under the end plates), slab-averaged
    to ``slice_mm`` slices like a thick reconstruction; the mask takes every slice that holds body."""
    sx = sy = 0.8
    fine = 0.5
    nx, ny, nz = int(80 / sx), int(70 / sy), int(50 / fine)
    k, j, i = np.meshgrid(np.arange(nz) * fine, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    ell = ((i - 40) / 22) ** 2 + ((j - 35) / 16) ** 2 <= 1.0
    c = 25.0 + phase_mm
    body_f = ell & (np.abs(k - c) <= 13)
    data = np.zeros((nz, ny, nx), dtype=np.float32)
    data[body_f] = 300.0
    data[ell & (np.abs(k - c) < 6.5)] = 100.0
    n = round(slice_mm / fine)
    m = nz // n
    thick = data[: m * n].reshape(m, n, ny, nx).mean(axis=1)
    zc = (np.arange(m) * n + 0.5 * (n - 1)) * fine  # slice centres
    aff = np.diag([sx, sy, slice_mm, 1.0])
    aff[2, 3] = zc[0]
    vol = Volume(data=thick.astype(np.float32), affine=aff)
    holds = body_f[: m * n].reshape(m, n, ny, nx).any(axis=(1, 2, 3))
    body = np.broadcast_to(ell[0][None], thick.shape) & holds[:, None, None]
    return vol, np.ascontiguousarray(body)


@pytest.mark.parametrize("slice_mm", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("phase_mm", [0.0, 1.0, 2.0, 3.0, 4.0])
def test_mid_slab_keeps_the_bands_under_the_end_plates_out_on_thick_slices(
    slice_mm: float, phase_mm: float
) -> None:
    """The mask of a thick-slice body takes in the slices that straddle its end plates; the slab from the
    mask's extent with voxels weighted by the share inside keeps the sclerotic bands out of the mean (a
    slab that counted every voxel centred inside read 300 HU bands in)."""
    vol, body = _banded_body(slice_mm, phase_mm)
    box = (slice(0, vol.shape[0]), slice(0, vol.shape[1]), slice(0, vol.shape[2]))
    st = trabecular_roi(vol, body, box, erosion_mm=3.0, endplate_margin_mm=3.0)
    assert st.volume_mm3 > 1000.0
    assert st.mean < 100.0 + 0.15 * 200.0  # < 15 % of a band's excess


def test_mask_height_fit_follows_a_body_tilted_against_the_axis() -> None:
    """A body whose end plates are tilted 20 degrees against the given axis (a lordotic curve): the mask's
    mid-plane rises across the depth by the depth times tan(20 deg), and its height is the body's own."""
    sp = (1.0, 1.0, 1.0)
    k, j, i = np.meshgrid(np.arange(90), np.arange(70), np.arange(80), indexing="ij")
    rise = (j - 19) * np.tan(np.radians(20.0))
    body = (((i - 40) / 22) ** 2 + ((j - 35) / 16) ** 2 <= 1.0) & (k >= 30 + rise) & (k <= 56 + rise)
    fit = mask_height_fit(body, sp)
    assert fit is not None
    depth = fit.depth_mm[1] - fit.depth_mm[0]
    assert fit.mid_line_mm[1] == pytest.approx(depth * np.tan(np.radians(20.0)), rel=0.1)
    assert fit.heights_mm[1] == pytest.approx(26.0, abs=1.5)


def _rising_column(slice_mm: float, noise_hu: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """A 40 mm column of an elliptic footprint on a 0.7 mm in-plane grid, slab-averaged from 0.5 mm to
    ``slice_mm`` slices: marrow 100 HU up to z = 24 mm, then rising linearly by 20 HU per mm (the denser bone
    under an end plate), with Gaussian noise. Returns the data, the footprint mask and the slice thickness."""
    sx = 0.7
    fine = 0.5
    n = round(slice_mm / fine)
    nz = (80 // n) * n
    z = np.arange(nz) * fine
    profile = 100.0 + 20.0 * np.clip(z - 24.0, 0.0, None)
    ny = nx = int(30 / sx)
    j, i = np.meshgrid(np.arange(ny) * sx, np.arange(nx) * sx, indexing="ij")
    ell = ((i - 15) / 12) ** 2 + ((j - 15) / 9) ** 2 <= 1.0
    thick = profile.reshape(-1, n).mean(axis=1)
    data = np.broadcast_to(thick[:, None, None], (thick.size, ny, nx)).astype(np.float32)
    rng = np.random.default_rng(seed)
    data = data + rng.normal(0.0, noise_hu, data.shape).astype(np.float32)
    foot = np.broadcast_to(ell[None], data.shape).copy()
    return data, foot, slice_mm


@pytest.mark.parametrize("slice_mm", [1.0, 2.5, 3.0, 4.0])
def test_endplate_guard_cuts_the_roi_where_the_bone_under_the_end_plate_rises(slice_mm: float) -> None:
    """A slab placed 8 mm too high (its mask reached into the disc) ends on the rise under the end plate:
    the guard drops what lies on the rise and keeps the marrow below it, on thin and thick slices."""
    data, foot, sz = _rising_column(slice_mm, noise_hu=30.0)
    zc = (np.arange(data.shape[0]) + 0.5) * sz  # slice centres (mm)
    roi = foot & ((zc >= 12.0) & (zc <= 30.0))[:, None, None]
    weight = roi.astype(np.float64)
    drop = _endplate_guard(data, foot, roi, weight, np.array([0.0, 0.0, 1.0]), (0.7, 0.7, sz))
    kept = roi & ~drop
    # every layer kept lies below where its mean exceeds the marrow by the rise threshold plus a slice
    z_kept = zc[np.nonzero(kept.any(axis=(1, 2)))[0]]
    assert z_kept.max() <= 24.0 + ENDPLATE_GUARD_RISE_HU / 20.0 + sz
    # the marrow below the rise is kept
    assert kept[(zc + 0.5 * sz <= 24.0)[:, None, None] & roi].all()
    assert float(data[kept].mean()) < 100.0 + 10.0


@pytest.mark.parametrize("slice_mm", [0.625, 3.0, 5.0])
def test_endplate_guard_keeps_uniform_noisy_marrow(slice_mm: float) -> None:
    """Marrow without a rise (the slab well inside the body) loses nothing to noise, even in thin layers."""
    data, foot, sz = _rising_column(slice_mm, noise_hu=60.0, seed=3)
    zc = (np.arange(data.shape[0]) + 0.5) * sz
    roi = foot & ((zc >= 5.0) & (zc <= 20.0))[:, None, None]
    drop = _endplate_guard(
        data,
        foot & (zc <= 22.0)[:, None, None],
        roi,
        roi.astype(np.float64),
        np.array([0.0, 0.0, 1.0]),
        (0.7, 0.7, sz),
    )
    assert not drop.any()


def test_a_ramp_of_heights_is_no_step_and_a_jump_is() -> None:
    rng = np.random.default_rng(3)
    # a 50 % wedge of a 30 mm body, sampled at the profiles' depths with 0.7 mm noise: a ramp, no step
    frac = np.array([0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85])
    for _ in range(50):
        ramp = 15.0 + 15.0 * frac + rng.normal(0.0, 0.7, frac.size)
        assert _height_step(ramp) < 3.0
    # a 40 % wedge whose last profile met a pedicle root is a ramp with one odd height inside its range: no
    # step (the Theil-Sen line over the depth is robust to it)
    assert _height_step(np.array([18.9, 20.0, 21.4, 22.9, 24.3, 25.9, 18.0])) == 0.0
    # but one end profile far beyond a flat group is a step: with five profiles it tilts the line like a
    # wedge (LIDC's T12 on 2.5 mm slabs tilted 9 degrees read 0.49)
    assert _height_step(np.array([22.2, 24.8, 25.9, 26.9, 37.9])) == pytest.approx(11.0)
    # the posterior profiles passed the body's own end plate and stopped at the next body's (LIDC's L1
    # tilted 6 degrees): every posterior height exceeds every anterior one by 6.4 mm
    step = _height_step(np.array([23.9, 26.2, 27.0, 26.4, 34.1, 34.2, 33.4]))
    assert step == pytest.approx(6.4)
    # the same the other way round (the anterior profiles jumped)
    assert _height_step(np.array([35.0, 34.2, 26.0, 25.1, 24.8])) == pytest.approx(8.2)
    # two profiles inside the depth that passed the end plate (LIDC's T12, 2 mm slices tilted 4.4 degrees)
    assert _height_step(np.array([23.5, 25.7, 26.2, 35.1, 33.0, 25.9])) == pytest.approx(6.8)
    # but a shorter run inside the depth is what a fracture makes (a central end-plate depression): no step
    assert _height_step(np.array([27.0, 26.5, 20.0, 19.5, 20.2, 26.8, 27.2])) == 0.0


def _graded_body(spacing: tuple[float, float, float], grow_mm: float) -> tuple[Volume, np.ndarray]:
    """An elliptic body 44 x 32 mm, 26 mm tall, with a 1.5 mm cortex of 700 HU; its trabecular bone reads
    100 HU in the middle and rises to 200 HU towards the cortex over the outer 5 mm (denser bone under the
    cortex, as in real vertebrae); 40 HU around it. The mask is the body grown by ``grow_mm`` in plane: a body
    mask made on a coarse grid runs a few mm beyond the cortex."""
    sx, sy, sz = spacing
    nx, ny, nz = int(80 / sx), int(70 / sy), int(50 / sz)
    k, j, i = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    r_out = np.hypot((i - 40) / 22, (j - 35) / 16)
    r_in = np.hypot((i - 40) / 20.5, (j - 35) / 14.5)
    tall = np.abs(k - 25) <= 13
    data = np.full((nz, ny, nx), 40.0, dtype=np.float32)
    data[(r_out <= 1.0) & tall] = 700.0
    inner = (r_in <= 1.0) & (np.abs(k - 25) <= 11.5)
    depth_in = (1.0 - r_in) * 14.5  # about the distance (mm) inside the cortex's inner edge
    data[inner] = (100.0 + 100.0 * np.clip(1.0 - depth_in / 5.0, 0.0, 1.0))[inner]
    mask = (np.hypot((i - 40) / (22 + grow_mm), (j - 35) / (16 + grow_mm)) <= 1.0) & tall
    return Volume(data=data, affine=np.diag([sx, sy, sz, 1.0])), mask


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 1.0), (0.8, 0.8, 3.0)])
def test_roi_is_placed_from_the_cortex_not_from_a_generous_mask(spacing: tuple[float, float, float]) -> None:
    sx, sy, _ = spacing
    means = []
    for grow in (0.0, 2.0, 4.0):
        vol, mask = _graded_body(spacing, grow)
        box = (slice(0, vol.shape[0]), slice(0, vol.shape[1]), slice(0, vol.shape[2]))
        st = trabecular_roi(vol, mask, box, erosion_mm=3.0, endplate_margin_mm=5.0)
        assert st.volume_mm3 > 500.0
        _, jj, ii = np.nonzero(st.roi)
        # every ROI voxel keeps the erosion inside the cortex's inner edge (a voxel's tolerance)
        r = np.hypot((ii * sx - 40) / (20.5 - 3.0 + sx), (jj * sy - 35) / (14.5 - 3.0 + sy))
        assert r.max() <= 1.0, f"mask grown {grow} mm: an ROI voxel within 3 mm of the cortex"
        means.append(st.mean)
    # the same bone whatever the mask's margin (an oval sized from the mask took in the denser rim)
    assert max(means) - min(means) < 3.0, means
    assert min(means) < 110.0


def test_inner_outline_ignores_a_bone_island_and_keeps_the_mask_edge_without_cortex() -> None:
    from dicomnode.bmd.roi import _inner_outline

    spacing = (0.7, 0.7, 1.0)
    vol, mask = _graded_body(spacing, 4.0)
    data = vol.data.copy()
    nz, ny, nx = data.shape
    _, j, i = np.meshgrid(np.arange(nz), np.arange(ny) * 0.7, np.arange(nx) * 0.7, indexing="ij")
    data[np.hypot(i - 46.0, j - 33.0) <= 2.5] = 900.0  # a bone island 6 mm right of the centre
    ks = np.arange(int(18 / 1.0), int(32 / 1.0))
    out = _inner_outline(data, mask, 100.0, (0.7, 0.7), ks)
    assert out is not None
    depth, width, front, middle = out.frame(nz)
    # the compartment inside the cortex: 41 x 29 mm (half way down the cortex's inner step, a voxel's play)
    assert width == pytest.approx(41.0, abs=1.5) and depth == pytest.approx(29.0, abs=1.5)
    assert float(np.median(front.ravel()[ks])) == pytest.approx(35.0 - 14.5, abs=1.0)
    assert float(np.median(middle.ravel()[ks])) == pytest.approx(40.0, abs=1.0)
    # no cortex at all (a uniform body): the rays keep the mask's edge
    flat = np.where(mask, 100.0, 40.0).astype(np.float32)
    out = _inner_outline(flat, mask, 100.0, (0.7, 0.7), ks)
    assert out is not None
    _, width, _, _ = out.frame(nz)
    assert width == pytest.approx(2 * (22 + 4.0), abs=1.5)
