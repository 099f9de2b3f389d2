"""Which of a study's accepted series is best for trabecular BMD, and why (pure).

Criteria, most important first (a later one only breaks ties of the earlier ones):

1. image type: ORIGINAL/PRIMARY axial images first, then DERIVED/PRIMARY ones (a primary reconstruction from
   the raw data, e.g. Siemens' ``DERIVED\\PRIMARY\\AXIAL``), then anything else (value 3, when given, AXIAL
   or VOLUME; never LOCALIZER);
2. lumbar coverage: z-extent >= ``min_lumbar_extent_mm`` (or, when the extent is unknown, a body part that
   includes the lumbar spine); a series too short to hold T12-L2 cannot be measured well;
3. native phase: no ContrastBolusAgent (iodine raises trabecular HU; clinical.md 1.4);
4. soft-tissue / standard kernel rather than a sharp (bone, lung, edge) kernel, which shifts HU in bone
   (clinical.md section 5); see :data:`dicomnode.vocab.SHARP_KERNEL_PATTERNS`;
5. thinnest slices (less partial volume with end-plates);
6. more images, then the lower SeriesNumber, then the Series Instance UID (deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicomnode.domain import SeriesSummary
from dicomnode.vocab import SHARP_KERNEL_PATTERNS, contrast_agent_given, is_sharp_kernel

__all__ = [
    "SHARP_KERNEL_PATTERNS",
    "RankFeatures",
    "features",
    "image_count",
    "image_type_level",
    "is_native",
    "is_sharp_kernel",
    "rank",
    "slice_mm",
    "values_of",
    "why_better",
]

#: BodyPartExamined values (upper case, spaces removed) whose field of view normally includes L1-L2.
LUMBAR_BODY_PARTS: frozenset[str] = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "ABDPELVIS",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CHESTABDOMENPELVIS",
        "TLSPINE",
        "LSPINE",
        "L_SPINE",
        "LUMBARSPINE",
        "SPINE",
        "WHOLEBODY",
        "TORSO",
        "KIDNEY",
        "PANCREAS",
        "LIVER",
    }
)


def values_of(value: Any) -> tuple[Any, ...]:
    """An attribute value as a tuple (multi-valued elements as is, single values wrapped, None empty)."""
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(value, str) and "\\" in value:
        return tuple(value.split("\\"))
    return (value,)


def _upper_values(value: Any) -> list[str]:
    return [str(v).strip().upper() for v in values_of(value)]


def is_native(contrast_agent: Any) -> bool:
    """True when ContrastBolusAgent is absent or says no contrast (``vocab.contrast_agent_given``)."""
    return contrast_agent_given(contrast_agent) is not True


def _float(value: Any) -> float | None:
    vals = values_of(value)
    if not vals:
        return None
    try:
        f = float(vals[0])
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def slice_mm(s: SeriesSummary) -> float | None:
    """SliceThickness, or the slice spacing of the positions (z-extent / (images - 1)) when it is absent."""
    thickness = _float(s.get("SliceThickness"))
    if thickness is not None and thickness > 0:
        return thickness
    n = image_count(s)
    if s.z_extent_mm is not None and s.z_extent_mm > 0 and n > 1:
        return s.z_extent_mm / (n - 1)
    return None


def image_type_level(image_type: Any) -> int:
    """2 = ORIGINAL/PRIMARY axial, 1 = DERIVED/PRIMARY axial (a primary reconstruction), 0 = anything else.

    "Axial" means value 3 AXIAL (CT Image Storage) or VOLUME (enhanced CT), or no value 3 at all.
    """
    vals = _upper_values(image_type)
    if len(vals) < 2 or vals[1] != "PRIMARY" or "LOCALIZER" in vals:
        return 0
    if len(vals) >= 3 and vals[2] not in ("AXIAL", "VOLUME", ""):
        return 0
    return {"ORIGINAL": 2, "DERIVED": 1}.get(vals[0], 0)


def image_count(s: SeriesSummary) -> int:
    """Instances x NumberOfFrames (an enhanced multi-frame series counts its frames)."""
    frames = _float(s.get("NumberOfFrames"))
    return s.n_instances * (int(frames) if frames and frames > 1 else 1)


@dataclass(frozen=True)
class RankFeatures:
    """The facts ranking uses about one series, each with the words that explain it."""

    series_instance_uid: str
    image_type: int  # 2 = ORIGINAL/PRIMARY axial, 1 = DERIVED/PRIMARY axial, 0 = other
    coverage: int  # 2 = covers the lumbar spine, 1 = unknown, 0 = too short / other region
    native: bool
    kernel: int  # 2 = soft/standard, 1 = unknown, 0 = sharp
    slice_thickness: float | None
    images: int
    series_number: float | None

    def key(self) -> tuple[Any, ...]:
        """Sort key: smaller is better."""
        return (
            -self.image_type,
            -self.coverage,
            not self.native,
            -self.kernel,
            self.slice_thickness if self.slice_thickness is not None else math.inf,
            -self.images,
            self.series_number if self.series_number is not None else math.inf,
            self.series_instance_uid,
        )

    def describe(self) -> str:
        parts = [
            _IMAGE_TYPE_WORDS[self.image_type],
            {2: "lumbar coverage", 1: "coverage unknown", 0: "no lumbar coverage"}[self.coverage],
            "native" if self.native else "contrast",
            {2: "soft kernel", 1: "kernel unknown", 0: "sharp kernel"}[self.kernel],
            f"slice {_mm(self.slice_thickness)}",
            f"{self.images} images",
        ]
        return ", ".join(parts)


_IMAGE_TYPE_WORDS = {
    2: "ORIGINAL/PRIMARY/AXIAL",
    1: "DERIVED/PRIMARY/AXIAL (primary reconstruction)",
    0: "not ORIGINAL/PRIMARY/AXIAL",
}


def _mm(x: float | None) -> str:
    if x is None:
        return "thickness unknown"
    return f"{x:g} mm"


def features(
    s: SeriesSummary, *, min_lumbar_extent_mm: float = 90.0, extra_sharp: Sequence[str] = ()
) -> RankFeatures:
    """Compute the ranking facts of one series from its summary."""
    body = {v.replace(" ", "") for v in _upper_values(s.get("BodyPartExamined"))}
    if s.z_extent_mm is not None:
        coverage = 2 if s.z_extent_mm >= min_lumbar_extent_mm else 0
    elif body:
        coverage = 2 if body & LUMBAR_BODY_PARTS else 0
    else:
        coverage = 1
    kernel_value = s.get("ConvolutionKernel")
    if not _upper_values(kernel_value) or not any(_upper_values(kernel_value)):
        kernel = 1
    else:
        kernel = 0 if is_sharp_kernel(kernel_value, extra_sharp) else 2
    return RankFeatures(
        series_instance_uid=s.series_instance_uid,
        image_type=image_type_level(s.get("ImageType")),
        coverage=coverage,
        native=is_native(s.get("ContrastBolusAgent")),
        kernel=kernel,
        slice_thickness=slice_mm(s),
        images=image_count(s),
        series_number=_float(s.get("SeriesNumber")),
    )


def why_better(best: RankFeatures, other: RankFeatures) -> str:
    """The first criterion on which ``best`` beats ``other``, in words."""
    if best.image_type != other.image_type:
        return f"it is {_IMAGE_TYPE_WORDS[best.image_type]}"
    if best.coverage != other.coverage:
        return "it covers the lumbar spine" if best.coverage == 2 else "its coverage is less doubtful"
    if best.native != other.native:
        return "it is native (no contrast agent)"
    if best.kernel != other.kernel:
        return "it has a soft kernel" if best.kernel == 2 else "its kernel is not sharp"
    if best.slice_thickness != other.slice_thickness:
        return f"thinner slices ({_mm(best.slice_thickness)} vs {_mm(other.slice_thickness)})"
    if best.images != other.images:
        return f"more images ({best.images} vs {other.images})"
    return "tie broken by series number / UID"


def rank(
    series: Sequence[SeriesSummary], *, min_lumbar_extent_mm: float = 90.0, extra_sharp: Sequence[str] = ()
) -> list[tuple[SeriesSummary, RankFeatures]]:
    """The series ordered best first, each with its features."""
    feats = [
        (s, features(s, min_lumbar_extent_mm=min_lumbar_extent_mm, extra_sharp=extra_sharp)) for s in series
    ]
    return sorted(feats, key=lambda sf: sf[1].key())
