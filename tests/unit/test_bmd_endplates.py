"""End plates across a smeared thin disc and one end plate over the depth (dicomnode.bmd.roi)."""

from __future__ import annotations

import numpy as np

from dicomnode.bmd.roi import (
    _agree_across_depth,
    _endplate_edge,
    _Profile,
)

DS = 0.25


def _bump(s: np.ndarray, at: float, height: float, width: float) -> np.ndarray:
    return height * np.exp(-0.5 * ((s - at) / width) ** 2)


def _smeared_pair(after_hu: float) -> np.ndarray:
    """A profile from a body's middle outwards (marrow 100 HU): its own end plate at 10 mm, a thin disc
    smeared until it no longer falls below either plate, the next body's brighter end plate at 17 mm, then
    ``after_hu`` beyond it (the next body's marrow, or a disc)."""
    s = np.arange(0.0, 30.0, DS)
    q = 100.0 + _bump(s, 10.0, 120.0, 2.5) + _bump(s, 17.0, 200.0, 2.5)
    beyond = 1.0 / (1.0 + np.exp(-(s - 19.5) / 0.6))
    return np.asarray(q * (1.0 - beyond) + after_hu * beyond + _bump(s, 17.0, 200.0, 2.5) * beyond)


def test_the_own_end_plate_is_found_before_the_next_bodys_across_a_smeared_disc() -> None:
    q = _smeared_pair(after_hu=130.0)
    edge = _endplate_edge(q, 100.0, DS, disc_from_mm=5.0)
    # the own plate (10 mm) and the notch of the disc (~13 mm), not the next body's plate (17 mm) and beyond
    assert edge is not None and 11.0 <= edge <= 15.0


def test_a_peak_followed_by_a_disc_darker_than_the_marrow_is_the_own_end_plate() -> None:
    # the same shape with a dark disc beyond the outer peak: the inner structure is a dense zone inside the
    # body (a sclerotic core, an impacted fracture zone), the outer peak the body's own plate
    q = _smeared_pair(after_hu=40.0)
    edge = _endplate_edge(q, 100.0, DS, disc_from_mm=5.0)
    assert edge is not None and edge > 17.0


def _plate_profile(peaks: list[tuple[float, float]], after_hu: float) -> np.ndarray:
    s = np.arange(0.0, 30.0, DS)
    q = 100.0 + sum((_bump(s, at, h, 1.0) for at, h in peaks), np.zeros_like(s))
    last = max(at for at, _ in peaks)
    beyond = 1.0 / (1.0 + np.exp(-(s - last - 2.5) / 0.5))
    return np.asarray(q * (1.0 - beyond) + after_hu * beyond)


def test_an_edge_that_jumped_to_the_next_body_returns_onto_its_end_plate() -> None:
    # seven profiles over the depth: five show one plate at 9 mm falling into a dark disc; at two depths
    # the plate only reached a shallow dip before the next body's plate at 16 mm, where the search stopped
    clean = _plate_profile([(9.0, 200.0)], after_hu=40.0)
    jumped = _plate_profile([(9.0, 130.0), (16.0, 200.0)], after_hu=130.0)
    e_clean = _endplate_edge(clean, 100.0, DS, None)
    assert e_clean is not None
    profiles = [
        _Profile(f, 0.0, 100.0, (jumped if f in (0.65, 0.85) else clean, clean), [None, e_clean])
        for f in (0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85)
    ]
    for pr in profiles:
        pr.edges[0] = 17.5 if pr.frac in (0.65, 0.85) else e_clean
    _agree_across_depth(profiles, DS)
    ups = [pr.edges[0] for pr in profiles]
    assert all(u is not None and abs(u - e_clean) <= 1.5 for u in ups), ups
    # the other side, already on one line, is untouched
    assert all(pr.edges[1] == e_clean for pr in profiles)


def test_a_real_step_of_all_edges_is_kept() -> None:
    # a plate that lies further out at every posterior depth with no plate inside it is what the image shows
    near = _plate_profile([(9.0, 200.0)], after_hu=40.0)
    far = _plate_profile([(14.0, 200.0)], after_hu=40.0)
    e_near, e_far = _endplate_edge(near, 100.0, DS, None), _endplate_edge(far, 100.0, DS, None)
    assert e_near is not None and e_far is not None
    profiles = [
        _Profile(f, 0.0, 100.0, (far if f >= 0.65 else near, near), [e_far if f >= 0.65 else e_near, e_near])
        for f in (0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85)
    ]
    before = [pr.edges[0] for pr in profiles]
    _agree_across_depth(profiles, DS)
    assert [pr.edges[0] for pr in profiles] == before
