"""Counting rib pairs down from the first rib (dicomnode.bmd.classical._count_from_top) and its use as the
second anchor of the rib-based names, on synthetic rib heads along a straight column: the count is made only
when the first rib is surely in view and the heads are regular, and any count but twelve makes the names
uncertain."""

from __future__ import annotations

import numpy as np

from dicomnode.bmd.classical import (
    TOP_FREE_MM,
    Column,
    Frame,
    RibHead,
    Segment,
    TopCount,
    _count_from_top,
    _name,
)

G = 2.0  # working grid (mm)
NZ, NY, NX = 200, 60, 80
XC = 40.0


def _scene(lung_at_top: bool = False) -> tuple[np.ndarray, np.ndarray, Frame, Column]:
    hu = np.full((NZ, NY, NX), 40.0, dtype=np.float32)
    if lung_at_top:
        hu[-3:, 10:30, 5:25] = -850.0  # lung apex in the top slices, lateral of the axis
    body = np.ones((NZ, NY, NX), dtype=bool)
    frame = Frame(np.full(NZ, XC), np.full(NZ, 40.0), np.full(NZ, 35.0), np.ones(NZ, dtype=bool), 0, NZ - 1)
    tangent = np.tile(np.array([1.0, 0.0, 0.0]), (NZ, 1))
    col = Column(np.full(NZ, 30.0), np.full(NZ, XC), tangent)
    return hu, body, frame, col


def _heads(zs_mm: list[float], left: bool, segment_of_lowest: int = 9) -> list[RibHead]:
    """Heads at the given heights (mm), 28 mm apart across the axis; the lowest on ``segment_of_lowest``."""
    x = XC + (14.0 if left else -14.0)
    low = min(zs_mm)
    return [RibHead(z / G, 40.0, x, left, False, segment_of_lowest if z == low else 0) for z in zs_mm]


def _thorax(pairs: int = 12) -> list[float]:
    """Rib-head heights (mm) of ``pairs`` ribs, pitch growing from 20 mm at the top to 29 mm at the bottom."""
    z, out = 360.0, []
    for i in range(pairs):
        out.append(z)
        z -= 20.0 + 9.0 * i / max(1, pairs - 1)
    return out


def _count(heads: list[RibHead], lung_at_top: bool = False) -> TopCount:
    hu, body, frame, col = _scene(lung_at_top)
    return _count_from_top(heads, hu, body, frame, col, (0, 0), G)


def test_twelve_regular_pairs_are_counted() -> None:
    zs = _thorax(12)
    top = _count(_heads(zs, True) + _heads(zs, False))
    assert top.pairs == 12, top.note
    assert top.lowest_segments == (9, 9)


def test_no_count_when_the_lung_apex_reaches_the_top_edge() -> None:
    # the scan starts inside the thorax: the top-most rib seen may be the second
    assert TOP_FREE_MM > 0
    zs = _thorax(12)
    assert _count(_heads(zs, True) + _heads(zs, False), lung_at_top=True).pairs is None


def test_no_count_when_a_rib_is_cut_by_the_top_edge() -> None:
    zs = _thorax(12)
    heads = _heads(zs, True) + _heads(zs, False)
    heads[0] = RibHead(heads[0].z, heads[0].y, heads[0].x, heads[0].left, True, heads[0].segment)
    top = _count(heads)
    assert top.pairs is None and "cut by the top edge" in top.note


def test_a_rib_missed_on_both_sides_gives_no_count() -> None:
    # the two sides agree (11 and 11) but one spacing is twice its neighbours': a rib was missed, and an
    # 11 would be read as 11 rib pairs
    zs = _thorax(12)
    del zs[5]
    top = _count(_heads(zs, True) + _heads(zs, False))
    assert top.pairs is None and "irregular" in top.note


def test_a_cervical_rib_pair_is_counted_as_a_thirteenth() -> None:
    # ribs on C7 (0.6-6 %): thirteen pairs from the top, which the naming then calls a disagreement
    zs = _thorax(12)
    zs = [zs[0] + 20.0, *zs]
    assert _count(_heads(zs, True) + _heads(zs, False)).pairs == 13


def test_a_lowest_rib_found_on_one_side_only_is_counted_with_the_pairs() -> None:
    # a short 12th rib breaks up on the working grid on one side (seen on the LIDC chest CT at 1.25 and
    # 5 mm): the eleven pairs above and the lone rib one spacing below them make twelve
    zs = _thorax(12)
    top = _count(_heads(zs, True) + _heads(zs[:-1], False, segment_of_lowest=8))
    assert top.pairs == 12, top.note
    assert top.lowest_segments == (9, 9)
    assert "left only" in top.note
    # a unilateral rib below the twelfth pair (a lumbar rib on one side) is a thirteenth
    below = [*zs, zs[-1] - 30.0]
    assert _count(_heads(below, True) + _heads(zs, False)).pairs == 13


def test_sides_that_do_not_pair_up_give_no_count() -> None:
    zs = _thorax(12)
    # the right side lacks its first rib: its ribs sit one level below their left partners
    top = _count(_heads(zs, True) + _heads(zs[1:], False))
    assert top.pairs is None and "one rib apart" in top.note
    # a rib missed in the middle of one side
    top = _count(_heads(zs, True) + _heads(zs[:5] + zs[6:], False))
    assert top.pairs is None
    # two ribs fewer on one side
    top = _count(_heads(zs, True) + _heads(zs[:-2], False))
    assert top.pairs is None and "10 right" in top.note


def test_one_rib_in_two_pieces_is_one_rib() -> None:
    zs = _thorax(12)
    heads = _heads(zs, True) + _heads(zs, False)
    h = heads[3]
    heads.append(RibHead(h.z + 2.0 / G, h.y + 3.0 / G, h.x, h.left, False, 0))
    assert _count(heads).pairs == 12


def _spine(n_rib: int, n_free: int) -> list[Segment]:
    mask = np.zeros((1, 1, 1), dtype=bool)
    segs: list[Segment] = []
    z = 1000
    for i in range(n_rib + n_free):
        s = Segment(i + 1, z - 14, z, mask)
        if i < n_rib:
            s.rib_l = s.rib_r = 800.0
            s.rib_reach = np.radians(70.0)
            # the 10th and 11th rib lengths of Todd's table (mm), then a rudimentary lowest pair (< 38 mm):
            # alone, a lumbar rib would look the same
            s.rib_len_l = s.rib_len_r = 30.0 if i == n_rib - 1 else (210.0 if i == n_rib - 2 else 267.0)
        segs.append(s)
        z -= 17
    return segs


def test_twelve_from_the_top_confirms_a_rudimentary_twelfth_rib() -> None:
    segs = _spine(3, 4)
    alone = _name(segs, None, False, "")
    assert alone.uncertain  # rudimentary lowest pair, ribs the only anchor
    both = _name(segs, None, False, "", TopCount(12, "12 rib pairs counted", lowest_segments=(2, 2)))
    assert not both.uncertain
    assert [both.names[s.label] for s in segs[:4]] == ["T10", "T11", "T12", "L1"]


def test_any_other_count_from_the_top_makes_the_names_uncertain() -> None:
    segs = _spine(3, 4)
    segs[2].rib_len_l = segs[2].rib_len_r = 114.0  # a 12th pair, half the 11th: confident on its own
    assert not _name(segs, None, False, "").uncertain
    for pairs in (11, 13):
        nm = _name(
            segs, None, False, "", TopCount(pairs, f"{pairs} rib pairs counted", lowest_segments=(2, 2))
        )
        assert nm.uncertain, pairs
        assert "disagree" in "; ".join(nm.evidence)
    # twelve counted, but the lowest counted pair is not on the lowest rib-bearing vertebra
    nm = _name(segs, None, False, "", TopCount(12, "12 rib pairs counted", lowest_segments=(1, 1)))
    assert nm.uncertain


def test_twelve_from_the_top_confirms_a_lowest_rib_seen_on_one_side() -> None:
    segs = _spine(3, 4)
    segs[2].rib_r = 0.0
    segs[2].rib_len_r = 0.0
    assert _name(segs, None, False, "").uncertain
    nm = _name(segs, None, False, "", TopCount(12, "12 ribs counted", lowest_segments=(2, 2)))
    assert not nm.uncertain
    assert [nm.names[s.label] for s in segs[:4]] == ["T10", "T11", "T12", "L1"]


def _pieces(fronts_mm: list[float], left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head ends (crop z, y, x) of rib-like pieces on one side, cranial to caudal 25 mm apart, lying
    ``fronts_mm`` behind the canal's front (``Frame.ya`` = 35)."""
    n = len(fronts_mm)
    z = np.array([150.0 - 12.5 * i for i in range(n)])
    y = 35.0 + np.array(fronts_mm) / G
    x = np.full(n, XC + (20.0 if left else -20.0))
    return z, y, x


def _drop(fronts_l: list[float], fronts_r: list[float]) -> tuple[list[bool], list[bool]]:
    from dicomnode.bmd.classical import _drop_organ_below_the_ribs

    _, _, frame, _ = _scene()
    zl, yl, xl = _pieces(fronts_l, True)
    zr, yr, xr = _pieces(fronts_r, False)
    # index 0 is the background, as in the neck labelling
    med_z = np.concatenate([[0.0], zl, zr])
    med_y = np.concatenate([[0.0], yl, yr])
    med_x = np.concatenate([[0.0], xl, xr])
    real = np.concatenate([[False], np.ones(zl.size + zr.size, dtype=bool)])
    _drop_organ_below_the_ribs(real, med_z, med_y, med_x, frame, G)
    return list(real[1 : 1 + zl.size]), list(real[1 + zl.size :])


def test_an_organ_in_front_of_the_spine_below_the_ribs_is_not_a_rib() -> None:
    # the lowest right piece's head end lies 16 mm in front of the canal's front, the heads above it 12-20
    # mm behind: an enhanced kidney reached by its artery, not a 12th rib
    left, right = _drop([18.0, 14.0, 16.0, 20.0, 22.0], [12.0, 10.0, 14.0, 18.0, -16.0])
    assert all(left)
    assert right == [True, True, True, True, False]


def test_a_lowest_rib_in_line_with_the_heads_above_stays() -> None:
    left, right = _drop([18.0, 14.0, 16.0, 20.0, 6.0], [12.0, 10.0, 14.0, 18.0, 26.0])
    assert all(left) and all(right)


def test_too_few_heads_above_to_compare_leave_the_lowest_alone() -> None:
    left, right = _drop([18.0, -20.0], [12.0, -20.0])
    assert all(left) and all(right)
