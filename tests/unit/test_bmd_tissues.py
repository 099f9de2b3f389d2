"""Internal calibration tissues when a small field of view cuts the trunk (bmd.tissues).

A synthetic chest on the 2 mm working grid: an elliptic trunk (300 x 200 mm) with a 16 mm layer of
subcutaneous fat (-100 HU) around soft tissue (+50 HU), two lungs (-870 HU) at its sides, air (-1000 HU)
around it, a little noise. A display field of view 200 mm wide cuts the trunk and both lungs at the left and
right image edges, as a small reconstruction diameter does: the air that is left lies in front of and behind
the patient, and the skin is only where the trunk meets it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from dicomnode.bmd.grid import body_mask
from dicomnode.bmd.tissues import depth_from_skin, measure_air, measure_fat, outline_hull

G = 2.0  # mm per voxel


def _chest(width_mm: float = 400.0, height_mm: float = 300.0) -> npt.NDArray[np.float32]:
    nx, ny = round(width_mm / G), round(height_mm / G)
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    x = (x - (nx - 1) / 2) * G
    y = (y - (ny - 1) / 2) * G
    outer = (x / 150.0) ** 2 + (y / 100.0) ** 2 <= 1.0
    inner = (x / 134.0) ** 2 + (y / 84.0) ** 2 <= 1.0
    lungs = ((np.abs(x) - 90.0) / 38.0) ** 2 + (y / 60.0) ** 2 <= 1.0
    sl = np.full((ny, nx), -1000.0)
    sl[outer] = -100.0
    sl[inner] = 50.0
    sl[lungs] = -870.0
    rng = np.random.default_rng(5)
    vol = np.repeat(sl[None], 6, axis=0) + rng.normal(0.0, 8.0, (6, ny, nx))
    return vol.astype(np.float32)


def _cut(vol: npt.NDArray[np.float32], keep_x_mm: float) -> npt.NDArray[np.float32]:
    nx = vol.shape[2]
    half = round(keep_x_mm / G / 2)
    return np.ascontiguousarray(vol[:, :, nx // 2 - half : nx // 2 + half])


def test_whole_trunk_in_view_gives_air_and_subcutaneous_fat() -> None:
    hu = _chest()
    body = body_mask(hu, G)
    hull = outline_hull(body)
    depth = depth_from_skin(body, G, hull=hull)
    assert measure_air(hu, body, G, hull=hull) == pytest.approx(-1000.0, abs=3.0)
    assert measure_fat(hu, body, depth) == pytest.approx(-100.0, abs=3.0)


def test_lungs_cut_open_by_the_field_of_view_are_not_air_and_the_cut_is_not_skin() -> None:
    hu = _cut(_chest(), 200.0)
    body = body_mask(hu, G)
    # the lungs reach the image edge: the body mask does not hold them, yet they are no air around the body
    assert not body[:, :, 0].all()
    hull = outline_hull(body)
    depth = depth_from_skin(body, G, hull=hull)
    assert measure_air(hu, body, G, hull=hull) == pytest.approx(-1000.0, abs=3.0)
    # the cut is no skin: no voxel lies shallower under the skin than in the whole trunk (the image edge as
    # skin would put the tissue along the cut 2 mm deep)
    whole = _chest()
    wb = body_mask(whole, G)
    wdepth = _cut(depth_from_skin(wb, G, hull=outline_hull(wb)), 200.0)
    assert body[:, :, 0].any()
    assert np.all(depth[body] >= wdepth[body] - 1e-3)
    assert measure_fat(hu, body, depth) == pytest.approx(-100.0, abs=3.0)


def test_a_field_of_view_inside_the_trunk_has_neither_air_nor_skin() -> None:
    hu = _chest()[:, 75 - 30 : 75 + 30, 100 - 40 : 100 + 40]  # 120 x 160 mm inside the soft tissue
    body = body_mask(hu, G)
    hull = outline_hull(body)
    depth = depth_from_skin(body, G, hull=hull)
    assert measure_air(hu, body, G, hull=hull) is None
    assert measure_fat(hu, body, depth) is None


def _plain_depth_from_skin(
    body: npt.NDArray[np.bool_], g: float, max_mm: float = 30.0
) -> npt.NDArray[np.float32]:
    """The depth as written before: scipy erosions of the hull, boolean-index updates."""
    from scipy import ndimage as ndi

    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0] = ndi.generate_binary_structure(2, 1)
    square = np.ones((1, 3, 3), dtype=bool)
    depth = np.zeros(body.shape, dtype=np.float32)
    cur = outline_hull(body)
    for it in range(int(np.ceil(max_mm / g))):
        depth[cur] += np.float32(g)
        cur = ndi.binary_erosion(cur, structure=cross if it % 2 == 0 else square, border_value=1)
        if not cur.any():
            break
    depth[cur] = np.float32(max_mm + g)
    depth[~body] = 0.0
    return depth


@pytest.mark.parametrize("seed", range(4))
def test_depth_from_skin_equals_the_scipy_erosions(seed: int) -> None:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    body = ndi.gaussian_filter(rng.random((6, 50, 45)), 2.0) > 0.48
    body[:, 20:30, 15:30] = True
    for g in (2.0, 3.0):
        got = depth_from_skin(body, g)
        ref = _plain_depth_from_skin(body, g)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
