"""One analysis, start to finish: input path -> series choice -> volume -> measurement -> outputs.

What ``dicomnode analyze`` runs, and what a worker's analysis step runs on a spooled series. Every outcome,
including bad input, ends as an ``AnalysisResult`` and a ``result.json``; exceptions never escape
:func:`analyze_path` (an unexpected one is kept in ``AnalyzeRun.error`` for ``-vv``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset

from dicomnode.domain import AnalysisResult, AnalysisStatus, RuleDecision, SeriesSummary
from dicomnode.errors import DicomnodeError, InputError, NotQualifyingError
from dicomnode.imaging.volume import Volume

if TYPE_CHECKING:  # typing only: importing report loads highdicom
    from dicomnode.report import MeasuredSeries, OutputFiles

log = logging.getLogger(__name__)

# --- interim series selection (used until dicomnode.routing provides default_rules/select) ----------------
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
#: Fewer slices than this cannot hold two lumbar vertebrae at any usable slice thickness.
MIN_SLICES = 30
#: A lumbar vertebra + disc is ~30-35 mm high; we need at least two levels in view.
MIN_Z_EXTENT_MM = 60.0
MAX_SLICE_THICKNESS_MM = 5.0
#: Body parts / descriptions that cannot show the lumbar spine.
_WRONG_REGION = re.compile(
    r"\b(HEAD|BRAIN|SKULL|NECK|ORBIT|SINUS|FACE|KNEE|ANKLE|FOOT|HAND|WRIST|ELBOW|SHOULDER|EXTREMITY|LEG|ARM)\b"
)
#: Sharp (bone/lung) reconstruction kernels change trabecular HU; soft kernels are preferred.
_SHARP_KERNEL = re.compile(
    r"(BONE|LUNG|SHARP|DETAIL|EDGE|HR|^B[5-9]\d|^[BI][5-9]\d|^FC[5-9]\d|^YC|^YB)", re.I
)


def _attr_text(summary: SeriesSummary, keyword: str) -> str:
    value = summary.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rejection(summary: SeriesSummary) -> str | None:
    """Why this series cannot be analysed (headers only), or None."""
    modality = _attr_text(summary, "Modality").upper()
    sop = _attr_text(summary, "SOPClassUID")
    image_type = [t.strip().upper() for t in _attr_text(summary, "ImageType").split("\\") if t.strip()]
    if modality == "SR" or "88." in sop[-8:]:
        return "structured report (e.g. a dose report), not an image series"
    if modality and modality != "CT":
        return f"modality {modality} is not CT"
    if not modality:
        return "no Modality in the header; not a CT image series"
    if sop and sop not in CT_SOP_CLASSES:
        if sop.startswith("1.2.840.10008.5.1.4.1.1.7"):
            return "secondary capture (e.g. a dose screen), not a CT image series"
        return f"SOP class {sop} is not a CT image"
    if "LOCALIZER" in image_type:
        return "localizer (scout) images, not an axial series"
    if image_type and not ("ORIGINAL" in image_type and "PRIMARY" in image_type):
        return f"image type {'/'.join(image_type)} is not ORIGINAL/PRIMARY (derived or secondary images)"
    if len(image_type) >= 3 and image_type[2] not in ("AXIAL", ""):
        return f"image type value 3 is {image_type[2]}, not AXIAL"
    region = " ".join(
        _attr_text(summary, k).upper() for k in ("BodyPartExamined", "StudyDescription", "SeriesDescription")
    )
    m = _WRONG_REGION.search(region.replace("_", " "))
    if m:
        return f"body region {m.group(1)} cannot show the lumbar spine"
    frames = _float(summary.get("NumberOfFrames")) or 1.0
    n_slices = max(summary.n_instances, int(frames))
    if n_slices < MIN_SLICES:
        return f"only {n_slices} slice(s); at least {MIN_SLICES} are needed to cover the lumbar spine"
    if summary.z_extent_mm is not None and summary.z_extent_mm < MIN_Z_EXTENT_MM:
        return (
            f"scan range {summary.z_extent_mm:.0f} mm along the slice normal is too short for the lumbar "
            f"spine (needs >= {MIN_Z_EXTENT_MM:.0f} mm)"
        )
    thickness = _float(summary.get("SliceThickness"))
    if thickness is not None and thickness > MAX_SLICE_THICKNESS_MM:
        return f"slice thickness {thickness:g} mm > {MAX_SLICE_THICKNESS_MM:g} mm"
    return None


def interim_select(summaries: Sequence[SeriesSummary]) -> list[RuleDecision]:
    """The interim rule: ORIGINAL/PRIMARY/AXIAL CT, not a localizer, enough slices and range; rank native
    before contrast, soft kernel before sharp, thinnest slices, then most instances.
    """
    decisions: list[RuleDecision] = []
    accepted: list[tuple[tuple[int, int, float, int], SeriesSummary, list[str]]] = []
    for s in summaries:
        reason = _rejection(s)
        if reason is not None:
            decisions.append(RuleDecision(s.series_instance_uid, False, None, "ignore", reasons=(reason,)))
            continue
        contrast = bool(_attr_text(s, "ContrastBolusAgent").strip())
        kernel = _attr_text(s, "ConvolutionKernel")
        sharp = bool(kernel and _SHARP_KERNEL.search(kernel))
        thickness = _float(s.get("SliceThickness")) or 99.0
        why = [
            f"CT {'ORIGINAL/PRIMARY/AXIAL' if _attr_text(s, 'ImageType') else '(no ImageType)'}, "
            f"{s.n_instances} instance(s)"
            + (f", {s.z_extent_mm:.0f} mm range" if s.z_extent_mm is not None else ""),
            "contrast agent in header" if contrast else "native (no contrast agent in header)",
            f"kernel {kernel or 'unknown'} ({'sharp' if sharp else 'soft'})",
            f"slice thickness {thickness:g} mm" if thickness < 99 else "slice thickness unknown",
        ]
        accepted.append(((int(contrast), int(sharp), thickness, -s.n_instances), s, why))
    accepted.sort(key=lambda a: a[0])
    for rank, (_, s, why) in enumerate(accepted, start=1):
        decisions.append(
            RuleDecision(
                s.series_instance_uid, True, "interim-default", "analyse", reasons=tuple(why), rank=rank
            )
        )
    return decisions


def decide(summaries: Sequence[SeriesSummary]) -> list[RuleDecision]:
    """Series decisions by the node's default routing rules (``dicomnode.routing``).

    :func:`interim_select` is the stand-alone rule used before routing existed; it stays as the fallback
    when the default rules cannot be loaded, and as the source of the short rejection messages.
    """
    from dicomnode import routing

    try:
        rules = routing.default_rules()
    except DicomnodeError as exc:  # a broken install; keep analysing with the built-in rule
        log.warning("default routing rules unavailable (%s); using the interim rule", exc)
        return interim_select(summaries)
    return routing.select(list(summaries), rules)


def _short_reason(summary: SeriesSummary, decision: RuleDecision | None) -> str:
    """One readable line on why a series is not analysed."""
    plain = _rejection(summary)
    if plain is not None:
        return plain
    reasons = decision.reasons if decision is not None else ()
    failed = [r for r in reasons if "FAIL" in r or "matched: ignore" in r]
    return "; ".join((failed or list(reasons))[:3]) or "no routing rule selects this series"


@dataclass(frozen=True)
class SeriesChoice:
    """The chosen series (None when none qualifies), why, and why the others were not chosen."""

    chosen: Any | None  # dicomnode.imaging.series.SeriesFiles
    reasons: tuple[str, ...]
    others: tuple[tuple[str, str], ...] = ()  # (series UID, reason)


def choose_series(series: Sequence[Any]) -> SeriesChoice:
    """Pick the best series among ``SeriesFiles`` (anything with ``summary`` and ``series_instance_uid``)."""
    by_uid = {s.series_instance_uid: s for s in series}
    decisions = decide([s.summary for s in series])
    by_decision = {d.series_instance_uid: d for d in decisions}
    selected = sorted(
        (d for d in decisions if d.selected and d.action == "analyse" and d.series_instance_uid in by_uid),
        key=lambda d: d.rank if d.rank is not None else 1 << 30,
    )
    best = selected[0] if selected else None
    others = tuple(
        (s.series_instance_uid, _short_reason(s.summary, by_decision.get(s.series_instance_uid)))
        for s in series
        if best is None or s.series_instance_uid != best.series_instance_uid
    )
    if best is None:
        return SeriesChoice(None, (), others)
    rule = f"rule {best.rule}" if best.rule else "rule"
    reasons = (f"{rule}, rank {best.rank or 1} of {len(selected)}", *best.reasons)
    return SeriesChoice(by_uid[best.series_instance_uid], reasons, others)


# --- the run ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeRun:
    """Outcome of :func:`analyze_path`."""

    result: AnalysisResult
    outputs: OutputFiles | None
    choice: SeriesChoice | None = None
    #: An unexpected exception (a bug, not bad input), kept for ``-vv``.
    error: BaseException | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {AnalysisStatus.OK: 0, AnalysisStatus.NOT_QUALIFYING: 2}.get(self.result.status, 1)


Measure = Callable[[Volume], "MeasuredSeries"]


def default_measure(volume: Volume) -> MeasuredSeries:
    """The measurement engine: ``dicomnode.bmd.analyze_volume`` with default options."""
    try:
        bmd = importlib.import_module("dicomnode.bmd")
    except ModuleNotFoundError as exc:  # pragma: no cover - only while the engine is being built
        raise InputError("the measurement engine (dicomnode.bmd) is not installed") from exc
    if not hasattr(bmd, "analyze_volume"):  # pragma: no cover
        raise InputError("the measurement engine (dicomnode.bmd.analyze_volume) is not available")
    return cast("MeasuredSeries", bmd.analyze_volume(volume, bmd.BmdOptions()))


def _failed(
    status: AnalysisStatus, reason: str, study: str = "", series: str = "", sel: Sequence[str] = ()
) -> AnalysisResult:
    return AnalysisResult(
        status=status,
        reason=reason,
        study_instance_uid=study,
        series_instance_uid=series,
        series_selection=tuple(sel),
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def source_datasets(volume: Volume, chosen: Any | None) -> list[Dataset]:
    """Headers of the analysed images (SR evidence, SC patient/study), in slice order.

    The headers the scan already read are reused (``SeriesFiles.headers``); a file is read again only
    when the scan did not keep its header.
    """
    from dicomnode.imaging.series import read_dicom

    paths = list(dict.fromkeys(p for p in volume.source if p))
    if not paths and chosen is not None:
        paths = list(chosen.paths)
    kept: dict[str, Dataset] = {}
    if chosen is not None and len(getattr(chosen, "headers", ())) == len(chosen.instances):
        kept = dict(zip(chosen.paths, chosen.headers, strict=True))
    return [kept[p] if p in kept else read_dicom(p, header_only=True) for p in paths]


def analyze_path(
    path: Path,
    out_dir: Path,
    *,
    job_key: str | None = None,
    version: int = 1,
    disclaimer: str | None = None,
    write_png: bool = True,
    measure: Measure | None = None,
) -> AnalyzeRun:
    """Analyse a DICOM folder/file or a NIfTI file and write the outputs into ``out_dir``.

    Parameters
    ----------
    path
        Folder of DICOM (possibly several series; the best one is chosen), a single DICOM file (also an
        enhanced multi-frame CT), or a ``.nii``/``.nii.gz`` CT volume in HU.
    out_dir
        Receives ``result.json`` always, and for an ok result ``sr.dcm``, ``sc_*.dcm`` (DICOM input
        only) and ``overlay_*.png``.
    job_key, version
        Deterministic output UIDs (see ``dicomnode.report.uids``); random without a job key.
    disclaimer
        Burned into the overlays (default: ``dicomnode.report.DEFAULT_DISCLAIMER``).
    write_png
        Also write the overlays as PNG.
    measure
        The measurement (default :func:`default_measure`); injectable for tests.

    Returns
    -------
    AnalyzeRun
        Never raises for bad input: the status says what happened, ``result.reason`` why.
    """
    from dicomnode.report import DEFAULT_DISCLAIMER, write_outputs

    measure = measure or default_measure
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    choice: SeriesChoice | None = None
    study = series_uid = ""
    error: BaseException | None
    try:
        from dicomnode.imaging.loader import load_path, load_series

        loaded = load_path(path)
        sources: list[Dataset] = []
        if loaded.volume is not None:
            volume = loaded.volume
            choice = SeriesChoice(None, ("NIfTI input: the volume given",))
        else:
            choice = choose_series(loaded.series)
            if choice.chosen is None:
                reason = choice.others[0][1] if choice.others else "no qualifying series"
                if len(loaded.series) > 1:
                    reason = f"none of {len(loaded.series)} series qualifies; first: {reason}"
                raise NotQualifyingError(reason)
            study = choice.chosen.summary.study_instance_uid
            series_uid = choice.chosen.series_instance_uid
            timings["scan"] = time.perf_counter() - t0
            volume = load_series(choice.chosen)
        timings["load"] = time.perf_counter() - t0 - timings.get("scan", 0.0)
        log.info("volume %s, spacing %s mm", volume.shape, tuple(round(s, 3) for s in volume.spacing))
        t1 = time.perf_counter()
        measured = measure(volume)
        timings["measure"] = time.perf_counter() - t1
        result = measured.result
        fix: dict[str, Any] = {"series_selection": tuple(choice.reasons) if choice else ()}
        if not result.study_instance_uid and study:
            fix["study_instance_uid"] = study
        if not result.series_instance_uid and series_uid:
            fix["series_instance_uid"] = series_uid
        result = dataclasses.replace(result, **fix)
        measured = _WithResult(result, measured.canonical, measured.roi_masks)
        if loaded.volume is None and result.status is AnalysisStatus.OK:
            sources = source_datasets(volume, choice.chosen if choice else None)
        t2 = time.perf_counter()
        outputs = write_outputs(
            measured,
            sources,
            out_dir,
            job_key=job_key,
            version=version,
            disclaimer=disclaimer or DEFAULT_DISCLAIMER,
            write_png=write_png,
        )
        timings["report"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return AnalyzeRun(result, outputs, choice, timings_s=timings)
    except NotQualifyingError as exc:
        status, reason, error = AnalysisStatus.NOT_QUALIFYING, _one_line(str(exc)), None
    except DicomnodeError as exc:
        status, reason, error = AnalysisStatus.FAILED, _one_line(str(exc)), None
    except MemoryError as exc:
        status, reason, error = AnalysisStatus.FAILED, "out of memory while analysing", exc
    except Exception as exc:  # a bug or an input we did not foresee: still one line and a result.json
        status, reason, error = (
            AnalysisStatus.FAILED,
            _one_line(f"internal error ({type(exc).__name__}: {exc})"),
            exc,
        )
    sel = choice.reasons if choice else ()
    return _failed_run(
        _failed(status, reason or status.value, study, series_uid, sel), out_dir, choice, error, t0
    )


def _failed_run(
    result: AnalysisResult, out_dir: Path, choice: SeriesChoice | None, error: BaseException | None, t0: float
) -> AnalyzeRun:
    from dicomnode.report import OutputFiles, write_result_json

    outputs: OutputFiles | None
    try:
        outputs = OutputFiles(result_json=write_result_json(result, out_dir))
    except OSError as exc:  # the output folder itself is unusable
        log.error("cannot write result.json into %s: %s", out_dir, exc)
        outputs = None
    return AnalyzeRun(result, outputs, choice, error=error, timings_s={"total": time.perf_counter() - t0})


@dataclass(frozen=True)
class _WithResult:
    """The measurement with the result completed by the pipeline (selection reasons, UIDs)."""

    result: AnalysisResult
    canonical: Volume
    roi_masks: Any
