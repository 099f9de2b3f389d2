"""Level naming from the rib and sacrum anchors (dicomnode.bmd.classical._name) on synthetic vertebra lists:
one anchor alone is trusted only when its evidence is unambiguous; never wrong and confident."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.bmd.classical import (
    ALA_MIN_MM3,
    LSTV_ALA_MM3,
    LSTV_MIN_MM,
    RIB_ELEVENTH_RATIO,
    RIB_LONE_MIN_MM,
    RIB_SHORT_MM,
    RIB_SHORT_RATIO,
    RIB_TENTH_RATIO,
    Column,
    LateralBone,
    Segment,
    _ala_volumes,
    _find_sacrum,
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


# rib lengths of the 10th, 11th and 12th ribs (arc, mm; Todd's Cyclopaedia, table A; spine-anatomy.md 2.2)
TODD_10_11_12 = [267.0, 210.0, 114.0]


def test_a_12th_rib_about_half_the_11th_without_sacrum_stays_confident() -> None:
    # the normal taper: the 12th about half the 11th (the LIDC patient's measures 0.48-0.59)
    names, uncertain, ev = _names(_spine(TODD_10_11_12, 4, sacrum=False), sacrum=False)
    assert names[:4] == ["T10", "T11", "T12", "L1"]
    assert not uncertain, ev


def test_short_lowest_rib_without_sacrum_is_uncertain() -> None:
    # a lumbar rib on L1 (13 pairs) or a hypoplastic 12th rib: a rudimentary rib under 38 mm (Yun 2018)
    names, uncertain, ev = _names(_spine([*TODD_10_11_12, 30.0], 4, sacrum=False), sacrum=False)
    assert uncertain
    assert "lumbar rib" in ev and "hypoplastic 12th rib" in ev
    assert names[3] == "T12"  # names stay rib-based, flagged


def test_short_ratio_alone_makes_it_uncertain() -> None:
    above = 200.0
    low = (RIB_SHORT_RATIO - 0.05) * above
    assert low >= RIB_SHORT_MM
    _, uncertain, ev = _names(_spine([above, low], 4, sacrum=False), sacrum=False)
    assert uncertain and "short against the pair above" in ev


def test_a_lowest_rib_as_long_as_an_11th_is_uncertain() -> None:
    # 11 rib pairs: the lowest rib is an 11th, about four fifths of the 10th above it
    names, uncertain, ev = _names(_spine(TODD_10_11_12[:2], 4, sacrum=False), sacrum=False)
    assert uncertain
    assert "11 rib pairs possible" in ev
    assert names[1] == "T12"
    _, unc, _ = _names(_spine([210.0, (RIB_ELEVENTH_RATIO - 0.02) * 210.0], 4, sacrum=False), sacrum=False)
    assert not unc


@pytest.mark.parametrize(("tenth", "uncertain"), [(267.0, False), (220.0, True)])
def test_the_pair_above_the_lowest_must_taper_like_an_11th(tenth: float, uncertain: bool) -> None:
    # 11 rib pairs with a 12th-like ratio at the bottom: the pair above the lowest is then a 10th, nearly
    # as long as the 9th above it (0.91 in Todd's table), where an 11th is 0.79 of the 10th
    names, unc, ev = _names(_spine([tenth, 210.0, 114.0], 4, sacrum=False), sacrum=False)
    assert names[2] == "T12"
    assert unc is uncertain, ev
    assert ("does not taper like an 11th" in ev) is uncertain
    assert 210.0 / 267.0 < RIB_TENTH_RATIO <= 210.0 / 220.0


@pytest.mark.parametrize("low", [114.0, 30.0, 180.0])
def test_lowest_rib_on_one_side_only_is_uncertain_whatever_its_length(low: float) -> None:
    # a 12th whose partner was missed looks like a rib credited one vertebra too low (seen on a tilted copy of
    # the LIDC chest CT whose discs were misplaced): without a second anchor the names stay flagged
    segs = _spine([267.0, 210.0, low], 4, sacrum=False)
    segs[2].rib_r, segs[2].rib_len_r = 0.0, 0.0
    names, unc, ev = _names(segs, sacrum=False)
    assert names[2] == "T12"
    assert unc, ev
    assert "one side only" in ev


def test_lowest_rib_on_one_side_only_below_a_one_sided_pair_is_uncertain() -> None:
    segs = _spine(TODD_10_11_12, 4, sacrum=False)
    segs[1].rib_l, segs[1].rib_len_l = 0.0, 0.0
    segs[2].rib_r, segs[2].rib_len_r = 0.0, 0.0
    _, unc, _ = _names(segs, sacrum=False)
    assert unc


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


# ---------------------------------------------------------------- the sacral anchor from ala volumes


def _column(nz: int) -> Column:
    """A straight column along z through (y, x) = (20, 50) on the working grid."""
    return Column(np.full(nz, 20.0), np.full(nz, 50.0), np.tile([1.0, 0.0, 0.0], (nz, 1)))


def _lateral(z_lo: int, z_hi: int, area_vox: int, side: int) -> list[LateralBone]:
    return [LateralBone(z, side, np.full(area_vox, 20), np.arange(area_vox) + 70) for z in range(z_lo, z_hi)]


def test_ala_volume_is_weighed_between_the_disc_planes() -> None:
    # discs at z = 20 and 40: slab 0 below 20, slab 1 between, slab 2 above 40; 2 mm working voxels
    col = _column(60)
    lat = _lateral(5, 25, 100, 1) + _lateral(5, 15, 50, -1)
    vols = _ala_volumes(lat, [20, 40], col, 2.0)
    # z 5..20 (15 slices incl. the plane at 20, which is not above it) belong to slab 0, z 21..24 to slab 1
    assert vols[0] == (16 * 100 * 8.0, 10 * 50 * 8.0)
    assert vols[1] == (4 * 100 * 8.0, 0.0)
    assert 2 not in vols


def _pieces(n_lumbar: int) -> list[Segment]:
    segs = [Segment(i + 1, 100 - 15 * i, 112 - 15 * i, MASK, slab=n_lumbar - i) for i in range(n_lumbar + 1)]
    segs[0].rib_l = segs[0].rib_r = 800.0  # T12 on top
    return segs


def test_sacrum_is_the_piece_with_alae_on_both_sides() -> None:
    segs = _pieces(6)  # T12, L1-L5, S1 (slab 0)
    ala = {0: (ALA_MIN_MM3 * 1.5, ALA_MIN_MM3 * 1.3), 1: (0.5 * ALA_MIN_MM3, 0.3 * ALA_MIN_MM3)}
    sacrum, strong, note = _find_sacrum(segs, ala)
    assert sacrum == len(segs) - 1
    assert strong
    assert "both sides" in note


def test_transverse_processes_are_not_alae() -> None:
    # lumbar transverse processes give a few cm3 beside every lumbar piece: no sacrum, names from the ribs
    segs = _pieces(5)
    ala = {k: (0.5 * ALA_MIN_MM3, 0.5 * ALA_MIN_MM3) for k in range(6)}
    assert _find_sacrum(segs, ala) == (None, False, "")


def test_one_sided_ala_is_weak_sacral_evidence() -> None:
    segs = _pieces(6)
    sacrum, strong, note = _find_sacrum(segs, {0: (ALA_MIN_MM3 * 1.2, 0.2 * ALA_MIN_MM3)})
    assert sacrum == len(segs) - 1
    assert not strong
    assert "one side only" in note


def test_sacrum_spanning_two_pieces_is_named_from_the_upper_one() -> None:
    # an S1-S2 remnant disc splits the sacrum: the highest piece of the run with alae is S1
    segs = _pieces(7)
    ala = {0: (ALA_MIN_MM3 * 2, ALA_MIN_MM3 * 2), 1: (ALA_MIN_MM3 * 1.5, ALA_MIN_MM3 * 1.4)}
    sacrum, _, _ = _find_sacrum(segs, ala)
    assert sacrum == len(segs) - 2


def test_large_processes_above_the_sacrum_make_sacrum_only_names_uncertain() -> None:
    # no ribs in view: the sacrum is the only anchor, and the vertebra above it carries nearly an ala's worth
    # of bone beside it (a dysplastic or sacrum-articulating transverse process): L5 cannot be fixed
    segs = _spine([], 5, sacrum=True)
    _, uncertain, _ = _names(segs, sacrum=True)
    assert not uncertain
    segs[-2].ala_mm3 = LSTV_ALA_MM3 + 500.0
    names, uncertain, ev = _names(segs, sacrum=True)
    assert uncertain
    assert "transverse processes large enough" in ev
    assert names[-1] == "L5"  # still named from the sacrum, flagged


def test_the_sacral_run_passes_one_piece_without_alae_below_s1() -> None:
    # T12, L1-L5, S1, a lower sacral piece without alae, pelvic bone below it that looks like an ala
    segs = _pieces(8)
    ala = {
        2: (ALA_MIN_MM3 * 1.9, ALA_MIN_MM3 * 2.2),
        1: (0.3 * ALA_MIN_MM3, 0.0),
        0: (ALA_MIN_MM3 * 2.3, ALA_MIN_MM3),
    }
    sacrum, strong, _ = _find_sacrum(segs, ala)
    assert sacrum == len(segs) - 3
    assert strong
    # above a piece without alae, a one-sided ala is not S1's: the run ends at the lower piece
    ala[2] = (ALA_MIN_MM3 * 1.9, 0.5 * ALA_MIN_MM3)
    assert _find_sacrum(segs, ala)[0] == len(segs) - 1
    # a lowest piece without alae (the coccyx) is passed before the run starts
    assert _find_sacrum(segs, {1: (ALA_MIN_MM3 * 2, ALA_MIN_MM3 * 2)})[0] == len(segs) - 2
    # two pieces without alae end the run
    ala[2], ala[1], ala[3] = (0.0, 0.0), (0.0, 0.0), (ALA_MIN_MM3 * 2, ALA_MIN_MM3 * 2)
    assert _find_sacrum(segs, ala)[0] == len(segs) - 1
