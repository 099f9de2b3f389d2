"""The disc chain along the column profile (dicomnode.bmd.classical._disc_candidates, _find_discs) on
synthetic profiles sampled like the working grid (2 mm): thin thoracic discs merged with their end plates
into bright bands, and thick lumbar discs resolved as dips between two end plates."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dicomnode.bmd.classical import (
    MARROW_SPAN_MM,
    _dips,
    _disc_candidates,
    _find_discs,
    _flank_span,
    _pitches_free,
    _resolved_discs,
)

G = 2.0
N = 100


def _thoracic(
    pitch_mm: float, band_sd_mm: float, marrow_slope_hu: float
) -> tuple[npt.NDArray[np.float64], list[float]]:
    """Bands (end plate, thin disc, end plate merged: +120 HU) every ``pitch_mm`` on 105 HU marrow that is
    ``marrow_slope_hu`` denser under each band and falls off across the body (the dip between two bands then
    lies nearer the lower band). Returns the profile and the disc positions (working-grid index)."""
    z = np.arange(N) * G
    discs = [30.0 + pitch_mm * i for i in range(int((N * G - 50.0) / pitch_mm))]
    p = np.full(N, 105.0)
    for c in discs:
        p += 120.0 * np.exp(-0.5 * ((z - c) / band_sd_mm) ** 2)
        body = (z > c) & (z < c + pitch_mm)
        p[body] += marrow_slope_hu * (1.0 - (z[body] - c) / pitch_mm)
    return p, [c / G for c in discs]


def _lumbar(pitch_mm: float) -> tuple[npt.NDArray[np.float64], list[float]]:
    """Resolved lumbar discs: 85 HU discs 10 mm thick between two thin end plates (+150 HU), 130 HU marrow."""
    z = np.arange(N) * G
    discs = [30.0 + pitch_mm * i for i in range(int((N * G - 50.0) / pitch_mm))]
    p = np.full(N, 130.0)
    for c in discs:
        p -= 45.0 * np.exp(-0.5 * ((z - c) / 3.0) ** 2)
        for e in (c - 6.0, c + 6.0):
            p += 150.0 * np.exp(-0.5 * ((z - e) / 1.5) ** 2)
    return p, [c / G for c in discs]


def _matches(found: list[int], truth: list[float], tol: float = 1.0) -> bool:
    return len(found) == len(truth) and all(abs(f - t) <= tol for f, t in zip(found, truth, strict=True))


def test_marrow_between_merged_bands_is_not_taken_for_the_discs() -> None:
    # small thoracic bodies on thick or tilted slices: the marrow dip between two bands is 0.4-0.5 as deep
    # as the bands and lies within 8 mm of the lower one. The bands are the discs; a chain on the dips is
    # half a vertebra off everywhere (and, mixed with bands, misses every other disc)
    p, truth = _thoracic(20.0, 4.0, 30.0)
    cands = _disc_candidates(p, 5, N - 6, G)
    assert all(any(abs(k - t) <= 1.0 for k in cands) for t in truth), sorted(cands)
    found = _find_discs(p, 5, N - 6, G)
    assert _matches(found, truth), (found, truth)


def test_resolved_lumbar_discs_are_the_dips() -> None:
    p, truth = _lumbar(36.0)
    found = _find_discs(p, 5, N - 6, G)
    assert _matches(found, truth), (found, truth)


def test_flank_span_is_a_disc_height_around_a_disc_and_a_body_height_around_marrow() -> None:
    p, truth = _lumbar(36.0)
    disc = round(truth[1])
    assert 10.0 <= _flank_span(p, disc, G) < MARROW_SPAN_MM
    p, truth = _thoracic(20.0, 4.0, 30.0)
    marrow = int(np.argmin(p[round(truth[1]) : round(truth[2])])) + round(truth[1])
    assert _flank_span(p, marrow, G) >= MARROW_SPAN_MM


def test_a_weak_disc_beside_a_dense_band_is_found_where_the_pitch_puts_it() -> None:
    # four resolved lumbar discs, 34 mm apart; above the top one the column runs on for 1.35 pitches to the
    # scan's edge. The disc there, 32 mm above the top one, is faint (smeared by thick or tilted slices: a
    # 25 HU dip under a faint end plate) and 8 mm below it, inside the body, lies a dense band (sclerosis
    # under the end plate). The faint dip beside the band is taken for the marrow beside a merged thoracic
    # band, the band alone would make a 24 mm vertebra over a 34 mm one (the chain pays more for that than
    # the band scores): neither joins the chain, yet a vertebra and a half of column cannot hold no disc
    p, truth = _lumbar(34.0)
    assert _matches([round(t) for t in truth], [15.0, 32.0, 49.0, 66.0])
    z = np.arange(N) * G
    top = 164.0
    p -= 25.0 * np.exp(-0.5 * ((z - top) / 2.0) ** 2)
    p += 5.0 * np.exp(-0.5 * ((z - (top + 5.0)) / 1.5) ** 2)
    p += 75.0 * np.exp(-0.5 * ((z - (top - 8.0)) / 3.0) ** 2)
    z_hi = round((132.0 + 1.35 * 34.0) / G)
    found = _find_discs(p, 5, z_hi, G)
    assert _matches(found, [*truth, top / G]), found


def test_a_dense_band_under_a_faint_lumbar_disc_is_its_end_plate_not_the_disc() -> None:
    # four lumbar vertebrae 34 mm apart; the scan's edge lies 14 mm above the top disc. In the top body a
    # dense band (a thick end plate with a bone island) peaks 10 mm under that disc, which is faint (a 28 HU
    # dip under a faint end plate of the body above). The band outscores the dip; at the chain's top nothing
    # above holds the pitch, and the band (a 24 mm vertebra over 34 mm ones) beat the disc. The band is the
    # lower flank of the dip, whose flanks lie a disc's height apart: it is the disc's end plate
    p, truth = _lumbar(34.0)
    z = np.arange(N) * G
    top = 132.0
    body = z > 108.0
    p[body] = 130.0
    p -= 28.0 * np.exp(-0.5 * ((z - top) / 3.0) ** 2) * body
    p += 10.0 * np.exp(-0.5 * ((z - (top + 6.0)) / 1.5) ** 2)
    p += 150.0 * np.exp(-0.5 * ((z - (top - 10.0)) / 3.0) ** 2)
    z_hi = round((top + 14.0) / G)
    cands = _disc_candidates(p, 5, z_hi, G)
    band = round((top - 10.0) / G)
    assert band in cands and cands[band] > max(v for k, v in cands.items() if abs(k - top / G) <= 1), cands
    found = _find_discs(p, 5, z_hi, G)
    assert _matches(found, truth), (found, truth)


def test_a_short_top_vertebra_keeps_its_band_disc_beside_a_dark_spot_in_the_body_above() -> None:
    # merged bands (the discs) 30 mm apart, the top vertebra 33 % short (a compression fracture); the scan
    # ends 32 mm above its disc, in the body above, where a dark spot (a basivertebral vein) lies 12 mm above
    # the band. The spot is a dip within reach whose pitch would be free, but its bright flanks are the band
    # and the scan's end, a body's height apart: marrow, not a disc. The fractured vertebra keeps its disc
    z = np.arange(N) * G
    p = np.full(N, 105.0)
    for d in (30.0, 60.0, 90.0, 120.0, 140.0, 176.0):
        p += 120.0 * np.exp(-0.5 * ((z - d) / 4.0) ** 2)
    p -= 25.0 * np.exp(-0.5 * ((z - 151.0) / 3.0) ** 2)
    z_hi = round(172.0 / G)
    chain = _find_discs(p, 5, z_hi, G)
    assert chain == [15, 30, 45, 60, 70], chain
    assert 76 in _dips(p, 5, z_hi, G) and _pitches_free(chain, 4, 76) and not _pitches_free(chain, 4, 70)
    assert _resolved_discs(chain, p, 5, z_hi, G) == chain
