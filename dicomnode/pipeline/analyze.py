"""One analysis, start to finish: input path -> series choice -> volume -> measurement -> outputs.

What ``dicomnode analyze`` runs, and what a worker's analysis step runs on a spooled series. Every outcome,
including bad input, ends as an ``AnalysisResult`` and a ``result.json``; exceptions never escape
:func:`analyze_path` (an unexpected one is kept in ``AnalyzeRun.error`` for ``-vv``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset

from dicomnode import DEFAULT_EROSION_MM
from dicomnode.domain import AnalysisResult, AnalysisStatus, PreviousReport, RuleDecision
from dicomnode.errors import DicomnodeError, InputError, NotQualifyingError
from dicomnode.imaging.volume import Volume
from dicomnode.pipeline.rules_in_force import SelectFn, file_select

if TYPE_CHECKING:  # typing only: importing report loads highdicom
    from dicomnode.report import MeasuredSeries, OutputFiles

log = logging.getLogger(__name__)

#: Bundles whose input spec needs more slices than this cannot serve a routine abdominal CT.
MAX_BUNDLE_MIN_SLICES = 600


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
        (d for d in decisions if d.selected and d.action == "analyse" and d.series_instance_uid in by_uid),
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


Measure = Callable[[Volume], "MeasuredSeries"]

#: ``bmd_estimator`` values meaning the built-in calibrated-ROI vBMD.
ROI_ESTIMATORS = ("roi", "classical", "calibrated-roi")
#: Bundle tasks that can estimate vBMD: per vertebra from 3-D crops, or per series from a mid-sagittal
#: reformat (centred on the ROI centroids of its reference levels).
BMD_BUNDLE_TASKS = ("bmd", "sagittal_bmd_tbs")


@dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis runs with: engines and measurement settings (picklable: sent to worker processes).

    Attributes
    ----------
    segmentation
        ``"classical"`` (built in) or ``"bundle:PATH"`` (a segmentation bundle finds the vertebral bodies).
    bmd_estimator
        ``"roi"`` (calibrated trabecular ROI, built in), ``"bundle:PATH"`` (a vBMD bundle replaces it) or
        ``"both:PATH"`` (the ROI vBMD is reported with the model's beside it and their difference).
    erosion_mm
        Trabecular ROI erosion (default ``dicomnode.DEFAULT_EROSION_MM``).
    contrast_policy
        ``"offset"`` or ``"abstain"`` (``BmdOptions.contrast_correction``).
    disclaimer
        Burned into the overlays (None: the report's default).
    """

    segmentation: str = "classical"
    bmd_estimator: str = "roi"
    erosion_mm: float = DEFAULT_EROSION_MM
    contrast_policy: str = "offset"
    disclaimer: str | None = None

    def bundles(self) -> list[tuple[str, str, Path]]:
        """``(role, task, path)`` of every bundle these options use (role ``segmentation`` or ``bmd``)."""
        out: list[tuple[str, str, Path]] = []
        if self.segmentation != "classical":
            out.append(("segmentation", "segmentation", Path(self.segmentation.partition(":")[2])))
        if self.bmd_estimator not in ROI_ESTIMATORS:
            out.append(("bmd", "bmd", Path(self.bmd_estimator.partition(":")[2])))
        return out


def resolve_options(
    backend: str | None = "classical",
    segmentation_backend: str | None = None,
    bmd_estimator: str | None = None,
    *,
    erosion_mm: float | None = None,
    contrast_policy: str | None = None,
    disclaimer: str | None = None,
) -> AnalysisOptions:
    """Turn the configured choices into :class:`AnalysisOptions`.

    ``backend`` is the umbrella setting: ``classical``, or ``bundle:PATH`` / ``both:PATH`` whose bundle's
    task (read from its manifest) says what it replaces: a segmentation bundle the vertebra finder, a bmd
    bundle the vBMD (``both`` keeps the calibrated ROI beside it). ``segmentation_backend`` and
    ``bmd_estimator``, when given, win over ``backend``.

    Raises
    ------
    ConfigError
        An unknown choice (one line).
    BundleError
        A bundle whose manifest cannot be read, or a ``both:`` given a segmentation bundle.
    """
    from dicomnode.errors import BundleError, ConfigError

    seg = "classical"
    est = "roi"
    kind, _, rest = (backend or "classical").strip().partition(":")
    kind = kind.lower()
    if kind in ("bundle", "both") and rest.strip():
        from dicomnode.ml.bundle import read_manifest

        path = rest.strip()
        task = read_manifest(Path(path)).task
        if task == "segmentation":
            if kind == "both":
                raise BundleError(
                    f"bundle {path}: 'both:' needs a bmd bundle (a segmentation bundle is used as 'bundle:')"
                )
            seg = f"bundle:{path}"
        elif task in BMD_BUNDLE_TASKS:
            est = f"{kind}:{path}"
        else:
            raise BundleError(f"bundle {path}: task {task!r} cannot serve the node's analysis")
    elif kind not in ("classical", ""):
        raise ConfigError(f"analysis.backend: {backend!r} unknown (use classical, bundle:PATH or both:PATH)")
    if segmentation_backend is not None:
        skind, _, spath = segmentation_backend.strip().partition(":")
        if skind.lower() == "classical" and not spath:
            seg = "classical"
        elif skind.lower() == "bundle" and spath.strip():
            seg = f"bundle:{spath.strip()}"
        else:
            raise ConfigError(
                f"analysis.segmentation_backend: {segmentation_backend!r} unknown "
                "(use classical or bundle:PATH)"
            )
    if bmd_estimator is not None:
        ekind, _, epath = bmd_estimator.strip().partition(":")
        if ekind.lower() in ROI_ESTIMATORS and not epath:
            est = "roi"
        elif ekind.lower() in ("bundle", "both") and epath.strip():
            est = f"{ekind.lower()}:{epath.strip()}"
        else:
            raise ConfigError(
                f"analysis.bmd_estimator: {bmd_estimator!r} unknown (use roi, bundle:PATH or both:PATH)"
            )
    if contrast_policy not in (None, "offset", "abstain"):
        raise ConfigError(f"analysis.contrast_policy: {contrast_policy!r} unknown (use offset or abstain)")
    return AnalysisOptions(
        segmentation=seg,
        bmd_estimator=est,
        erosion_mm=DEFAULT_EROSION_MM if erosion_mm is None else float(erosion_mm),
        contrast_policy=contrast_policy or "offset",
        disclaimer=disclaimer,
    )


def options_from_settings(settings: Any) -> AnalysisOptions:
    """:func:`resolve_options` of ``settings.analysis`` (a ``dicomnode.config.Settings``)."""
    a = settings.analysis
    return resolve_options(
        a.backend,
        a.segmentation_backend,
        a.bmd_estimator,
        erosion_mm=a.erosion_mm,
        contrast_policy=a.contrast_policy,
        disclaimer=a.disclaimer,
    )


def check_options(options: AnalysisOptions) -> list[str]:
    """Start-up check of every bundle the options use: it loads (manifest valid, SHA-256 of the weights
    matching, weights fitting the network), has the task its role needs, and its input spec can be met by
    the series the node analyses (CT in Hounsfield units, 3-D).

    Returns
    -------
    list of str
        The identification (name, version, checksum) of each bundle, for the start-up log.

    Raises
    ------
    BundleError
        One line naming the bundle and the reason.
    """
    from dicomnode.errors import BundleError

    idents: list[str] = []
    for role, task, path in options.bundles():
        bundle = _load_bundle(path)
        m = bundle.manifest
        if m.task != task and not (task == "bmd" and m.task in BMD_BUNDLE_TASKS):
            raise BundleError(f"bundle {path}: task {m.task!r}, but the {role} role needs a {task!r} bundle")
        spec = m.input_spec
        if "CT" not in spec.modalities:
            raise BundleError(
                f"bundle {m.name} {m.version}: input spec accepts {', '.join(spec.modalities) or 'nothing'}, "
                "not the CT series this node analyses"
            )
        # a sagittal bundle takes 2-D reformats the node makes from the same 3-D volume
        dims = 2 if m.task == "sagittal_bmd_tbs" else 3
        if len(spec.patch_size) != dims or spec.in_channels != 1:
            raise BundleError(
                f"bundle {m.name} {m.version}: input spec wants {len(spec.patch_size)}-D patches with "
                f"{spec.in_channels} channel(s); the node feeds one 3-D CT volume"
            )
        if spec.min_slices > MAX_BUNDLE_MIN_SLICES:
            raise BundleError(
                f"bundle {m.name} {m.version}: input spec needs {spec.min_slices} slices or more; "
                "no routine abdominal CT has that many"
            )
        idents.append(f"{role}: {m.identification}")
    return idents


#: Bundles loaded in this process, by resolved path (a bundle is read, verified and built once).
_BUNDLES: dict[str, Any] = {}


def _load_bundle(path: Path) -> Any:
    key = str(path.resolve())
    if key not in _BUNDLES:
        from dicomnode.ml.bundle import load_bundle

        _BUNDLES[key] = load_bundle(path)
    return _BUNDLES[key]


def make_measure(options: AnalysisOptions | None = None) -> Measure:
    """The measurement the options describe: ``dicomnode.bmd.analyze_volume`` with their erosion, contrast
    policy and segmentation backend, then the vBMD bundle (``bundle``/``both``) when one is configured.

    The result's ``algorithm_name``/``algorithm_version`` gain each bundle's name/version and
    ``algorithm_components`` lists every part with its version (the SR's algorithm identification).
    """
    opts = options or AnalysisOptions()

    def measure(volume: Volume) -> MeasuredSeries:
        import dicomnode

        try:
            bmd = importlib.import_module("dicomnode.bmd")
        except ModuleNotFoundError as exc:  # pragma: no cover - only while the engine is being built
            raise InputError("the measurement engine (dicomnode.bmd) is not installed") from exc
        from dicomnode.ml.bundle import check_input_spec

        for _, _, path in opts.bundles():  # refuse a series a bundle cannot serve before measuring anything
            check_input_spec(_load_bundle(path), volume)
        backend_name = "classical"
        if opts.segmentation != "classical":
            from dicomnode.bmd.backend_bundle import register_bundle_backend

            backend_name = register_bundle_backend(opts.segmentation)
        bmd_options = bmd.BmdOptions(
            erosion_mm=opts.erosion_mm, contrast_correction=opts.contrast_policy, backend=backend_name
        )
        out = bmd.analyze_volume(volume, bmd_options)
        result: AnalysisResult = out.result
        backend = bmd.get_backend(backend_name)
        components = [f"engine: {dicomnode.ALGORITHM_NAME} {dicomnode.__version__}"]
        if opts.segmentation == "classical":
            components.append(f"segmentation: {backend.name} {backend.version}")
        else:
            ident = getattr(backend, "identification", f"{backend.name} {backend.version}")
            components.append(f"segmentation: model bundle {ident}")
            seg_name = getattr(getattr(backend, "bundle", None), "name", backend.name)
            result = dataclasses.replace(result, algorithm_name=f"{result.algorithm_name}+{seg_name}")
        roi_line = f"vBMD: calibrated trabecular ROI (internal calibration), erosion {opts.erosion_mm:g} mm"
        if opts.bmd_estimator in ROI_ESTIMATORS:
            components.append(roi_line)
        else:
            from dicomnode.ml.inference import apply_bmd_bundle

            mode, _, bundle_path = opts.bmd_estimator.partition(":")
            bundle = _load_bundle(Path(bundle_path))
            roi_vbmd = result.summary.vbmd_l1_l2_mg_cm3 if result.summary is not None else None
            result = apply_bmd_bundle(result, volume, bundle, mode)
            model_line = f"vBMD: model bundle {bundle.manifest.identification}"
            if mode == "both":
                components.append(roi_line)
                agreement = next(
                    (
                        n
                        for n in (result.summary.notes if result.summary else ())
                        if n.startswith(bundle.name)
                    ),
                    None,
                )
                components.append(f"{model_line}, beside the ROI" + (f": {agreement}" if agreement else ""))
                log.info("vBMD agreement: ROI %s; %s", roi_vbmd, agreement)
            else:
                components.append(model_line)
        result = dataclasses.replace(result, algorithm_components=tuple(components))
        return cast("MeasuredSeries", dataclasses.replace(out, result=result))

    return measure


def default_measure(volume: Volume) -> MeasuredSeries:
    """The measurement engine with default options (classical segmentation, calibrated ROI)."""
    return make_measure()(volume)


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
    options: AnalysisOptions | None = None,
    previous_reports: Sequence[PreviousReport] = (),
    select: SelectFn | None = None,
    series_instance_uid: str | None = None,
    selection: Sequence[str] = (),
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
        Burned into the overlays (default: ``options.disclaimer``, else
        ``dicomnode.report.DEFAULT_DISCLAIMER``).
    write_png
        Also write the overlays as PNG.
    measure
        The measurement (default :func:`make_measure` of ``options``); injectable for tests.
    options
        Engines and measurement settings (default: classical segmentation, calibrated ROI,
        ``dicomnode.DEFAULT_EROSION_MM``); see :func:`options_from_settings`.
    previous_reports
        SRs of earlier versions of this analysis, named as predecessors in the new SR (the node's jobs of a
        re-opened series; see :class:`dicomnode.domain.PreviousReport`).
    select
        Routing that picks the series of a folder holding several (default: the shipped rules,
        :func:`dicomnode.pipeline.rules_in_force.file_select`; ``dicomnode analyze --rules FILE`` passes a
        site's rules).
    series_instance_uid, selection
        The series routing already chose, and its reasons (a node job): it is analysed as it is and no
        rule is evaluated again. ``select`` is then not used.

    Returns
    -------
    AnalyzeRun
        Never raises for bad input: the status says what happened, ``result.reason`` why.
    """
    from dicomnode.report import DEFAULT_DISCLAIMER, write_outputs

    if measure is None:
        plain = options is None or dataclasses.replace(options, disclaimer=None) == AnalysisOptions()
        # the built-in methods go through default_measure (module level, so tests can replace it)
        measure = default_measure if plain else make_measure(options)
    if disclaimer is None and options is not None:
        disclaimer = options.disclaimer
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
            if series_instance_uid is not None:
                choice = chosen_series(loaded.series, series_instance_uid, selection)
            else:
                choice = choose_series(loaded.series, select if select is not None else file_select())
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
        if result.accession_number is None:
            fix["accession_number"] = _accession(volume, choice.chosen if choice else None)
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
            previous_reports=previous_reports,
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
