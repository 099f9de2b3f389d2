"""The BMD measurement on a grid of synthetic phantoms with known truth (issue 2, acceptance).

Each case renders a phantom (``dicomnode.phantom``: levels, vBMD, contrast, scanner gain/offset are known)
and runs ``analyze_volume``. Over the whole grid:

* naming: every reported, measured level is named correctly, or the result says ``level_uncertain``;
  never wrong and confident, no exception (a 13th rib without the sacrum in view is flagged, not
  miscounted); with neither ribs nor sacrum in view the result is always ``level_uncertain``;
* vBMD: mean absolute error against the truth <= 5 mg/cm3 over all measured levels;
* contrast phase: right in every case.

The grid (>= 50 cases) varies pixel spacing (0.5-1.5 mm), slice thickness (0.6-5 mm), patient position and
flips, z coverage (no sacrum, no ribs, neither), 11/13 rib pairs with and without the sacrum, noise,
contrast phase, scanner gain/offset, vBMD (40-200 mg/cm3), spine curvature and fractures. Matrices stay
small (256 where the 1.5 mm spacing allows a full 384 mm field of view; finer spacings on shorter z ranges)
so the grid runs in minutes on two cores.
Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from dicomnode.bmd import analyze_volume
from dicomnode.phantom import PhantomSpec, make_phantom

pytestmark = pytest.mark.slow

BASE: dict[str, Any] = {"matrix": 256, "spacing_mm": 1.5, "thickness_mm": 3.0}
FULL = ("T10", "S1")


def _cases() -> list[tuple[str, dict[str, Any]]]:
    c: list[tuple[str, dict[str, Any]]] = []
    for o in ("HFS", "FFS", "HFP", "FFP"):
        c.append((f"orientation {o}", {"orientation": o, "seed": len(c)}))
    c.append(("flip rows", {"flip_rows": True, "seed": 4}))
    c.append(("flip cols", {"flip_cols": True, "seed": 5}))
    c.append(("thickness 0.6", {"thickness_mm": 0.6, "z_levels": ("T11", "L2"), "seed": 6}))
    c.append(("thickness 1.0", {"thickness_mm": 1.0, "z_levels": ("T11", "L3"), "seed": 7}))
    for t in (2.0, 4.0, 5.0):
        c.append((f"thickness {t}", {"thickness_mm": t, "seed": 8 + int(t)}))
    c.append(("spacing 0.5", {"matrix": 512, "spacing_mm": 0.5, "z_levels": ("T11", "L2"), "seed": 14}))
    c.append(("spacing 0.75", {"matrix": 512, "spacing_mm": 0.75, "z_levels": ("T11", "L3"), "seed": 15}))
    c.append(("spacing 1.0", {"matrix": 400, "spacing_mm": 1.0, "z_levels": ("T11", "L4"), "seed": 16}))
    c.append(
        ("spacing 0.8 no ribs", {"matrix": 480, "spacing_mm": 0.8, "z_levels": ("L1", "S1"), "seed": 17})
    )
    c.append(("crop T12-L3", {"z_levels": ("T12", "L3"), "seed": 18}))
    c.append(("crop T11-L4 (no sacrum)", {"z_levels": ("T11", "L4"), "seed": 19}))
    c.append(("crop L1-S1 (no ribs)", {"z_levels": ("L1", "S1"), "seed": 20}))
    c.append(("crop L2-S1", {"z_levels": ("L2", "S1"), "seed": 21}))
    c.append(("11 rib pairs", {"rib_pairs": 11, "seed": 22}))
    c.append(("13 rib pairs", {"rib_pairs": 13, "seed": 23}))
    c.append(("11 rib pairs, no sacrum", {"rib_pairs": 11, "z_levels": ("T10", "L4"), "seed": 24}))
    c.append(("13 rib pairs, no sacrum", {"rib_pairs": 13, "z_levels": ("T10", "L4"), "seed": 25}))
    c.append(("13 rib pairs, crop T12-L3", {"rib_pairs": 13, "z_levels": ("T12", "L3"), "seed": 26}))
    c.append(("11 rib pairs, crop T11-L3", {"rib_pairs": 11, "z_levels": ("T11", "L3"), "seed": 27}))
    c.append(("crop L1-L4 (no anchors)", {"z_levels": ("L1", "L4"), "seed": 28}))
    c.append(("crop L2-L5 (no anchors)", {"z_levels": ("L2", "L5"), "seed": 29}))
    for n in (5.0, 15.0, 25.0, 35.0):
        c.append((f"noise {n:g}", {"noise_sd": n, "seed": 26 + int(n)}))
    c.append(("arterial", {"contrast": "arterial", "seed": 62}))
    c.append(("arterial 2", {"contrast": "arterial", "seed": 63, "bmd_all": 70.0}))
    c.append(("portal venous", {"contrast": "portal_venous", "seed": 64}))
    c.append(("portal venous 2", {"contrast": "portal_venous", "seed": 65, "bmd_all": 150.0}))
    c.append(("arterial FFS", {"contrast": "arterial", "orientation": "FFS", "seed": 66}))
    c.append(("portal venous crop", {"contrast": "portal_venous", "z_levels": ("T12", "L3"), "seed": 67}))
    for gain, off in ((0.94, -15.0), (1.06, 15.0), (0.95, 12.0), (1.05, -12.0)):
        c.append((f"gain {gain} offset {off:g}", {"gain": gain, "offset": off, "seed": 68 + len(c)}))
    for b in (40.0, 60.0, 80.0, 100.0, 130.0, 160.0, 200.0):
        c.append((f"vBMD {b:g}", {"bmd_all": b, "seed": 80 + int(b)}))
    c.append(
        (
            "vBMD per level",
            {
                "bmd": {
                    "T11": 150.0,
                    "T12": 140.0,
                    "L1": 90.0,
                    "L2": 85.0,
                    "L3": 120.0,
                    "L4": 60.0,
                    "L5": 55.0,
                }
            },
        )
    )
    for cv in (0.0, 0.5, 1.5):
        c.append((f"curvature {cv:g}", {"curvature": cv, "seed": 300 + int(10 * cv)}))
    c.append(("fracture L2", {"fractures": {"L2": 0.35}, "seed": 320}))
    c.append(("fracture L1 severe", {"fractures": {"L1": 0.5}, "seed": 321}))
    c.append(("FFS thick noisy", {"orientation": "FFS", "thickness_mm": 5.0, "noise_sd": 20.0, "seed": 322}))
    c.append(
        ("HFP 13 ribs arterial", {"orientation": "HFP", "rib_pairs": 13, "contrast": "arterial", "seed": 323})
    )
    c.append(
        (
            "flip cols PV low vBMD",
            {"flip_cols": True, "contrast": "portal_venous", "bmd_all": 60.0, "seed": 324},
        )
    )
    return c


@dataclass
class Outcome:
    name: str
    naming: str  # correct / uncertain / WRONG
    errors: list[float] = field(default_factory=list)
    phase_ok: bool = True
    seconds: float = 0.0
    detail: str = ""


def _run_case(name: str, kw: dict[str, Any]) -> Outcome:
    spec = PhantomSpec(**{**BASE, "z_levels": FULL, **kw})
    ph = make_phantom(spec)
    t0 = time.perf_counter()
    out = analyze_volume(ph.volume)
    seconds = time.perf_counter() - t0
    res = out.result
    truth = ph.truth
    wrong: list[str] = []
    uncertain = False
    errors: list[float] = []
    for v in res.vertebrae:
        uncertain = uncertain or v.level_uncertain
        if v.excluded or not np.isfinite(v.roi_centroid_lps_mm[0]):
            continue
        i, j, k = np.round(ph.volume.lps_to_index(v.roi_centroid_lps_mm)).astype(int)
        lab = int(ph.body_labels[k, j, i])
        true_level = truth.label_names.get(lab) if lab else None
        if true_level != v.level:
            wrong.append(f"{v.level} is {true_level}")
            continue
        if v.vbmd_mg_cm3 is not None:
            errors.append(v.vbmd_mg_cm3 - truth.level(true_level).vbmd_mg_cm3)
    naming = "WRONG" if wrong and not uncertain else ("uncertain" if uncertain else "correct")
    assert res.summary is not None
    phase_ok = res.summary.contrast_phase.value == truth.contrast
    for lv, f in spec.fractures.items():
        vr = res.vertebra(lv)
        # >= 35 % anterior height loss is Genant grade 2 with margin: it must leave the average
        if f >= 0.35 and vr is not None and not vr.excluded:
            wrong.append(f"fracture of {lv} not excluded")
    return Outcome(name, naming, errors, phase_ok, seconds, "; ".join(wrong))


def test_phantom_grid() -> None:
    cases = _cases()
    assert len(cases) >= 50
    outcomes: list[Outcome] = []
    for name, kw in cases:
        o = _run_case(name, kw)
        outcomes.append(o)
        mae = float(np.mean(np.abs(o.errors))) if o.errors else float("nan")
        print(
            f"{name:28s} naming={o.naming:9s} phase_ok={o.phase_ok!s:5s} n={len(o.errors)} "
            f"MAE={mae:5.2f} analyse={o.seconds:4.1f}s {o.detail}"
        )
    all_err = np.concatenate([np.asarray(o.errors) for o in outcomes if o.errors])
    counts = {k: sum(o.naming == k for o in outcomes) for k in ("correct", "uncertain", "WRONG")}
    mae = float(np.mean(np.abs(all_err)))
    print(
        f"\nGRID {len(outcomes)} cases: naming {counts}; vBMD MAE {mae:.2f} mg/cm3 over {all_err.size} "
        "levels "
        f"(bias {float(np.mean(all_err)):+.2f}, max |err| {float(np.max(np.abs(all_err))):.1f}); "
        f"phase right in {sum(o.phase_ok for o in outcomes)}/{len(outcomes)}; "
        f"analyse median {float(np.median([o.seconds for o in outcomes])):.1f}s"
    )
    # never wrong and confident (a lumbar rib without the sacrum in view must be flagged, not miscounted)
    wrong = [f"{o.name}: {o.detail}" for o in outcomes if o.naming == "WRONG"]
    assert wrong == []
    # with neither ribs nor sacrum in view the names are a guess: they must say so
    no_anchor = [o for o in outcomes if "no anchors" in o.name]
    assert len(no_anchor) >= 2
    assert all(o.naming == "uncertain" for o in no_anchor), [(o.name, o.naming) for o in no_anchor]
    assert mae <= 5.0
    assert all(o.phase_ok for o in outcomes), [o.name for o in outcomes if not o.phase_ok]
    # fractures of >= 30 % anterior height loss must leave the average
    assert not [o for o in outcomes if "fracture" in o.detail], [o.detail for o in outcomes if o.detail]
