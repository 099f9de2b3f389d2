"""Frozen dataclasses and enums shared by every module (imports nothing of ours).

These are the contracts between modules: ``imaging`` produces header summaries, ``routing`` produces
``RuleDecision``, ``bmd`` produces ``AnalysisResult``, ``report`` turns it into DICOM and ``result.json``,
``store`` persists jobs in ``JobState`` and deliveries in ``DeliveryOutcome``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: Vertebral levels we report, cranial to caudal.
REPORTED_LEVELS: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")

#: Every level name the engines may produce, cranial to caudal (T13 / L6 exist in transitional anatomy).
ALL_LEVELS: tuple[str, ...] = (
    "C1", "C2", "C3", "C4", "C5", "C6", "C7",
    "T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "T13",
    "L1", "L2", "L3", "L4", "L5", "L6", "S1",
)  # fmt: skip


class AnalysisStatus(StrEnum):
    OK = "ok"
    NOT_QUALIFYING = "not_qualifying"
    FAILED = "failed"


class ContrastPhase(StrEnum):
    NATIVE = "native"
    ARTERIAL = "arterial"
    PORTAL_VENOUS = "portal_venous"
    UNKNOWN = "unknown"


class BoneCategory(StrEnum):
    """ACR QCT categories on trabecular vBMD (mg/cm3): > 120 normal, 80-120 osteopenia, < 80 osteoporosis."""

    NORMAL = "normal"
    OSTEOPENIA = "osteopenia"
    OSTEOPOROSIS = "osteoporosis"


class JobState(StrEnum):
    """Life of one analysis job. Only ``store`` changes it."""

    PENDING = "pending"  # series complete and selected, waiting for a worker
    ANALYSING = "analysing"
    REPORTED = "reported"  # SR/SC written to the spool, deliveries created
    DELIVERING = "delivering"
    DONE = "done"  # every delivery confirmed (or none configured)
    NOT_QUALIFYING = "not_qualifying"  # analysis refused the series (final)
    FAILED = "failed"  # analysis failed (final, can be re-run)
    SUPERSEDED = "superseded"  # a newer version of the same series replaced it (final)

    @property
    def is_final(self) -> bool:
        return self in (JobState.DONE, JobState.NOT_QUALIFYING, JobState.FAILED, JobState.SUPERSEDED)


class DeliveryOutcome(StrEnum):
    PENDING = "pending"
    SUCCESS = "success"
    RETRYING = "retrying"  # transient failure, next attempt scheduled
    PERMANENT_FAILURE = "permanent_failure"  # stopped; an admin may resend

    @property
    def is_final(self) -> bool:
        return self in (DeliveryOutcome.SUCCESS, DeliveryOutcome.PERMANENT_FAILURE)


@dataclass(frozen=True)
class SeriesSummary:
    """What routing needs to know about one series, from its headers alone.

    ``attributes`` maps DICOM keywords (series- and study-level, e.g. ``Modality``, ``ImageType``,
    ``SliceThickness``, ``ConvolutionKernel``, ``BodyPartExamined``, ``StudyDescription``) to plain Python
    values (str, float, int, or tuples of those for multi-valued elements).
    """

    study_instance_uid: str
    series_instance_uid: str
    attributes: Mapping[str, Any]
    n_instances: int
    #: Extent along the slice normal in mm (0 for single images); None when unknown.
    z_extent_mm: float | None = None

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.attributes.get(keyword, default)


@dataclass(frozen=True)
class RuleDecision:
    """One routing decision for one series, with every reason that led to it."""

    series_instance_uid: str
    selected: bool
    rule: str | None  # name of the rule that matched, None when nothing matched
    action: str  # vocab.ANALYZE ("analyze") or vocab.IGNORE ("ignore")
    pipeline: str | None = None
    destinations: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    rank: int | None = None  # 1 = best candidate of its study among the accepted ones


@dataclass(frozen=True)
class RoiOutline:
    """A closed outline of a trabecular ROI on one source image (for SR SCOORD and overlays).

    ``points_cr`` are (column, row) pixel coordinates, DICOM SCOORD convention: the centre of the top-left
    pixel is (0.5, 0.5). The first point equals the last.
    """

    sop_instance_uid: str | None
    frame_number: int | None
    points_cr: tuple[tuple[float, float], ...]
    #: The same outline in patient coordinates (LPS, mm), for SCOORD3D.
    points_lps_mm: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class VertebraResult:
    level: str
    level_uncertain: bool
    excluded: bool
    qc: tuple[str, ...]
    trabecular_hu_mean: float
    trabecular_hu_median: float
    trabecular_hu_sd: float
    roi_volume_mm3: float
    roi_centroid_lps_mm: tuple[float, float, float]
    vbmd_mg_cm3: float | None
    exclusion_reason: str | None = None
    #: Anterior/middle/posterior height ratio minimum (1.0 = no height loss); None when not measured.
    height_ratio: float | None = None
    #: Index of the mid-vertebral slice in the canonical volume and its outline on the source image.
    mid_slice_index: int | None = None
    outline: RoiOutline | None = None


@dataclass(frozen=True)
class Calibration:
    """HU -> vBMD conversion actually applied, with its inputs kept for the record."""

    method: str  # e.g. "internal-air-fat-muscle" or "none"
    source: str  # literature reference for the method
    slope_mg_cm3_per_hu: float | None
    intercept_mg_cm3: float | None
    reference_hu: Mapping[str, float]  # tissue -> measured mean HU (air, fat, muscle, blood)
    kvp: float | None
    kernel: str | None
    contrast_correction_hu: float  # HU subtracted from bone before conversion (0 when native)
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Summary:
    l1_hu: float | None
    vbmd_l1_l2_mg_cm3: float | None
    category: BoneCategory | None
    levels_used: tuple[str, ...]
    contrast_phase: ContrastPhase
    calibration: Calibration
    l1_hu_flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatientInfo:
    """Demographics from the headers; missing stays missing (None), never defaulted."""

    age_years: float | None
    sex: str | None  # "M", "F", "O" or None


@dataclass(frozen=True)
class AnalysisResult:
    status: AnalysisStatus
    reason: str | None
    study_instance_uid: str
    series_instance_uid: str
    vertebrae: tuple[VertebraResult, ...] = ()
    summary: Summary | None = None
    patient: PatientInfo = field(default_factory=lambda: PatientInfo(None, None))
    algorithm_name: str = "dicomnode-classical-bmd"
    algorithm_version: str = "0"
    series_selection: tuple[str, ...] = ()  # why this series was chosen, human readable
    warnings: tuple[str, ...] = ()
    #: AccessionNumber of the analysed study (lets ``dicomnode evaluate`` match results to a reference).
    accession_number: str | None = None
    #: What produced the result, one line per part with its version (engine, segmentation, vBMD estimator);
    #: named in the SR's algorithm identification.
    algorithm_components: tuple[str, ...] = ()

    def vertebra(self, level: str) -> VertebraResult | None:
        for v in self.vertebrae:
            if v.level == level:
                return v
        return None

    def to_json_dict(self) -> dict[str, Any]:
        """The ``result.json`` document (NaN becomes null, enums their values, tuples lists)."""
        return _jsonable(dataclasses.asdict(self))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PreviousReport:
    """An SR written for an earlier version of the same series' analysis, which a new version replaces.

    Late instances re-open a series; its new analysis (version ``v + 1``) gets new SR UIDs, and its SR names
    each earlier one in its Predecessor Documents Sequence (``dicomnode.report``), so a PACS can tell that
    the new report supersedes them.
    """

    #: The version of the job that wrote it (its UIDs derive from the job key and this version).
    version: int
    #: Where that SR was written (None, or a file since removed: its reference is rebuilt from the UIDs).
    sr_path: str | None = None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, StrEnum):
        return obj.value
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return _jsonable(obj.item())
    return obj


@dataclass(frozen=True)
class ResultFiles:
    """The typed outputs of one analysis, as written (paths as text): what a job's result record keeps.

    Delivery sends :attr:`dicom` (SR first, then the secondary captures); a new version's SR names the
    earlier :attr:`sr`; the admin UI shows :attr:`png`. Nothing is recovered from file names.
    """

    result_json: str | None = None
    sr: str | None = None
    sc: tuple[str, ...] = ()
    png: tuple[str, ...] = ()

    @property
    def dicom(self) -> tuple[str, ...]:
        """The DICOM objects to deliver: the SR first, then the secondary captures."""
        return ((self.sr,) if self.sr else ()) + self.sc

    @property
    def all(self) -> tuple[str, ...]:
        """Every file written: ``result.json``, the DICOM objects, the PNG copies."""
        return ((self.result_json,) if self.result_json else ()) + self.dicom + self.png

    def to_json(self) -> dict[str, Any]:
        return {"result_json": self.result_json, "sr": self.sr, "sc": list(self.sc), "png": list(self.png)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ResultFiles:
        return cls(
            result_json=doc.get("result_json"),
            sr=doc.get("sr"),
            sc=tuple(str(p) for p in doc.get("sc") or ()),
            png=tuple(str(p) for p in doc.get("png") or ()),
        )
