"""One analysis, start to finish: input path -> series choice -> volume -> measurement -> outputs.

What ``dicomnode analyze`` runs, and what a worker's analysis step runs on a spooled series. Every outcome,
including bad input, ends as an ``AnalysisResult`` and a ``result.json``; exceptions never escape
:func:`analyze_path` (an unexpected one is kept in ``AnalyzeRun.error`` for ``-vv``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicomnode.domain import AnalysisResult, AnalysisStatus, PreviousReport, RuleDecision
from dicomnode.errors import DicomnodeError, InputError, NotQualifyingError
from dicomnode.imaging.volume import Volume
from dicomnode.pipeline.jobs import temporary_failure
from dicomnode.pipeline.measure import (
    AnalysisOptions,
    Measure,
    make_measure,
)
from dicomnode.pipeline.rules_in_force import SelectFn, file_select
from dicomnode.vocab import ANALYZE

if TYPE_CHECKING:  # typing only: importing report loads highdicom
    from dicomnode.report import MeasuredSeries, OutputFiles

log = logging.getLogger(__name__)


def _short_reason(decision: RuleDecision | None) -> str:
    """One readable line on why routing did not select a series: the conditions that failed."""
    reasons = decision.reasons if decision is not None else ()
    failed = [r for r in reasons if "FAIL" in r or "matched: ignore" in r or "not selected" in r]
    return "; ".join((failed or list(reasons))[:3]) or "no routing rule selects this series"


@dataclass(frozen=True)
class SeriesChoice:
    """The chosen series (None when none qualifies), why, and why the others were not chosen."""

    chosen: Any | None  # dicomnode.imaging.series.SeriesFiles
    reasons: tuple[str, ...]
    others: tuple[tuple[str, str], ...] = ()  # (series UID, reason)


def choose_series(series: Sequence[Any], select: SelectFn) -> SeriesChoice:
    """Pick the series routing selects among ``SeriesFiles`` (``summary`` and ``series_instance_uid``).

    ``select`` is the routing of the rules in force (:func:`dicomnode.pipeline.rules_in_force.file_select`
    for ``dicomnode analyze``); the best-ranked series it selects for analysis is chosen.
    """
    by_uid = {s.series_instance_uid: s for s in series}
    decisions = list(select([s.summary for s in series]))
    by_decision = {d.series_instance_uid: d for d in decisions}
    selected = sorted(
        (d for d in decisions if d.selected and d.action == ANALYZE and d.series_instance_uid in by_uid),
        key=lambda d: d.rank if d.rank is not None else 1 << 30,
    )
    best = selected[0] if selected else None
    others = tuple(
        (s.series_instance_uid, _short_reason(by_decision.get(s.series_instance_uid)))
        for s in series
        if best is None or s.series_instance_uid != best.series_instance_uid
    )
    if best is None:
        return SeriesChoice(None, (), others)
    rule = f"rule {best.rule}" if best.rule else "rule"
    reasons = (f"{rule}, rank {best.rank or 1} of {len(selected)}", *best.reasons)
    return SeriesChoice(by_uid[best.series_instance_uid], reasons, others)


def chosen_series(series: Sequence[Any], series_instance_uid: str, reasons: Sequence[str]) -> SeriesChoice:
    """The series routing already chose (a job's): taken as it is, no rule is evaluated again."""
    match = [s for s in series if s.series_instance_uid == series_instance_uid]
    others = tuple(
        (s.series_instance_uid, "not the series of this job")
        for s in series
        if s.series_instance_uid != series_instance_uid
    )
    if not match:
        found = f"{len(series)} other series" if series else "no DICOM series"
        raise InputError(f"series {series_instance_uid} not found in the job's input ({found})")
    return SeriesChoice(match[0], tuple(reasons) or ("selected by the node's routing",), others)


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


def default_measure(volume: Volume) -> MeasuredSeries:
    """The measurement engine with default options (classical segmentation, calibrated ROI)."""
    return make_measure()(volume)


def _failed(status: AnalysisStatus, reason: str, choice: SeriesChoice | None) -> AnalysisResult:
    chosen = choice.chosen if choice is not None else None
    return AnalysisResult(
        status=status,
        reason=reason,
        study_instance_uid=chosen.summary.study_instance_uid if chosen is not None else "",
        series_instance_uid=chosen.series_instance_uid if chosen is not None else "",
        series_selection=tuple(choice.reasons) if choice is not None else (),
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
    options: AnalysisOptions | None = None,
    previous_reports: Sequence[PreviousReport] = (),
    select: SelectFn | None = None,
    series_instance_uid: str | None = None,
    selection: Sequence[str] = (),
    lab_values: Sequence[Any] = (),
) -> AnalyzeRun:
    """Analyse a DICOM folder/file or a NIfTI file and write the outputs into ``out_dir``.

    Never raises for bad input: the returned run's status says what happened, ``result.reason`` why.

    Parameters
    ----------
    path
        DICOM folder (possibly several series), DICOM file (also enhanced multi-frame CT), or NIfTI in HU.
    out_dir
        Receives ``result.json`` always; for an ok result ``sr.dcm``, ``sc_*.dcm`` (DICOM input only) and
        ``overlay_*.png`` (``write_png``).
    job_key, version, disclaimer
        Deterministic output UIDs (random without a job key); the overlays' line (``options.disclaimer``).
    measure, options
        The measurement (default: :func:`~dicomnode.pipeline.measure.make_measure` of ``options``, the
        built-in methods without options); ``measure`` is injectable for tests.
    previous_reports
        SRs of earlier versions of this analysis, named as predecessors in the new SR.
    select
        Routing that picks the series of a folder (default: the shipped rules; ``analyze --rules FILE``).
    series_instance_uid, selection
        The series routing already chose, and its reasons (a node job): analysed as it is, no rule is
        evaluated again (``select`` unused).
    lab_values
        The patient's stored lab values (a node job with ``options.fusion_bundle``): the result is fused
        with them when the bundle takes a CT score (:func:`dicomnode.pipeline.fusion.fuse_ct`), and the SR
        says so, or why the image result stands alone.
    """
    from dicomnode.report import DEFAULT_DISCLAIMER, write_outputs

    measure = measure or _measure_for(options)
    if disclaimer is None and options is not None:
        disclaimer = options.disclaimer
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    choice: SeriesChoice | None = None
    try:
        volume, choice, dicom = _input_volume(path, select, series_instance_uid, selection, timings)
        t1 = time.perf_counter()
        measured = measure(volume)
        t2 = time.perf_counter()
        timings["measure"] = t2 - t1
        result = _completed(measured.result, volume, choice)
        sources: list[Dataset] = []
        if dicom and result.status is AnalysisStatus.OK:
            sources = source_datasets(volume, choice.chosen)
        if options is not None and options.fusion_bundle:
            from dicomnode.pipeline.fusion import fuse_ct

            header = sources[0] if sources else volume.header
            result = fuse_ct(result, options.fusion_bundle, lab_values, header)
        outputs = write_outputs(
            _WithResult(result, measured.canonical, measured.roi_masks),
            sources,
            out_dir,
            job_key=job_key,
            version=version,
            disclaimer=disclaimer or DEFAULT_DISCLAIMER,
            write_png=write_png,
            previous_reports=previous_reports,
        )
        timings["report"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return AnalyzeRun(result, outputs, choice, timings_s=timings)
    except Exception as exc:  # bad input (one line), or a bug kept for -vv: still a result.json
        status, reason, error = _failure(exc)
    return _failed_run(_failed(status, reason or status.value, choice), out_dir, choice, error, t0)


def _measure_for(options: AnalysisOptions | None) -> Measure:
    """The measurement of ``options``: the built-in methods go through :func:`default_measure` (module
    level, so tests can replace it), anything else through :func:`make_measure`."""
    plain = options is None or dataclasses.replace(options, disclaimer=None) == AnalysisOptions()
    return default_measure if plain else make_measure(options)


def _failure(exc: Exception) -> tuple[AnalysisStatus, str, BaseException | None]:
    """Status, one-line reason and (for a bug, not bad input) the exception of a failed analysis."""
    if isinstance(exc, NotQualifyingError):
        return AnalysisStatus.NOT_QUALIFYING, _one_line(str(exc)), None
    if isinstance(exc, DicomnodeError):
        return AnalysisStatus.FAILED, _one_line(str(exc)), None
    if isinstance(exc, MemoryError):
        return AnalysisStatus.FAILED, "out of memory while analysing", exc
    temporary = temporary_failure(exc)
    if temporary is not None:  # the runner's recovery sweep retries it; no traceback for a full disk
        return AnalysisStatus.FAILED, temporary, None
    return AnalysisStatus.FAILED, _one_line(f"internal error ({type(exc).__name__}: {exc})"), exc


def _input_volume(
    path: Path,
    select: SelectFn | None,
    series_instance_uid: str | None,
    selection: Sequence[str],
    timings: dict[str, float],
) -> tuple[Volume, SeriesChoice, bool]:
    """The volume to measure, the series choice, and whether it came from DICOM (not NIfTI).

    Raises
    ------
    NotQualifyingError
        No series of the input is selected.
    """
    from dicomnode.imaging.loader import load_path, load_series

    t0 = time.perf_counter()
    loaded = load_path(path)
    if loaded.volume is not None:
        timings["load"] = time.perf_counter() - t0
        return loaded.volume, SeriesChoice(None, ("NIfTI input: the volume given",)), False
    if series_instance_uid is not None:
        choice = chosen_series(loaded.series, series_instance_uid, selection)
    else:
        choice = choose_series(loaded.series, select if select is not None else file_select())
    if choice.chosen is None:
        reason = choice.others[0][1] if choice.others else "no qualifying series"
        if len(loaded.series) > 1:
            reason = f"none of {len(loaded.series)} series qualifies; first: {reason}"
        raise NotQualifyingError(reason)
    timings["scan"] = time.perf_counter() - t0
    volume = load_series(choice.chosen)
    timings["load"] = time.perf_counter() - t0 - timings["scan"]
    log.info("volume %s, spacing %s mm", volume.shape, tuple(round(s, 3) for s in volume.spacing))
    return volume, choice, True


def _completed(result: AnalysisResult, volume: Volume, choice: SeriesChoice) -> AnalysisResult:
    """The measurement's result with what the pipeline knows: selection reasons, UIDs, accession number."""
    fix: dict[str, Any] = {"series_selection": tuple(choice.reasons)}
    if choice.chosen is not None:
        if not result.study_instance_uid:
            fix["study_instance_uid"] = choice.chosen.summary.study_instance_uid
        if not result.series_instance_uid:
            fix["series_instance_uid"] = choice.chosen.series_instance_uid
    if result.accession_number is None:
        fix["accession_number"] = _accession(volume, choice.chosen)
    return dataclasses.replace(result, **fix)


def _accession(volume: Volume, chosen: Any | None) -> str | None:
    """The AccessionNumber of the analysed series (None when the headers have none)."""
    value: Any = None
    if chosen is not None:
        value = chosen.summary.get("AccessionNumber")
    if not value and volume.header is not None:
        value = volume.header.get("AccessionNumber")
    text = str(value).strip() if value is not None else ""
    return text or None


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
