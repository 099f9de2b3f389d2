"""``dicomnode analyze INPUT --out DIR``: analyze one CT (DICOM folder/file or NIfTI) and write the outputs.

Exit status: 0 analysed (status ok), 2 not qualifying (MR, localizer, head CT, dose report, too few slices,
lumbar spine not in view...), 1 failure. ``DIR/result.json`` is written in every case, except when a
configured model bundle or the routing rules are refused before any image is read (tampered, wrong task,
missing, invalid rules: exit 2, one line).

The series of a folder is chosen by the same routing the node uses (``dicomnode.routing``): the shipped
default rules, or a site's rules with ``--rules FILE`` (or the ``rules_file`` of ``--config``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, TextIO

from dicomnode.domain import AnalysisResult, AnalysisStatus

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "analyze",
        help="analyze one CT series (DICOM folder/file or NIfTI) and write SR, overlays and result.json",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", type=Path, help="DICOM folder (searched recursively), DICOM file, or .nii/.nii.gz"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    p.add_argument(
        "--job-key", default=None, help="stable job id: output UIDs derive from it (default: random)"
    )
    p.add_argument("--output-version", type=int, default=1, help="output version for the UIDs (default 1)")
    p.add_argument("--disclaimer", default=None, help="line burned into the overlays")
    p.add_argument("--no-png", action="store_true", help="do not write PNG copies of the overlays")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="take the analysis options (backend, estimator, erosion, contrast policy, disclaimer) from the "
        "'analysis' section of this node config file; the options below override it",
    )
    p.add_argument(
        "--backend",
        default=None,
        metavar="SPEC",
        help="classical (default), bundle:PATH or both:PATH: a model bundle replaces the vertebra finder "
        "(segmentation bundle) or the vBMD (bmd bundle; 'both' reports it beside the calibrated ROI)",
    )
    p.add_argument(
        "--rules",
        type=Path,
        default=None,
        metavar="FILE",
        help="routing rules that choose the series of a folder (a site's rules, as 'dicomnode rules explain' "
        "takes them; default: the config's rules_file with --config, else the shipped default rules)",
    )
    p.add_argument("--segmentation-backend", default=None, metavar="SPEC", help="classical or bundle:PATH")
    p.add_argument(
        "--bmd-estimator",
        default=None,
        metavar="SPEC",
        help="roi (calibrated ROI, default), bundle:PATH (model vBMD) or both:PATH (both, with agreement)",
    )
    from dicomnode.cli.knee import add_analyze_arguments

    add_analyze_arguments(p)
    p.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> Any:
    """The analysis options of ``--config`` and the backend flags, with every bundle checked.

    Returns
    -------
    dicomnode.pipeline.measure.AnalysisOptions

    Raises
    ------
    DicomnodeError
        A config, backend choice or bundle that cannot be used (one line).
    """
    from dicomnode.pipeline.measure import check_options, resolve_options

    backend = getattr(args, "backend", None)
    seg = getattr(args, "segmentation_backend", None)
    est = getattr(args, "bmd_estimator", None)
    config = getattr(args, "config", None)
    if config is not None:
        from dicomnode.config import load_settings

        a = load_settings(config).analysis
        options = resolve_options(
            backend if backend is not None else a.backend,
            seg if seg is not None else a.segmentation_backend,
            est if est is not None else a.bmd_estimator,
            erosion_mm=a.erosion_mm,
            contrast_policy=a.contrast_policy,
            disclaimer=a.disclaimer,
        )
    else:
        options = resolve_options(backend or "classical", seg, est)
    check_options(options)
    return options


def select_from_args(args: argparse.Namespace) -> Any:
    """The routing that chooses the series: ``--rules FILE``, else ``--config``'s ``rules_file``, else the
    shipped default rules (the same ``dicomnode.routing`` the node routes with).

    Returns
    -------
    dicomnode.pipeline.rules_in_force.SelectFn

    Raises
    ------
    DicomnodeError
        Unreadable or invalid rules (one line).
    """
    from dicomnode.pipeline.rules_in_force import file_select

    rules_file = getattr(args, "rules", None)
    config = getattr(args, "config", None)
    destinations: tuple[str, ...] = ()
    if config is not None:
        from dicomnode.config import load_settings

        settings = load_settings(config)
        destinations = tuple(settings.destination_names)
        if rules_file is None:
            rules_file = settings.rules_file
    return file_select(rules_file, destinations)


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def print_result(result: AnalysisResult, out: TextIO) -> None:
    """The short table: level, HU mean, vBMD, flags; then the summary line."""
    out.write(f"{'level':<6}{'HU mean':>9}{'HU median':>11}{'vBMD mg/cm3':>13}  flags\n")
    for v in result.vertebrae:
        flags = []
        if v.level_uncertain:
            flags.append("level uncertain")
        if v.excluded:
            flags.append(f"excluded: {v.exclusion_reason or 'yes'}")
        flags.extend(q for q in v.qc if not (v.excluded and q in (v.exclusion_reason or "")))
        level = v.level + ("?" if v.level_uncertain else "")
        out.write(
            f"{level:<6}{_f(v.trabecular_hu_mean):>9}{_f(v.trabecular_hu_median):>11}"
            f"{_f(v.vbmd_mg_cm3):>13}  {'; '.join(flags)}\n"
        )
    s = result.summary
    if s is None:
        return
    levels = "-".join(s.levels_used) if s.levels_used else "none"
    category = s.category.value if s.category is not None else "no category"
    out.write(
        f"\nmean vBMD ({levels}): {_f(s.vbmd_l1_l2_mg_cm3)} mg/cm3 -> {category} (ACR QCT categories)\n"
    )
    phase = s.contrast_phase.value
    kvp = f"{s.calibration.kvp:g} kVp" if s.calibration.kvp is not None else "kVp unknown"
    out.write(f"L1 HU: {_f(s.l1_hu)}   contrast: {phase}   {kvp}   calibration: {s.calibration.method}\n")
    for note in dict.fromkeys((*s.l1_hu_flags, *s.notes, *s.calibration.flags, *result.warnings)):
        out.write(f"note: {note}\n")


def _is_command_process() -> bool:
    """True when this process was started as the ``dicomnode`` command (console script or
    ``python -m dicomnode``), not when the handler is called from other Python code (tests, a worker)."""
    entry = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if entry not in ("dicomnode", "dicomnode.exe", "__main__.py"):
        return False
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if entry == "__main__.py" and (spec is None or not str(spec.name).startswith("dicomnode")):
        return False
    # coverage (and similar tools) write their data at interpreter exit: let them
    return "coverage" not in sys.modules


def _exit_now(rc: int) -> None:
    """End the command without the interpreter's teardown.

    Tearing down ~1000 imported modules (numpy, scipy, pydicom, highdicom...) and the objects they hold
    takes about half a second after the work is done. Every output is already written, fsynced and closed
    when the handler returns, so only the standard streams and the log handlers need flushing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say anyway
            stream.flush()
    os._exit(rc)


#: Cyclic garbage collection in the command process: a young generation this large is collected about
#: 70 times less often than with Python's default (700), and older generations only every 50 of those.
COMMAND_GC_THRESHOLDS = (50_000, 50, 50)


def _tune_gc() -> None:
    """Spare the one-shot command most of the cyclic garbage collector's work.

    Reading a few hundred DICOM headers and building the SR allocate hundreds of thousands of small
    objects; with the default thresholds the collector ran ~700 times, five of them full collections over
    every module imported (about 0.3 s of a 5 s run). Everything imported so far lives until the process
    ends: ``gc.freeze`` takes it out of the collector's sight, and higher thresholds make collections rare
    (cycles are still freed: the collector stays enabled). Nothing computed changes.
    """
    gc.freeze()
    gc.set_threshold(*COMMAND_GC_THRESHOLDS)


def run(args: argparse.Namespace) -> int:
    """Handler of ``dicomnode analyze``; never lets a traceback reach the user (unless -vv).

    Run as the ``dicomnode`` command, the garbage collector is tuned for one short run (:func:`_tune_gc`)
    and the process ends at once (see :func:`_exit_now`); called from Python it returns the exit status and
    leaves the collector as it was.
    """
    command = _is_command_process()
    if command:
        _tune_gc()
    rc = _run(args)
    if command:
        _exit_now(rc)
    return rc


def _run(args: argparse.Namespace) -> int:
    verbose = int(getattr(args, "verbose", 0) or 0)
    if verbose == 0:
        # pydicom reports every odd value it tolerates; the user gets our one-line verdict instead.
        # (import first: importing pydicom.config resets its logger's level)
        import pydicom.config  # noqa: F401

        logging.getLogger("pydicom").setLevel(logging.ERROR)
    from dicomnode.errors import DicomnodeError

    try:
        # A bundle that is tampered with, of the wrong task or whose spec no CT can meet: refused before
        # any image is read, with one line.
        options = options_from_args(args)
        select = select_from_args(args)
    except DicomnodeError as exc:
        print(f"dicomnode analyze: {exc}", file=sys.stderr)
        return 2
    from dicomnode.cli.knee import maybe_analyze_knee

    knee_rc = maybe_analyze_knee(args, select)  # a knee radiograph routed to knee-xray (issue 12)
    if knee_rc is not None:
        return knee_rc
    try:
        from dicomnode.pipeline.analyze import analyze_path

        with warnings.catch_warnings():
            if verbose == 0:
                warnings.simplefilter("ignore")
            run_ = analyze_path(
                args.input,
                args.out,
                job_key=args.job_key,
                version=args.output_version,
                disclaimer=args.disclaimer,
                write_png=not args.no_png,
                options=options,
                select=select,
            )
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # outside analyze_path's own net (e.g. a broken install)
        if verbose >= 2:
            traceback.print_exc()
        print(
            f"dicomnode analyze: failed: {type(exc).__name__}: {exc} (rerun with -vv for the traceback)",
            file=sys.stderr,
        )
        return 1
    result = run_.result
    if run_.error is not None and verbose >= 2:
        traceback.print_exception(run_.error)
    if run_.choice is not None and run_.choice.reasons:
        chosen = run_.choice.chosen
        what = f"series {chosen.series_instance_uid}" if chosen is not None else "input"
        # the first reason names the rule; ranking lines say why this one; -v prints every condition
        shown = [r for n, r in enumerate(run_.choice.reasons) if n == 0 or verbose >= 1 or "ranking" in r]
        print(f"{what}: " + "; ".join(shown))
        if verbose >= 1:
            for uid, why in run_.choice.others:
                print(f"  not chosen {uid}: {why}")
    if verbose >= 1 and run_.timings_s:
        print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in run_.timings_s.items()))
    if result.status is AnalysisStatus.OK:
        print_result(result, sys.stdout)
        if run_.outputs is not None:
            o = run_.outputs
            parts = [o.result_json.name]
            if o.sr is not None:
                parts.append(o.sr.name)
            if o.sc:
                parts.append(f"{len(o.sc)} secondary capture(s)")
            if o.png:
                parts.append(f"{len(o.png)} PNG")
            print(f"\nwritten to {o.result_json.parent}: {', '.join(parts)}")
            for note in o.notes:
                print(f"note: {note}")
        return 0
    label = "not qualifying" if result.status is AnalysisStatus.NOT_QUALIFYING else "failed"
    hint = (
        " (unexpected error; rerun with -vv for the traceback)"
        if run_.error is not None and verbose < 2
        else ""
    )
    print(f"dicomnode analyze: {label}: {result.reason}{hint}", file=sys.stderr)
    return run_.exit_code
