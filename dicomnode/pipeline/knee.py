"""The knee-xray pipeline (founding study e): one job's radiograph -> class -> SR and SC.

Jobs whose routing rule names ``pipeline: knee-xray`` come here instead of the CT measurement
(:func:`dicomnode.pipeline.executors.analyze_job` dispatches on the job's pipeline). Without a knee bundle
configured (``analysis.knee_bundle``) the job ends NOT_QUALIFYING with the reason "no model configured":
the images were received and kept, and nothing is guessed. Bad input (not a knee, a radiograph without
spacing, undecodable pixels) ends with a one-line reason, as the CT pipeline does.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.domain import AnalysisResult, AnalysisStatus, PreviousReport, ResultFiles
from dicomnode.errors import DicomnodeError, InputError, NotQualifyingError
from dicomnode.pipeline.fusion import patient_labs
from dicomnode.pipeline.jobs import AnalysisOutcome, AnalysisRequest

log = logging.getLogger(__name__)

KNEE_PIPELINE = "knee-xray"
NO_MODEL = "no model configured: knee radiograph received, not classified (set analysis.knee_bundle)"
ALGORITHM = "dicomnode-knee-xray"

__all__ = ["KNEE_PIPELINE", "NO_MODEL", "analyze_knee", "analyze_knee_job", "patient_labs"]


@functools.lru_cache(maxsize=2)
def _bundle(path: str) -> Any:
    from dicomnode.ml.bundle import load_bundle
    from dicomnode.ml.knee import check_knee_bundle

    bundle = load_bundle(path)
    check_knee_bundle(bundle.manifest)
    return bundle


def _series_files(folder: Path, series_instance_uid: str | None) -> list[Path]:
    """The DICOM files of the series in ``folder`` (all series when no UID is given), in instance order."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found: list[tuple[int, str, Path]] = []
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        try:
            ds = pydicom.dcmread(
                p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "InstanceNumber"]
            )
        except (OSError, InvalidDicomError, EOFError, ValueError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if series_instance_uid is None or uid == series_instance_uid:
            try:
                number = int(ds.get("InstanceNumber", 0) or 0)
            except (TypeError, ValueError):
                number = 0
            found.append((number, p.name, p))
    return [p for _, _, p in sorted(found)]


def _result(
    status: AnalysisStatus,
    reason: str | None,
    header: Dataset | None,
    series_uid: str,
    selection: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    study = str(header.get("StudyInstanceUID", "")) if header is not None else ""
    accession = str(header.get("AccessionNumber", "") or "").strip() or None if header is not None else None
    doc = AnalysisResult(
        status=status,
        reason=reason,
        study_instance_uid=study,
        series_instance_uid=series_uid,
        algorithm_name=ALGORITHM,
        algorithm_version=str(extra.get("bundle_version", "0")) if extra else "0",
        series_selection=tuple(selection),
        accession_number=accession,
    ).to_json_dict()
    doc["pipeline"] = KNEE_PIPELINE
    if extra:
        doc["knee"] = extra
    return doc


def _write_json(doc: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _previous(
    previous_reports: Sequence[PreviousReport], job_key: str | None, version: int, study_uid: str
) -> list[Dataset]:
    if not previous_reports:
        return []
    from dicomnode.report.sr import predecessor_references
    from dicomnode.report.uids import UidPolicy

    return predecessor_references(previous_reports, UidPolicy(job_key=job_key, version=version), study_uid)


def analyze_knee(
    input_path: Path,
    out_dir: Path,
    *,
    bundle_path: str | None,
    series_instance_uid: str | None = None,
    selection: Sequence[str] = (),
    job_key: str | None = None,
    version: int = 1,
    disclaimer: str | None = None,
    previous_reports: Sequence[PreviousReport] = (),
    fusion_bundle: str | None = None,
    lab_values: Sequence[Any] = (),
) -> AnalysisOutcome:
    """Classify the knee radiograph of a series and write ``result.json`` (always), SR, SC and PNG.

    Never raises for bad input: the outcome's status and reason say what happened.
    """
    header: Dataset | None = None
    uid = series_instance_uid or ""
    try:
        files = _series_files(input_path, series_instance_uid)
        if not files:
            raise InputError("no DICOM image of the series in the job's input")
        if bundle_path is None:
            import pydicom

            header = pydicom.dcmread(files[0], stop_before_pixels=True)
            uid = uid or str(header.get("SeriesInstanceUID", ""))
            doc = _result(AnalysisStatus.NOT_QUALIFYING, NO_MODEL, header, uid, selection)
            return AnalysisOutcome(
                AnalysisStatus.NOT_QUALIFYING,
                NO_MODEL,
                doc,
                ResultFiles(result_json=str(_write_json(doc, out_dir))),
            )
        from dicomnode.imaging.projection import load_radiograph
        from dicomnode.ml.knee import classify_radiograph

        rad = load_radiograph(files[0])
        header = rad.header
        uid = uid or str(header.get("SeriesInstanceUID", ""))
        bundle = _bundle(bundle_path)
        pred = classify_radiograph(bundle, rad)
        fused: tuple[float | None, str] = (None, "image model only: no fusion bundle configured")
        if fusion_bundle is not None:
            from dicomnode.pipeline.fusion import fuse, knee_score, study_day

            found = fuse(
                fusion_bundle, knee_score(_osteoporosis_probability(pred)), lab_values, study_day(rad.header)
            )
            fused = (found.probability, found.note)
        return _report(
            pred,
            rad,
            bundle,
            files,
            out_dir,
            uid,
            selection,
            job_key,
            version,
            disclaimer,
            previous_reports,
            fused,
        )
    except NotQualifyingError as exc:
        status, reason = AnalysisStatus.NOT_QUALIFYING, " ".join(str(exc).split())[:400]
    except DicomnodeError as exc:
        status, reason = AnalysisStatus.FAILED, " ".join(str(exc).split())[:400]
    except Exception as exc:  # a bug, not bad input: the job fails with the reason, the worker lives on
        log.exception("knee analysis of series %s crashed", uid)
        status, reason = AnalysisStatus.FAILED, f"internal error ({type(exc).__name__}: {exc})"[:400]
    doc = _result(status, reason, header, uid, selection)
    return AnalysisOutcome(status, reason, doc, ResultFiles(result_json=str(_write_json(doc, out_dir))))


def _report(
    pred: Any,
    rad: Any,
    bundle: Any,
    files: Sequence[Path],
    out_dir: Path,
    uid: str,
    selection: Sequence[str],
    job_key: str | None,
    version: int,
    disclaimer: str | None,
    previous_reports: Sequence[PreviousReport],
    fused: tuple[float | None, str] = (None, "image model only"),
) -> AnalysisOutcome:
    import numpy as np

    from dicomnode.report import DEFAULT_DISCLAIMER
    from dicomnode.report.knee import KneeReport, write_knee_outputs

    prepared = pred.prepared
    display, heat = prepared.display, pred.heatmap
    if prepared.mirrored:  # show the knee as it was acquired
        display, heat = display[:, ::-1], heat[:, ::-1]
    comments = [
        f"knee region resampled to {prepared.spacing_mm:g} mm pixels; spacing from {rad.spacing_source}"
    ]
    if len(files) > 1:
        comments.append(f"the series holds {len(files)} images; the first was classified")
    p_fused, fusion_note = fused
    comments.append(fusion_note)
    fused_class = None if p_fused is None else ("osteoporosis" if p_fused >= 0.5 else "normal")
    fused_probability = None if p_fused is None else max(p_fused, 1.0 - p_fused)
    report = KneeReport(
        class_names=pred.class_names,
        probabilities=pred.probabilities,
        algorithm_name=bundle.manifest.name,
        algorithm_version=bundle.manifest.version,
        identification=pred.identification,
        region_rc=prepared.region_in_source(rad.spacing_mm),
        display=np.ascontiguousarray(display),
        heatmap=np.ascontiguousarray(heat),
        display_spacing_mm=prepared.spacing_mm,
        fused_class=fused_class,
        fused_probability=fused_probability,
        comments=tuple(comments),
    )
    extra = {
        "class": report.class_name,
        "probability": report.probability,
        "probabilities": dict(zip(pred.class_names, pred.probabilities, strict=True)),
        "bundle": pred.identification,
        "bundle_version": bundle.manifest.version,
        "laterality": rad.laterality,
        "fused_class": fused_class,
        "fused_probability_osteoporosis": p_fused,
        "comments": list(comments),
    }
    doc = _result(AnalysisStatus.OK, None, rad.header, uid, selection, extra)
    json_path = _write_json(doc, out_dir)
    study_uid = str(rad.header.get("StudyInstanceUID", ""))
    outputs = write_knee_outputs(
        report,
        rad.header,
        out_dir,
        json_path,
        job_key=job_key,
        version=version,
        disclaimer=disclaimer or DEFAULT_DISCLAIMER,
        previous_versions=_previous(previous_reports, job_key, version, study_uid),
    )
    log.info("knee series %s: class %s", uid, report.class_name)  # a class, no patient data
    files_out = ResultFiles(
        str(json_path), str(outputs.sr), tuple(map(str, outputs.sc)), tuple(map(str, outputs.png))
    )
    return AnalysisOutcome(AnalysisStatus.OK, None, doc, files_out)


def _osteoporosis_probability(pred: Any) -> float:
    names = [n.lower() for n in pred.class_names]
    if "osteoporosis" in names:
        return float(pred.probabilities[names.index("osteoporosis")])
    return 1.0 - float(pred.probabilities[0])


def analyze_knee_job(request: AnalysisRequest, options: Any = None) -> AnalysisOutcome:
    """:func:`analyze_knee` on a node job's input folder (the series routing chose), with the node's
    analysis options (``knee_bundle``, ``fusion_bundle``) and the patient's lab values of the request."""
    return analyze_knee(
        request.input_dir,
        request.out_dir,
        bundle_path=getattr(options, "knee_bundle", None),
        fusion_bundle=getattr(options, "fusion_bundle", None),
        lab_values=request.lab_values,
        series_instance_uid=request.series_instance_uid,
        selection=request.selection,
        job_key=request.job_key,
        version=request.version,
        disclaimer=request.disclaimer,
        previous_reports=request.previous_reports,
    )
