"""Geometry of the synthetic spine, ribs and trunk, in patient coordinates (LPS, mm).

Every vertebra is a rigid local frame: ``u`` to the patient's left (= +x), ``v`` posterior in the sagittal
plane, ``w`` along the vertebral axis (superior), tilted by ``theta`` about the x axis. The vertebral axis is
``d = (0, -sin(theta), cos(theta))``: positive ``theta`` tilts the cranial end anteriorly (lordotic lumbar
segment, sacrum), negative posteriorly.

Sizes are typical adult values (vertebral body width/depth/height grow from ~30/17/15 mm at T1 to
~50/34/27 mm at L4-L5; lumbar discs ~10 mm, thoracic ~5 mm); they are a plausible average, not a normative
atlas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: The levels the phantom can build, cranial to caudal (S1 is the top of the sacrum).
PHANTOM_LEVELS: tuple[str, ...] = (
    "T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12",
    "L1", "L2", "L3", "L4", "L5", "S1",
)  # fmt: skip

# level: (body width, depth, height, disc height below, tilt deg at curvature 1)
_BODY: dict[str, tuple[float, float, float, float, float]] = {
    "T1": (30.0, 17.0, 15.0, 4.5, 20.0),
    "T2": (30.0, 18.0, 16.0, 4.5, 17.0),
    "T3": (30.0, 19.0, 17.0, 4.5, 14.0),
    "T4": (30.0, 21.0, 18.0, 5.0, 11.0),
    "T5": (31.0, 23.0, 18.5, 5.0, 8.0),
    "T6": (32.0, 25.0, 19.0, 5.0, 5.0),
    "T7": (33.0, 26.0, 20.0, 5.5, 2.0),
    "T8": (34.0, 27.0, 21.0, 5.5, -1.0),
    "T9": (35.0, 28.0, 22.0, 6.0, -4.0),
    "T10": (37.0, 29.0, 23.0, 6.5, -6.0),
    "T11": (39.0, 30.0, 24.0, 7.5, -8.0),
    "T12": (41.0, 31.0, 25.0, 8.5, -9.0),
    "L1": (43.0, 32.0, 26.0, 9.5, -8.0),
    "L2": (45.0, 33.0, 27.0, 10.0, -4.0),
    "L3": (47.0, 34.0, 27.5, 10.5, 2.0),
    "L4": (49.0, 34.0, 27.5, 11.0, 9.0),
    "L5": (50.0, 34.0, 27.0, 11.0, 17.0),
    "S1": (50.0, 33.0, 25.0, 0.0, 30.0),
}

# level -> rib end angle (rad along the rib ellipse; pi = anterior midline). The lower ribs taper as real
# ones do: the 11th about four fifths of the 10th and the 12th about half the 11th (arc lengths 267 / 210 /
# 114 mm, Todd's Cyclopaedia, table A; spine-anatomy.md 2.2). The 13th (a lumbar rib on L1, only with 13
# pairs) is rudimentary, as lumbar ribs are: just past the transverse process, under 38 mm from its head
# (Yun, Korean J Radiol 2018;19:1140).
_RIB_END: dict[int, float] = {1: 2.9, 2: 2.9, 3: 2.9, 4: 2.9, 5: 2.9, 6: 2.9, 7: 2.85, 8: 2.75, 9: 2.6,
                              10: 2.45, 11: 1.9, 12: 1.05, 13: 0.45}  # fmt: skip


@dataclass(frozen=True)
class Vertebra:
    """One vertebra (body + posterior elements) in world coordinates."""

    name: str
    index: int  # position in PHANTOM_LEVELS
    center: tuple[float, float, float]  # body centre, LPS mm
    theta: float  # tilt (rad), see module docstring
    half_width: float  # a (mm, along u)
    half_depth: float  # b (mm, along v)
    height: float  # h (mm, along w), posterior/nominal height
    disc_below: float  # disc height below this body (mm)
    fracture: float = 0.0  # fraction of anterior height lost (wedge)
    cortical_mm: float = 1.2
    endplate_mm: float = 1.0

    @property
    def is_lumbar(self) -> bool:
        return self.name.startswith("L") or self.name == "S1"

    @property
    def axis(self) -> tuple[float, float, float]:
        return (0.0, -math.sin(self.theta), math.cos(self.theta))

    @property
    def ap_dir(self) -> tuple[float, float, float]:
        """Unit vector of +v (posterior, perpendicular to the axis)."""
        return (0.0, math.cos(self.theta), math.sin(self.theta))

    @property
    def posterior_wall_v(self) -> float:
        """The posterior wall of the body is flattened at this v (mm)."""
        return 0.85 * self.half_depth

    # posterior elements
    @property
    def canal_half_width(self) -> float:
        return 11.0 if self.is_lumbar and self.name not in ("L1",) else (10.0 if self.name == "L1" else 8.0)

    @property
    def canal_half_depth(self) -> float:
        return 8.0 if self.is_lumbar else 7.5

    @property
    def canal_center_v(self) -> float:
        return self.posterior_wall_v + self.canal_half_depth + 1.0

    @property
    def transverse_length(self) -> float:
        return {"T11": 20.0, "T12": 12.0, "L1": 20.0, "L2": 25.0, "L3": 30.0, "L4": 27.0, "L5": 25.0,
                "S1": 0.0}.get(self.name, 28.0)  # fmt: skip

    def local(
        self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], z: float
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """World (x, y, z) -> local (u, v, w); x and y broadcast (row/column vectors)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx = x - np.float32(self.center[0])
        dy = y - np.float32(self.center[1])
        dz = np.float32(z - self.center[2])
        v = dy * np.float32(c) + dz * np.float32(s)
        w = dz * np.float32(c) - dy * np.float32(s)
        return dx, v, w

    def world(self, u: float, v: float, w: float) -> tuple[float, float, float]:
        """Local (u, v, w) -> world LPS mm."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        return (
            self.center[0] + u,
            self.center[1] + v * c - w * s,
            self.center[2] + v * s + w * c,
        )

    def top_w(self, v: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Superior end plate height along w at AP position v (wedge fracture lowers the anterior part)."""
        # wedge hinged at the posterior wall: full loss at the anterior edge, none posteriorly
        b, pw = self.half_depth, self.posterior_wall_v
        frac = np.clip((pw - np.asarray(v, dtype=np.float32)) / np.float32(pw + b), 0.0, 1.0)
        top = np.float32(-self.height / 2.0) + np.float32(self.height) * (
            np.float32(1.0) - np.float32(self.fracture) * frac
        )
        return np.asarray(top, dtype=np.float32)

    def heights_mm(self) -> tuple[float, float, float]:
        """Anterior, middle, posterior body heights (mm)."""
        b = self.half_depth
        out = []
        for v in (-b, 0.0, self.posterior_wall_v):
            out.append(float(self.top_w(v)) + self.height / 2.0)
        return (out[0], out[1], out[2])

    def extent_bounds(self) -> tuple[float, float]:
        """z range (mm) that can contain any part of this vertebra (body + posterior elements)."""
        reach = self.canal_center_v + 45.0
        zs = [
            self.world(0.0, v, w)[2]
            for v in (-self.half_depth, reach)
            for w in (-self.height / 2 - 25.0, self.height / 2 + 6.0)
        ]
        return (min(zs), max(zs))


@dataclass(frozen=True)
class Rib:
    """A rib as a swept sphere: centre-line points (N, 3) in LPS mm and a tube radius."""

    level: str
    number: int  # 1 = first rib
    side: int  # +1 = left, -1 = right
    points: npt.NDArray[np.float64]
    radius: float


def build_spine(
    *,
    curvature: float,
    l1_center: tuple[float, float, float],
    fractures: dict[str, float],
    size_scale: float = 1.0,
) -> list[Vertebra]:
    """Stack T1..S1 with their discs along a kypho-lordotic curve, L1 body centre at ``l1_center``."""
    names = PHANTOM_LEVELS
    thetas = [math.radians(_BODY[n][4] * curvature) for n in names]
    # stack from S1 upwards in a provisional frame, then translate so L1 sits where asked
    centers: list[np.ndarray] = [np.zeros(3)] * len(names)
    i_s1 = len(names) - 1
    centers[i_s1] = np.zeros(3)
    for i in range(i_s1 - 1, -1, -1):
        lower, upper = names[i + 1], names[i]
        d_low = np.array([0.0, -math.sin(thetas[i + 1]), math.cos(thetas[i + 1])])
        d_up = np.array([0.0, -math.sin(thetas[i]), math.cos(thetas[i])])
        d_mid = d_low + d_up
        d_mid /= np.linalg.norm(d_mid)
        h_low = _BODY[lower][2] * size_scale
        h_up = _BODY[upper][2] * size_scale
        disc = _BODY[upper][3] * size_scale
        centers[i] = centers[i + 1] + d_low * h_low / 2 + d_mid * disc + d_up * h_up / 2
    shift = np.asarray(l1_center) - centers[names.index("L1")]
    out = []
    for i, n in enumerate(names):
        w, d, h, disc, _ = _BODY[n]
        c = centers[i] + shift
        out.append(
            Vertebra(
                name=n,
                index=i,
                center=(float(c[0]), float(c[1]), float(c[2])),
                theta=thetas[i],
                half_width=w / 2 * size_scale,
                half_depth=d / 2 * size_scale,
                height=h * size_scale,
                disc_below=disc * size_scale,
                fracture=float(fractures.get(n, 0.0)),
            )
        )
    return out


def build_ribs(
    spine: list[Vertebra],
    *,
    rib_pairs: int,
    trunk_half_axes: tuple[float, float],
    trunk_center_y: float,
    fat_mm: float,
) -> list[Rib]:
    """Rib pairs on T1.. (11 pairs end at T11, 12 at T12, 13 add a short rib on L1)."""
    bearing = [v for v in spine if v.name.startswith("T")][:rib_pairs]
    if rib_pairs == 13:
        bearing = [v for v in spine if v.name.startswith("T")] + [v for v in spine if v.name == "L1"]
    ribs: list[Rib] = []
    ax, ay = trunk_half_axes
    for n, vert in enumerate(bearing, start=1):
        # upper ribs are smaller (apex of the thorax)
        scale = min(1.0, 0.62 + 0.04 * n)
        rx = (ax - fat_mm - 14.0) * scale
        ry = (ay - fat_mm - 14.0) * min(1.0, 0.75 + 0.025 * n)
        radius = 4.0 if n <= 4 else 4.5
        end = _RIB_END.get(n, 0.8)
        drop = 40.0 + 4.0 * n
        for side in (1, -1):
            a, b, h = vert.half_width, vert.half_depth, vert.height
            head = np.array(vert.world(side * (a + 2.0), 0.55 * b, h / 2 + 1.0))
            tp_u = vert.canal_half_width + 6.0 + max(vert.transverse_length, 14.0)
            tub = np.array(vert.world(side * tp_u, vert.canal_center_v + 2.0, h / 2 - 2.0))
            cx = vert.center[0]
            phi0 = math.asin(min(0.9, (tp_u + 8.0) / rx))
            yc = (tub[1] + 10.0) - ry * math.cos(phi0)
            yc = min(yc, trunk_center_y + 15.0)
            phis = np.linspace(phi0, end, max(8, int((end - phi0) * max(rx, ry) / 1.5)))
            t = (phis - phi0) / max(1e-6, math.pi - phi0)
            arc = np.stack(
                [
                    cx + side * rx * np.sin(phis),
                    yc + ry * np.cos(phis),
                    tub[2] - 3.0 - drop * t**1.3,
                ],
                axis=1,
            )
            # straight neck: head -> tubercle -> start of the arc, sampled every ~1.5 mm
            pts = [head]
            for p0, p1 in ((head, tub), (tub, arc[0])):
                n_seg = max(2, int(np.linalg.norm(p1 - p0) / 1.5))
                for f in np.linspace(0.0, 1.0, n_seg)[1:]:
                    pts.append(p0 + (p1 - p0) * f)
            points = np.vstack([np.array(pts), arc])
            ribs.append(Rib(level=vert.name, number=n, side=side, points=points, radius=radius))
    return ribs
