"""Late fusion with laboratory values in the node (founding study a): the one owner for every pipeline.

A fusion bundle (``analysis.fusion_bundle``, ``dicomnode train fusion``) names what its image score is
(``dicomnode.ml.fusion.IMAGE_INPUTS``). A job's analysis asks :func:`fuse` with the score its own image
model gives for that input: the knee-xray pipeline its knee bundle's probability (``knee-probability``),
the CT analysis its L1-L2 vBMD (``ct-vbmd``: the calibrated ROI's, ``ct-model-vbmd``: the bmd bundle's,
read by :func:`dicomnode.ml.fusion.ct_image_score` exactly as ``train fusion --image-results`` reads it).
With the patient's stored lab values within the bundle's window the fused probability comes back with the
lab values used (name, value, unit, date); otherwise None and one sentence saying why the image result
stands alone. The analysis step fetches the lab values (:func:`patient_labs`) when a fusion bundle is
configured; nothing here logs a lab value.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing only: importing report loads highdicom
    from dicomnode.domain import AnalysisResult

#: Gives the image score for a bundle's image input, or None and why there is none.
ScoreFor = Callable[[str], tuple[float | None, str]]


@dataclass(frozen=True)
class Fusion:
    """What :func:`fuse` found: the fused probability of osteoporosis (None: the image result alone)."""

    probability: float | None
    note: str
    labs_used: tuple[str, ...] = ()
    bundle: str | None = None
    image_input: str | None = None
    image_score: float | None = None

    @property
    def fused_class(self) -> str | None:
        if self.probability is None:
            return None
        return "osteoporosis" if self.probability >= 0.5 else "normal"

    @property
    def class_probability(self) -> float | None:
        """The probability of :attr:`fused_class`."""
        return None if self.probability is None else max(self.probability, 1.0 - self.probability)


def patient_labs(store: Any, paths: Sequence[Path]) -> tuple[Any, ...]:
    """The stored lab values of the patient of a job's images (Patient ID of the first readable header)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        except (OSError, InvalidDicomError, EOFError, ValueError):
            continue
        pid = str(ds.get("PatientID", "") or "").strip()
        return tuple(store.lab_values(pid)) if pid else ()
    return ()


def study_day(header: Any) -> date | None:
    """The study's date (Study, Series, Content or Acquisition Date, the first valid one), else None."""
    if header is None:
        return None
    for kw in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        text = str(header.get(kw, "") or "").strip()
        if len(text) == 8 and text.isdigit():
            try:
                return date(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                continue
    return None


@functools.lru_cache(maxsize=2)
def fusion_bundle(path: str) -> Any:
    """The fusion bundle at ``path``, loaded (checksum verified) once per process."""
    from dicomnode.ml.fusion import load_fusion_bundle

    return load_fusion_bundle(path)


def fuse(path: str, score_for: ScoreFor, lab_values: Sequence[Any], day: date | None) -> Fusion:
    """Fuse a job's image score with the patient's lab values through the bundle at ``path``.

    ``score_for`` gives the image score for the bundle's image input (None and why when the job's image
    model does not give that kind of score). Never raises for a missing input: the note says why the
    image result stands alone.
    """
    from dicomnode.labs.values import LabValue
    from dicomnode.ml.fusion import apply_fusion

    bundle = fusion_bundle(path)
    ident = bundle.identification
    score, why = score_for(bundle.image_input)
    if score is None:
        note = f"image model only: {why} ({ident})"
        return Fusion(None, note, bundle=ident, image_input=bundle.image_input)
    done = functools.partial(Fusion, bundle=ident, image_input=bundle.image_input, image_score=score)
    labs = [
        LabValue(v.patient_id, v.analyte, v.loinc, float(v.value), v.unit, v.effective, v.source, v.source_id)
        for v in lab_values
    ]
    if not labs:
        return done(None, f"image model only: no laboratory values of the patient ({ident})")
    if day is None:
        return done(None, f"image model only: the study has no valid date to match lab values to ({ident})")
    p, used, note = apply_fusion(bundle, score, labs, day)
    return done(p, f"{note} ({ident})", tuple(used) if p is not None else ())


def knee_score(probability: float) -> ScoreFor:
    """The score a knee-xray job gives: its knee bundle's probability of osteoporosis."""

    def score_for(image_input: str) -> tuple[float | None, str]:
        if image_input == "knee-probability":
            return probability, ""
        return None, f"the fusion bundle takes {image_input} scores"

    return score_for


def fuse_ct(
    result: AnalysisResult, path: str | None, lab_values: Sequence[Any], header: Any
) -> AnalysisResult:
    """The CT result with its fusion (``report.sr.FusedResult``, which the CT SR reports), or the result
    as it is when no fusion bundle is configured or the analysis did not succeed."""
    from dicomnode.domain import AnalysisStatus

    if path is None or result.status is not AnalysisStatus.OK or result.summary is None:
        return result
    from dicomnode.ml.fusion import ct_image_score
    from dicomnode.report.sr import FusedEstimate, FusedResult

    doc = result.to_json_dict()
    found = fuse(path, lambda image_input: ct_image_score(doc, image_input), lab_values, study_day(header))
    note = found.note
    if found.fused_class is not None and found.class_probability is not None:
        vbmd = -found.image_score if found.image_score is not None else float("nan")
        note = (
            f"image and laboratory values fused: {found.fused_class} (p = {found.class_probability:.2f}), "
            f"beside the image result (L1-L2 vBMD {vbmd:.1f} mg/cm3, {found.image_input}); {note}"
        )
    estimate = FusedEstimate(
        note=note,
        probability_osteoporosis=found.probability,
        fused_class=found.fused_class,
        class_probability=found.class_probability,
        labs_used=found.labs_used,
        bundle=found.bundle,
        image_input=found.image_input,
        image_score=found.image_score,
    )
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return FusedResult(**{**fields, "fusion": estimate})
