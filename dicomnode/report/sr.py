"""TID 1500 SR of one analysis, in the source study, laid out so that viewers display it.

Content tree (codes in ``dicomnode.report.codes``, conformance and viewer notes in ``docs/conformance.md``)::

    Imaging Measurement Report (126000 DCM)                                      TID 1500
      observer: device dicomnode;  procedure reported: CT unspecified body region (25045-6 LN)
      Image Library: the analysed CT images                                        TID 1600
      Imaging Measurements (126010 DCM)
        per vertebra (T11-L5 as found), each WITH its image region:               TID 1410
          tracking identifier "<level> trabecular ROI" + tracking UID
          finding category Anatomical structure, finding type Vertebral body, algorithm (TID 4019)
          finding site <level> vertebra
          Image Region: SCOORD closed POLYLINE on the mid-vertebral source image
                        (SCOORD3D in the frame of reference when no source image holds the outline)
          vBMD (99DCMNODE VBMD-TRAB) mg/cm3, method = calibration method           TID 300, first
          Attenuation Coefficient [hnsf'U]: Mean, Median, Standard Deviation;  Volume mm3
          qualitative: level uncertain, excluded (+ coded reason), fracture suspected, QC flags
      Derived Imaging Measurements (126011 DCM)                                    TID 300 items
        vBMD Mean over the levels used (finding sites = those levels);  L1 attenuation Mean
        calibration reference attenuations (air, fat, muscle, blood);  kVp;  slope;  intercept;
        contrast correction
      Qualitative Evaluations (C0034375 UMLS)
        CODE category (Normal / Osteopenia / Osteoporosis, SNOMED CT; absent when withheld)
        CODE fused class (99DCMNODE FUSED-OP-CLASS), with a fusion bundle and the patient's lab values
        CODE contrast phase;  TEXT algorithm name / version;  TEXT comments (notes, withheld reasons,
        the lab values the fused class used with their dates, or why the image result stands alone)
      (Derived Imaging Measurements also carries the fused class's probability, 99DCMNODE FUSED-PROB.)

Why this layout (issue 10): OHIF (and other viewers) read every measurement group of 126010 as an
annotation and take its first SCOORD without a guard, so a group without an image region there crashes the
viewer. Exam-level results therefore live in the two other containers TID 1500 defines for them, and a
vertebra without any outline (never for a DICOM source in practice) is named in a comment instead of being
put into 126010. Viewers show the first few NUMs of a group only: the headline value (vBMD) comes first.

SOP class by content: Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) when every region is a 2D SCOORD
(the usual case; widely accepted by PACS and in dcmtk's default presentation contexts), Comprehensive 3D SR
(.88.34) only when a region had to be written as SCOORD3D.

A later version of the same series' analysis (late instances) names the SRs of the earlier versions in its
Predecessor Documents Sequence (0040,A360): see :func:`predecessor_references`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code
from pydicom.uid import ComprehensiveSRStorage

from dicomnode import __version__
from dicomnode.domain import AnalysisResult, PreviousReport, Summary, VertebraResult
from dicomnode.errors import InputError
from dicomnode.report import codes as c
from dicomnode.report.patient import sanitized_source
from dicomnode.report.uids import UidPolicy

log = logging.getLogger(__name__)

MANUFACTURER = "dicomnode"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "dicomnode BMD report"

Region = hd.sr.ImageRegion | hd.sr.ImageRegion3D
SRDocument = hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR


@dataclass(frozen=True)
class FusedEstimate:
    """The CT image result fused with the patient's laboratory values (founding study a), or why not.

    Built by ``dicomnode.pipeline.fusion``; ``fused_class`` None means the image result stands alone and
    ``note`` says why (no bundle for CT scores, no lab values, the bundle declined).
    """

    #: The sentence the SR carries: the lab values used with their dates, or why none were.
    note: str
    #: Fused probability of osteoporosis, its class and that class's probability (None: not fused).
    probability_osteoporosis: float | None = None
    fused_class: str | None = None
    class_probability: float | None = None
    #: The lab values used ("name value unit (date)").
    labs_used: tuple[str, ...] = ()
    #: The fusion bundle (name, version, checksum), what its image score is and the score fed to it.
    bundle: str | None = None
    image_input: str | None = None
    image_score: float | None = None


@dataclass(frozen=True)
class FusedResult(AnalysisResult):
    """A CT analysis result with its fusion with laboratory values (``result.json`` key ``fusion``)."""

    fusion: FusedEstimate | None = None


def _fusion_of(result: AnalysisResult) -> FusedEstimate | None:
    fusion = getattr(result, "fusion", None)
    return fusion if isinstance(fusion, FusedEstimate) else None


def _fusion_codes() -> Any:
    # one definition of the fused codes, shared with the knee SR (imported here: report.knee imports us)
    from dicomnode.report import knee

    return knee


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _yes_no(flag: bool) -> Code:
    code: Code = c.YES if flag else c.NO
    return code


def _region(v: VertebraResult, by_sop: dict[str, Dataset], frame_of_reference: str | None) -> Region | None:
    """The vertebra's image region: 2D on its source image, else 3D in the frame of reference, else None."""
    outline = v.outline
    if outline is None:
        return None
    source = by_sop.get(outline.sop_instance_uid) if outline.sop_instance_uid else None
    if source is not None and len(outline.points_cr) >= 3:
        points = np.asarray(outline.points_cr, dtype=np.float64)
        if not np.allclose(points[0], points[-1]):
            points = np.vstack([points, points[:1]])  # SCOORD closed POLYLINE: first point == last
        frames = [outline.frame_number] if outline.frame_number is not None else None
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                referenced_frame_numbers=frames,
            ),
        )
    if frame_of_reference and len(outline.points_lps_mm) >= 3:
        pts3 = np.asarray(outline.points_lps_mm, dtype=np.float64)
        if not np.allclose(pts3[0], pts3[-1]):
            pts3 = np.vstack([pts3, pts3[:1]])
        return hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
            graphic_data=pts3,
            frame_of_reference_uid=frame_of_reference,
        )
    return None


def _vertebra_group(
    v: VertebraResult,
    algo: hd.sr.AlgorithmIdentification,
    uids: UidPolicy,
    region: Region,
    calibration_method: Code | None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    site_code = c.VERTEBRA_SITES.get(v.level)
    sites = [hd.sr.FindingSite(anatomic_location=site_code)] if site_code is not None else []
    tracking = hd.sr.TrackingIdentifier(
        uid=uids.uid(f"tracking-{v.level}"), identifier=f"{v.level} trabecular ROI"
    )
    measurements: list[hd.sr.Measurement] = []
    # the headline value first: viewers list only the first few measurements of a group
    if _finite(v.vbmd_mg_cm3) and v.vbmd_mg_cm3 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=c.VBMD, value=float(v.vbmd_mg_cm3), unit=c.UNIT_MG_CM3, method=calibration_method
            )
        )
    for derivation, value in (
        (c.MEAN, v.trabecular_hu_mean),
        (c.MEDIAN, v.trabecular_hu_median),
        (c.STANDARD_DEVIATION, v.trabecular_hu_sd),
    ):
        if _finite(value):
            measurements.append(
                hd.sr.Measurement(
                    name=c.ATTENUATION_COEFFICIENT, value=float(value), unit=c.UNIT_HU, derivation=derivation
                )
            )
    if _finite(v.roi_volume_mm3) and v.roi_volume_mm3 > 0:
        measurements.append(hd.sr.Measurement(name=c.VOLUME, value=float(v.roi_volume_mm3), unit=c.UNIT_MM3))
    fracture = any("fracture" in q.lower() for q in v.qc) or "fracture" in (v.exclusion_reason or "").lower()
    evaluations = [
        hd.sr.QualitativeEvaluation(c.LEVEL_UNCERTAIN, _yes_no(v.level_uncertain)),
        hd.sr.QualitativeEvaluation(c.EXCLUDED, _yes_no(v.excluded)),
        hd.sr.QualitativeEvaluation(c.FRACTURE_SUSPECTED, _yes_no(fracture)),
    ]
    if v.excluded:
        evaluations.append(
            hd.sr.QualitativeEvaluation(c.EXCLUSION_REASON, c.exclusion_reason_code(v.exclusion_reason))
        )
    evaluations.extend(hd.sr.QualitativeEvaluation(c.QC_FLAG, c.qc_flag_code(q)) for q in v.qc)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=c.VERTEBRAL_BODY,
        finding_category=c.FINDING_CATEGORY,
        algorithm_id=algo,
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _summary_measurements(s: Summary, calibration_method: Code | None) -> list[hd.sr.Measurement]:
    """The exam-level numbers (TID 300 each), for the Derived Imaging Measurements container."""
    measurements: list[hd.sr.Measurement] = []
    used_sites = [
        hd.sr.FindingSite(anatomic_location=c.VERTEBRA_SITES[lv])
        for lv in s.levels_used
        if lv in c.VERTEBRA_SITES
    ]
    if _finite(s.vbmd_l1_l2_mg_cm3) and s.vbmd_l1_l2_mg_cm3 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=c.VBMD,
                value=float(s.vbmd_l1_l2_mg_cm3),
                unit=c.UNIT_MG_CM3,
                derivation=c.MEAN,
                finding_sites=used_sites or None,
                method=calibration_method,
            )
        )
    if _finite(s.l1_hu) and s.l1_hu is not None:
        measurements.append(
            hd.sr.Measurement(
                name=c.ATTENUATION_COEFFICIENT,
                value=float(s.l1_hu),
                unit=c.UNIT_HU,
                derivation=c.MEAN,
                finding_sites=[hd.sr.FindingSite(anatomic_location=c.VERTEBRA_SITES["L1"])],
            )
        )
    cal = s.calibration
    for tissue, hu in sorted(cal.reference_hu.items()):
        site = c.REFERENCE_TISSUE_SITES.get(tissue)
        if site is None or not _finite(hu):
            continue
        measurements.append(
            hd.sr.Measurement(
                name=c.ATTENUATION_COEFFICIENT,
                value=float(hu),
                unit=c.UNIT_HU,
                derivation=c.MEAN,
                finding_sites=[hd.sr.FindingSite(anatomic_location=site)],
            )
        )
    if _finite(cal.kvp) and cal.kvp is not None:
        measurements.append(hd.sr.Measurement(name=c.KVP, value=float(cal.kvp), unit=c.UNIT_KV))
    if _finite(cal.slope_mg_cm3_per_hu) and cal.slope_mg_cm3_per_hu is not None:
        measurements.append(
            hd.sr.Measurement(
                name=c.CALIBRATION_SLOPE, value=float(cal.slope_mg_cm3_per_hu), unit=c.UNIT_MG_CM3_PER_HU
            )
        )
    if _finite(cal.intercept_mg_cm3) and cal.intercept_mg_cm3 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=c.CALIBRATION_INTERCEPT, value=float(cal.intercept_mg_cm3), unit=c.UNIT_MG_CM3
            )
        )
    if _finite(cal.contrast_correction_hu):
        measurements.append(
            hd.sr.Measurement(
                name=c.CONTRAST_CORRECTION, value=float(cal.contrast_correction_hu), unit=c.UNIT_HU
            )
        )
    return measurements


def _container(name: Code, items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(list(items))
    return container


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    """A TEXT item (UT, at most 2^32-2 characters; we keep lines short anyway)."""
    return hd.sr.TextContentItem(
        name=name, value=" ".join(value.split())[:1024] or "-", relationship_type="CONTAINS"
    )


def _qualitative_items(
    result: AnalysisResult, without_region: Sequence[str]
) -> list[hd.sr.CodeContentItem | hd.sr.TextContentItem]:
    """Exam-level coded results and comments, for the Qualitative Evaluations container."""
    items: list[hd.sr.CodeContentItem | hd.sr.TextContentItem] = []
    s = result.summary
    fusion = _fusion_of(result)
    if s is not None:
        if s.category is not None:
            items.append(
                hd.sr.CodeContentItem(
                    name=c.BMD_CATEGORY,
                    value=c.CATEGORY_VALUES[s.category.value],
                    relationship_type="CONTAINS",
                )
            )
        if fusion is not None and fusion.fused_class is not None:  # beside the image's category
            k = _fusion_codes()
            items.append(
                hd.sr.CodeContentItem(
                    name=k.FUSED_CLASS, value=k.class_code(fusion.fused_class), relationship_type="CONTAINS"
                )
            )
        items.append(
            hd.sr.CodeContentItem(
                name=c.CONTRAST_PHASE,
                value=c.CONTRAST_PHASE_VALUES.get(s.contrast_phase.value, c.UNKNOWN),
                relationship_type="CONTAINS",
            )
        )
    items.append(_text(c.ALGORITHM_NAME, result.algorithm_name))
    items.append(_text(c.ALGORITHM_VERSION, result.algorithm_version))
    comments: list[str] = []
    if s is not None:
        comments.extend(str(n) for n in s.notes)
        if s.category is None:
            comments.append("No bone density category given" + (": see the notes above" if s.notes else ""))
    comments.extend(f"{lv}: no outline on an image; its values are in result.json" for lv in without_region)
    if fusion is not None:
        comments.append(fusion.note)
    items.extend(_text(c.COMMENT, text) for text in dict.fromkeys(comments))
    return items


def _append_to_root(report: hd.sr.MeasurementReport, items: Sequence[Dataset]) -> None:
    """Add containers to the report's root container (highdicom builds rows 1-6 of TID 1500 only)."""
    root = report[0]
    root.ContentSequence.extend(items)


def build_sr(
    result: AnalysisResult,
    source_datasets: Sequence[Dataset],
    uids: UidPolicy,
    *,
    series_number: int = SR_SERIES_NUMBER,
    institution_name: str | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> SRDocument:
    """Build the TID 1500 SR of ``result``, with the source CT images as evidence.

    Parameters
    ----------
    result
        An analysis with status ok and at least one vertebra.
    source_datasets
        The analysed series' datasets (headers suffice; pixel data is not read). Patient and study
        modules are copied from them (invalid values dropped: ``report.patient``), so the SR lands in the
        source study.
    uids
        UID policy (deterministic per job, or random).
    series_number, institution_name
        Written as given.
    previous_versions
        The SRs this one replaces (earlier versions of the same analysis), each a dataset with at least
        Study, Series and SOP Instance UID and SOP Class UID (:func:`predecessor_references`); they go into
        the Predecessor Documents Sequence. Empty for a first version.

    Returns
    -------
    highdicom.sr.ComprehensiveSR or highdicom.sr.Comprehensive3DSR
        Comprehensive SR when every image region is 2D (the usual case), Comprehensive 3D SR otherwise.

    Raises
    ------
    InputError
        When there is nothing to report or no source image to reference.
    """
    if not source_datasets:
        raise InputError("no source DICOM images: an SR needs the analysed CT as evidence")
    if not result.vertebrae:
        raise InputError("no vertebra in the result: nothing to report in an SR")
    evidence = [sanitized_source(ds) for ds in source_datasets]
    by_sop = {str(ds.SOPInstanceUID): ds for ds in evidence}
    frame_of_reference = next(
        (str(ds.FrameOfReferenceUID) for ds in evidence if str(ds.get("FrameOfReferenceUID", "") or "")), None
    )
    # Name and version say what produced the numbers (engine, plus any model bundle); the parameters list
    # each part with its own version and checksum (segmentation, vBMD estimator, agreement in "both" mode).
    algo = hd.sr.AlgorithmIdentification(
        name=result.algorithm_name,
        version=result.algorithm_version,
        parameters=[" ".join(p.split())[:1024] for p in result.algorithm_components] or None,
    )
    method = None
    if result.summary is not None and result.summary.calibration.method:
        method = c.calibration_method_code(result.summary.calibration.method)
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    without_region: list[str] = []
    region_sops: list[str] = []
    uses_3d = False
    for v in result.vertebrae:
        if v.level not in c.VERTEBRA_SITES:
            continue
        region = _region(v, by_sop, frame_of_reference)
        if region is None:
            # an excluded level with an empty ROI has no outline by nature; otherwise it is worth a warning
            log.log(
                logging.INFO if v.excluded else logging.WARNING,
                "vertebra %s has no outline on an image: named in a comment, not in the SR's measurements",
                v.level,
            )
            without_region.append(v.level)
            continue
        uses_3d = uses_3d or isinstance(region, hd.sr.ImageRegion3D)
        if isinstance(region, hd.sr.ImageRegion) and v.outline is not None and v.outline.sop_instance_uid:
            region_sops.append(v.outline.sop_instance_uid)
        groups.append(_vertebra_group(v, algo, uids, region, method))
    if not groups:
        raise InputError("no vertebra has an outline on an image: an SR would show no region")
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(hd.UID.from_uuid("7b0f2b5e-3c1a-4f0e-9d36-6f9c1d0e5a11")),
            name="dicomnode",
            manufacturer_name=MANUFACTURER,
            model_name=result.algorithm_name,
        ),
    )
    # TID 1600 Image Library (mandatory in TID 1500): the images the regions are drawn on
    library = [by_sop[uid] for uid in dict.fromkeys(region_sops) if uid in by_sop]
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=c.PROCEDURE_REPORTED,
            imaging_measurements=groups,
            referenced_images=library or None,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        # highdicom describes library entries from top-level attributes; an enhanced multi-frame CT keeps
        # them in functional groups. The regions still reference the image; only the library is left out.
        log.info("image library left out of the SR (%s)", exc)
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=c.PROCEDURE_REPORTED,
            imaging_measurements=groups,
        )
    extra: list[Dataset] = []
    if result.summary is not None:
        derived = _summary_measurements(result.summary, method)
        fusion = _fusion_of(result)
        if fusion is not None and fusion.class_probability is not None:
            k = _fusion_codes()
            derived.append(
                hd.sr.Measurement(name=k.FUSED_PROBABILITY, value=fusion.class_probability, unit=k.UNIT_RATIO)
            )
        if derived:
            extra.append(
                _container(c.DERIVED_IMAGING_MEASUREMENTS, [cast(hd.sr.ContentItem, m[0]) for m in derived])
            )
    extra.append(_container(c.QUALITATIVE_EVALUATIONS, _qualitative_items(result, without_region)))
    _append_to_root(report, extra)
    series = (series_number, SR_SERIES_DESCRIPTION)
    if uses_3d:
        return finish_sr(
            hd.sr.Comprehensive3DSR, evidence, report, uids, series, previous_versions, institution_name
        )
    return finish_sr(
        hd.sr.ComprehensiveSR, evidence, report, uids, series, previous_versions, institution_name
    )


_SR = TypeVar("_SR", hd.sr.ComprehensiveSR, hd.sr.Comprehensive3DSR)


def finish_sr(
    sr_class: type[_SR],
    evidence: Sequence[Dataset],
    content: Any,
    uids: UidPolicy,
    series: tuple[int, str],
    previous_versions: Sequence[Dataset] = (),
    institution_name: str | None = None,
) -> _SR:
    """The SR object of a report (CT and knee alike): its series (number, description), UIDs from the job's
    policy, PRELIMINARY and unverified (research output that needs a physician's review), the versions it
    replaces, and our software version."""
    sr = sr_class(
        evidence=list(evidence),
        content=content,
        series_instance_uid=uids.uid("sr-series"),
        series_number=series[0],
        sop_instance_uid=uids.uid("sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,  # PRELIMINARY: research output, needs a physician's review
        is_verified=False,
        previous_versions=list(previous_versions) or None,
    )
    sr.SeriesDescription = series[1]
    sr.SoftwareVersions = f"dicomnode {__version__}"
    return sr


#: The attributes a Predecessor Documents Sequence item is made of.
_REFERENCE_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _read_reference(path: Path) -> Dataset | None:
    """The identifying attributes of an SR file we wrote, or None when it is gone or not such an SR."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_REFERENCE_TAGS))
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        log.debug("previous SR %s not readable (%s): reference rebuilt from its UIDs", path.name, exc)
        return None
    if not all(str(ds.get(k, "") or "").strip() for k in _REFERENCE_TAGS):
        return None
    if not str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88."):  # SR storage classes
        return None
    ref = Dataset()
    for k in _REFERENCE_TAGS:
        setattr(ref, k, str(ds.get(k)).strip())
    return ref


def predecessor_references(
    previous: Sequence[PreviousReport], uids: UidPolicy, study_instance_uid: str
) -> list[Dataset]:
    """Datasets naming the SRs of earlier versions, for :func:`build_sr`'s ``previous_versions``.

    Each earlier SR is identified from its file when that is still there (the file is the truth: it holds the
    UIDs actually sent). When it is gone (removed by retention) the reference is rebuilt from the UID policy:
    the SR of version ``v`` has the series and instance UIDs of ``(job key, v, "sr-series" / "sr-instance")``,
    the SOP class Comprehensive SR (what a report with 2D regions is written as) and the source study.
    Without a job key (random UIDs) a missing file cannot be rebuilt and is left out (logged).

    Parameters
    ----------
    previous
        The earlier versions (``dicomnode.domain.PreviousReport``), in any order.
    uids
        The UID policy of the new version (same job key; its version is not used here).
    study_instance_uid
        The study the SRs live in (the source study).

    Returns
    -------
    list of pydicom.dataset.Dataset
        One per earlier SR, never the new version's own SR, each SOP instance once.
    """
    own = uids.uid("sr-instance") if uids.deterministic else None
    refs: list[Dataset] = []
    seen: set[str] = set()
    for p in sorted(previous, key=lambda r: r.version, reverse=True):
        ref = _read_reference(Path(p.sr_path)) if p.sr_path else None
        if ref is None:
            if not uids.deterministic:
                log.warning("SR of version %d is gone and its UIDs were random: not referenced", p.version)
                continue
            old = UidPolicy(job_key=uids.job_key, version=p.version, prefix=uids.prefix)
            ref = Dataset()
            ref.StudyInstanceUID = study_instance_uid
            ref.SeriesInstanceUID = old.uid("sr-series")
            ref.SOPClassUID = ComprehensiveSRStorage
            ref.SOPInstanceUID = old.uid("sr-instance")
        uid = str(ref.SOPInstanceUID)
        if uid == own or uid in seen:
            continue
        seen.add(uid)
        refs.append(ref)
    return refs
