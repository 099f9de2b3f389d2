"""Outputs of a knee-radiograph classification (founding study e): TID 1500 SR, secondary capture.

SR content tree (Comprehensive SR, the same TID 1500 layout rules as the CT report in ``report.sr``)::

    Imaging Measurement Report (126000 DCM)                         TID 1500
      observer: device dicomnode;  procedure reported: Projection X-Ray (113704 DCM)
      Image Library: the radiograph                                  TID 1600
      Imaging Measurements (126010 DCM)
        one group WITH its image region (viewer-safe: OHIF takes the first SCOORD of each group):
          tracking identifier "knee region" + UID;  finding site Knee (72696002 SCT);  algorithm (TID 4019)
          Image Region: SCOORD closed POLYLINE, the knee region the network saw, on the radiograph
          Probability (122157 DCM) of the reported class, unit {ratio} 1             TID 300
          qualitative: the class (Normal 17621005 / Osteopenia 312894000 / Osteoporosis 64859006 SCT)
      Derived Imaging Measurements (126011 DCM)
        Probability of every class (99DCMNODE PROB-<CLASS>)
        fused estimate with laboratory values, when there is one
      Qualitative Evaluations (C0034375 UMLS)
        the class;  TEXT algorithm name / version;  TEXT comments (labs used with dates, or why none)

The secondary capture shows the knee region as the network saw it (un-mirrored, in the source's
orientation) beside the same image with the class-activation heat map, and the result underneath.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.report import codes as c
from dicomnode.report.outputs import OutputFiles, _atomic_write
from dicomnode.report.patient import sanitized_source
from dicomnode.report.render import DEFAULT_DISCLAIMER, RenderedImage, _font
from dicomnode.report.sr import MANUFACTURER, _append_to_root, _container, _text, finish_sr
from dicomnode.report.uids import UidPolicy

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9903
SC_SERIES_NUMBER = 9904
SR_SERIES_DESCRIPTION = "dicomnode knee osteoporosis report"
SC_SERIES_DESCRIPTION = "dicomnode knee class-activation map"
PROCEDURE_REPORTED = codes.DCM.ProjectionXRay  # 113704 DCM
PROBABILITY = codes.DCM.Probability  # 122157 DCM
KNEE_SITE = codes.SCT.Knee  # 72696002 SCT
UNIT_RATIO = codes.UCUM.NoUnits  # 1
KNEE_CLASS = c._private("KNEE-OP-CLASS", "Osteoporosis class from a knee radiograph")
FUSED_CLASS = c._private("FUSED-OP-CLASS", "Osteoporosis class, image and laboratory values fused")
FUSED_PROBABILITY = c._private("FUSED-PROB", "Probability of the fused class")


def class_code(name: str) -> hd.sr.CodedConcept | Any:
    """The SNOMED CT code of a class name (normal / osteopenia / osteoporosis), else a private one."""
    code = c.CATEGORY_VALUES.get(name.lower())
    return code if code is not None else c._private(f"CLASS-{name.upper()[:20]}", name)


@dataclass(frozen=True)
class KneeReport:
    """What the knee outputs say (built by the pipeline from a ``ml.knee.KneePrediction``)."""

    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    algorithm_name: str
    algorithm_version: str
    identification: str
    #: The knee region on the source radiograph: (row0, col0, row1, col1) in source pixels.
    region_rc: tuple[float, float, float, float]
    #: The region as the network saw it ([0, 1], source orientation) and its heat map ([0, 1]).
    display: npt.NDArray[np.float32]
    heatmap: npt.NDArray[np.float32]
    display_spacing_mm: float
    fused_class: str | None = None
    fused_probability: float | None = None
    comments: tuple[str, ...] = field(default_factory=tuple)

    @property
    def class_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def class_name(self) -> str:
        return self.class_names[self.class_index]

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.class_index])

    def headline(self) -> str:
        text = f"{self.class_name} (p = {self.probability:.2f}, image)"
        if self.fused_class is not None and self.fused_probability is not None:
            text += f"; with laboratory values: {self.fused_class} (p = {self.fused_probability:.2f})"
        return text


def _region(report: KneeReport, source: Dataset) -> hd.sr.ImageRegion:
    r0, c0, r1, c1 = report.region_rc
    rows, cols = int(source.Rows), int(source.Columns)
    r0, r1 = max(0.0, r0), min(float(rows), r1)
    c0, c1 = max(0.0, c0), min(float(cols), c1)
    # SCOORD (column, row) pixel coordinates, closed: the first point repeated last
    points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
        ),
    )


def build_knee_sr(
    report: KneeReport, source: Dataset, uids: UidPolicy, previous_versions: Sequence[Dataset] = ()
) -> hd.sr.ComprehensiveSR:
    """The TID 1500 SR of one knee classification, in the radiograph's study (see the module docstring)."""
    evidence = sanitized_source(source)
    algo = hd.sr.AlgorithmIdentification(
        name=report.algorithm_name, version=report.algorithm_version, parameters=[report.identification]
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.uid("tracking-knee"), identifier="knee region"),
        referenced_region=_region(report, evidence),
        finding_type=KNEE_SITE,
        finding_category=c.FINDING_CATEGORY,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=KNEE_SITE)],
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=report.probability, unit=UNIT_RATIO)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(KNEE_CLASS, class_code(report.class_name))],
    )
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(hd.UID.from_uuid("7b0f2b5e-3c1a-4f0e-9d36-6f9c1d0e5a11")),
            name="dicomnode",
            manufacturer_name=MANUFACTURER,
            model_name=report.algorithm_name,
        ),
    )
    measurement_report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
        referenced_images=[evidence],
    )
    derived: list[Any] = []
    for name, p in zip(report.class_names, report.probabilities, strict=True):
        m = hd.sr.Measurement(
            name=c._private(f"PROB-{name.upper()[:20]}", f"Probability of class {name}"),
            value=float(p),
            unit=UNIT_RATIO,
            finding_sites=[hd.sr.FindingSite(anatomic_location=KNEE_SITE)],
        )
        derived.append(m[0])
    if report.fused_probability is not None:
        derived.append(
            hd.sr.Measurement(name=FUSED_PROBABILITY, value=report.fused_probability, unit=UNIT_RATIO)[0]
        )
    qualitative: list[Any] = [
        hd.sr.CodeContentItem(
            name=KNEE_CLASS, value=class_code(report.class_name), relationship_type="CONTAINS"
        )
    ]
    if report.fused_class is not None:
        qualitative.append(
            hd.sr.CodeContentItem(
                name=FUSED_CLASS, value=class_code(report.fused_class), relationship_type="CONTAINS"
            )
        )
    qualitative.append(_text(c.ALGORITHM_NAME, report.algorithm_name))
    qualitative.append(_text(c.ALGORITHM_VERSION, report.algorithm_version))
    qualitative.extend(_text(c.COMMENT, t) for t in dict.fromkeys(report.comments))
    _append_to_root(
        measurement_report,
        [
            _container(c.DERIVED_IMAGING_MEASUREMENTS, derived),
            _container(c.QUALITATIVE_EVALUATIONS, qualitative),
        ],
    )
    return finish_sr(
        hd.sr.ComprehensiveSR,
        [evidence],
        measurement_report,
        uids,
        (SR_SERIES_NUMBER, SR_SERIES_DESCRIPTION),
        previous_versions,
    )


def _heat_rgb(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A blue-cyan-yellow-red colour ramp of values in [0, 1] (RGB in [0, 1])."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.35, 0.7, 1.0])
    colours = np.array([[0.0, 0.0, 0.6], [0.0, 0.8, 0.9], [1.0, 0.9, 0.0], [0.9, 0.0, 0.0]])
    out = np.stack([np.interp(v[..., 0], stops, colours[:, k]) for k in range(3)], axis=-1)
    return out.astype(np.float32)


def render_knee(report: KneeReport, disclaimer: str = DEFAULT_DISCLAIMER) -> RenderedImage:
    """The radiograph's knee region beside its class-activation map, with the result underneath."""
    scale = max(1, int(np.ceil(320 / max(report.display.shape))))
    grey = np.kron(report.display, np.ones((scale, scale), np.float32))
    heat = np.kron(report.heatmap, np.ones((scale, scale), np.float32))
    left = np.repeat(grey[..., None], 3, axis=2)
    alpha = 0.45 * heat[..., None]
    right = (1.0 - alpha) * left + alpha * _heat_rgb(heat)
    gap = np.zeros((grey.shape[0], 8, 3), np.float32)
    panel = np.concatenate([left, gap, right], axis=1)
    text_rows = 70
    canvas = np.zeros((panel.shape[0] + text_rows, panel.shape[1], 3), np.uint8)
    canvas[: panel.shape[0]] = np.clip(panel * 255.0, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    y = panel.shape[0] + 4
    for line, size in (
        (f"Knee radiograph: {report.headline()}", 13),
        (report.identification, 10),
        (disclaimer, 10),
    ):
        draw.text((6, y), line[:110], fill=(255, 255, 255), font=_font(size))
        y += size + 6
    spacing = report.display_spacing_mm / scale
    return RenderedImage(
        name="knee",
        rgb=np.asarray(img, dtype=np.uint8),
        pixel_spacing_mm=(spacing, spacing),
        patient_orientation=("L", "F"),
        description=f"knee region and class-activation map: {report.headline()}",
    )


def build_knee_sc(image: RenderedImage, source: Dataset, uids: UidPolicy, disclaimer: str) -> hd.sc.SCImage:
    """The rendered image as an RGB secondary capture in the radiograph's study."""
    ref = sanitized_source(source)
    orientation = ref.get("PatientOrientation")
    patient_orientation = (
        tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F")
    )
    laterality = str(ref.get("ImageLaterality") or ref.get("Laterality") or "").strip().upper()
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=image.rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.uid("sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.uid("sc-instance-knee"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        pixel_spacing=image.pixel_spacing_mm,  # type: ignore[arg-type]  # highdicom hints int, means mm
        patient_orientation=patient_orientation,
        laterality=laterality if laterality in ("L", "R") else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ConversionType = "WSD"
    sc.BodyPartExamined = "KNEE"
    sc.BurnedInAnnotation = "YES"
    sc.SoftwareVersions = f"dicomnode {__version__}"
    sc.DerivationDescription = f"dicomnode knee class-activation map: {image.description}"[:1024]
    sc.ImageComments = disclaimer[:10240]
    return sc


def write_knee_outputs(
    report: KneeReport,
    source: Dataset,
    out_dir: Path,
    result_json: Path,
    *,
    job_key: str | None = None,
    version: int = 1,
    disclaimer: str = DEFAULT_DISCLAIMER,
    previous_versions: Sequence[Dataset] = (),
) -> OutputFiles:
    """Write ``sr.dcm``, ``sc_00_knee.dcm`` and ``overlay_00_knee.png`` beside an existing ``result.json``."""
    uids = UidPolicy(job_key=job_key, version=version)
    sr = build_knee_sr(report, source, uids, previous_versions)
    sr_path = out_dir / "sr.dcm"
    _atomic_write(sr_path, lambda p: sr.save_as(p, enforce_file_format=True))
    image = render_knee(report, disclaimer)
    png = out_dir / "overlay_00_knee.png"
    _atomic_write(png, lambda p: Image.fromarray(image.rgb).save(p, format="PNG", compress_level=1))
    sc = build_knee_sc(image, source, uids, disclaimer)
    sc_path = out_dir / "sc_00_knee.dcm"
    _atomic_write(sc_path, lambda p: sc.save_as(p, enforce_file_format=True))
    log.info("wrote knee SR %s and SC for series %s", sr.SOPInstanceUID, source.get("SeriesInstanceUID"))
    return OutputFiles(result_json=result_json, sr=sr_path, sc=(sc_path,), png=(png,))
