"""Level naming from the rib and sacrum anchors (dicomnode.bmd.classical._name) on synthetic vertebra lists:
one anchor alone is trusted only when its evidence is unambiguous; never wrong and confident."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.bmd.classical import (
    LSTV_MIN_MM,
    RIB_LONE_MIN_MM,
    RIB_SHORT_MM,
    RIB_SHORT_RATIO,
    Segment,
    _name,
    _trunc,
)

MASK = np.zeros((1, 1, 1), dtype=bool)


def _spine(rib_lengths: list[float], n_free: int, sacrum: bool, l5_sacral_mm: float = 0.0) -> list[Segment]:
    """Vertebrae cranial to caudal: rib-bearing ones with the given rib lengths (mm, both sides), then
    ``n_free`` rib-free ones, then (optionally) a sacrum piece."""
    segs: list[Segment] = []
    z = 1000
    for length in rib_lengths:
        segs.append(Segment(0, z - 14, z, MASK, rib_l=800.0, rib_r=800.0, rib_len_l=length, rib_len_r=length))
        segs[-1].rib_reach = np.radians(70.0)
        z -= 17
    for _ in range(n_free):
        segs.append(Segment(0, z - 14, z, MASK))
        z -= 17
    if sacrum:
        segs.append(Segment(0, z - 30, z, MASK, sacral=True))
        segs[-2].sacral_mm = l5_sacral_mm
    for i, s in enumerate(segs):
        s.label = i + 1
    return segs


def _names(segs: list[Segment], sacrum: bool) -> tuple[list[str], bool, str]:
    nm = _name(segs, len(segs) - 1 if sacrum else None, True, "sacrum: test")
    return (
        [nm.names[s.label] for s in segs[: len(segs) - (1 if sacrum else 0)]],
        nm.uncertain,
        "; ".join(nm.evidence),
    )


def test_full_length_lowest_rib_without_sacrum_stays_confident() -> None:
    # 10th, 11th, 12th ribs tapering by about a third each: a regular series, the 12th pair clearly a rib pair
    names, uncertain, _ = _names(_spine([210.0, 150.0, 100.0], 4, sacrum=False), sacrum=False)
    assert names[:4] == ["T10", "T11", "T12", "L1"]
    assert not uncertain


def test_short_lowest_rib_without_sacrum_is_uncertain() -> None:
    # a lumbar rib on L1 (13 pairs) or a hypoplastic 12th rib: half the rib above, breaks the series
    names, uncertain, ev = _names(_spine([150.0, 100.0, 50.0], 4, sacrum=False), sacrum=False)
    assert uncertain
    assert "lumbar rib" in ev and "hypoplastic 12th rib" in ev
    assert names[2] == "T12"  # names stay rib-based, flagged


def test_short_ratio_alone_makes_it_uncertain() -> None:
    above = 200.0
    low = (RIB_SHORT_RATIO - 0.05) * above
    assert low >= RIB_SHORT_MM
    _, uncertain, ev = _names(_spine([above, low], 4, sacrum=False), sacrum=False)
    assert uncertain and "against the pair above" in ev


@pytest.mark.parametrize(
    ("length", "uncertain"),
    [(RIB_SHORT_MM - 10.0, True), (RIB_LONE_MIN_MM - 10.0, True), (RIB_LONE_MIN_MM + 20.0, False)],
)
def test_single_rib_level_in_view_is_judged_on_its_own_length(length: float, uncertain: bool) -> None:
    # with no pair above to compare, only a full-length 12th rib is taken as one
    names, unc, _ = _names(_spine([length], 4, sacrum=False), sacrum=False)
    assert unc is uncertain
    assert names[:2] == ["T12", "L1"]


def test_both_anchors_agreeing_confirm_a_short_12th_rib() -> None:
    # five rib-free vertebrae between the lowest rib and the sacrum: a short 12th rib, no doubt left
    names, uncertain, _ = _names(_spine([100.0, 40.0], 5, sacrum=True), sacrum=True)
    assert names == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    assert not uncertain


def test_thirteen_ribs_with_sacrum_disagree_and_are_uncertain() -> None:
    names, uncertain, _ = _names(_spine([150.0, 100.0, 50.0], 4, sacrum=True), sacrum=True)
    assert uncertain
    assert names[-1] == "L5"  # named from the sacrum


@pytest.mark.parametrize(("sacral_mm", "uncertain"), [(0.0, False), (LSTV_MIN_MM + 2.0, True)])
def test_sacrum_only_flags_a_possible_transitional_vertebra(sacral_mm: float, uncertain: bool) -> None:
    names, unc, ev = _names(_spine([], 5, sacrum=True, l5_sacral_mm=sacral_mm), sacrum=True)
    assert names == ["L1", "L2", "L3", "L4", "L5"]
    assert unc is uncertain
    assert ("transitional" in ev) is uncertain


def test_no_anchor_is_always_uncertain() -> None:
    _, uncertain, ev = _names(_spine([], 4, sacrum=False), sacrum=False)
    assert uncertain and "neither ribs nor sacrum" in ev


def test_trunc_never_rounds_up_to_the_threshold() -> None:
    assert _trunc(0.7999, 2) == "0.79"
    assert _trunc(0.5, 2) == "0.50"
