"""TID 1500 Comprehensive 3D SR of one analysis, in the source study.

Content tree (codes in ``dicomnode.report.codes``, conformance in ``docs/conformance.md``)::

    Imaging Measurement Report (126000 DCM)
      observer: device dicomnode;  procedure reported: CT unspecified body region (25045-6 LN)
      Imaging Measurements
        per vertebra (T11-L5 as found): TID 1410 planar ROI group (or TID 1501 when no outline)
          tracking identifier "<level> trabecular ROI" + tracking UID
          finding category Anatomical structure, finding type Vertebral body, finding site <level> vertebra
          SCOORD closed POLYLINE on the mid-vertebral source image
          Attenuation Coefficient [hnsf'U]: Mean, Median, Standard Deviation;  Volume mm3
          vBMD (99DCMNODE VBMD-TRAB) mg/cm3, method = calibration method
          qualitative: level uncertain, excluded (+ coded reason), fracture suspected, QC flags
        exam level: TID 1501 group "vBMD summary"
          vBMD Mean over the levels used (finding sites = those levels);  L1 attenuation
          category (Normal / Osteopenia / Osteoporosis, SNOMED CT);  contrast phase
          kVp;  calibration reference attenuations (air, fat, muscle, blood);  calibration slope/intercept

A later version of the same series' analysis (late instances) names the SRs of the earlier versions in its
Predecessor Documents Sequence (0040,A360): see :func:`predecessor_references`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode import __version__
from dicomnode.domain import AnalysisResult, PreviousReport, Summary, VertebraResult
from dicomnode.errors import InputError
from dicomnode.report import codes as c
from dicomnode.report.uids import UidPolicy

log = logging.getLogger(__name__)

MANUFACTURER = "dicomnode"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "dicomnode BMD report"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _yes_no(flag: bool) -> Code:
    code: Code = c.YES if flag else c.NO
    return code


def _vertebra_group(
    v: VertebraResult,
    algo: hd.sr.AlgorithmIdentification,
    uids: UidPolicy,
    by_sop: dict[str, Dataset],
    calibration_method: Code | None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations:
    site_code = c.VERTEBRA_SITES.get(v.level)
    sites = [hd.sr.FindingSite(anatomic_location=site_code)] if site_code is not None else []
    tracking = hd.sr.TrackingIdentifier(
        uid=uids.uid(f"tracking-{v.level}"), identifier=f"{v.level} trabecular ROI"
    )
    measurements: list[hd.sr.Measurement] = []
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
    if v.vbmd_mg_cm3 is not None and math.isfinite(v.vbmd_mg_cm3):
        measurements.append(
            hd.sr.Measurement(
                name=c.VBMD, value=float(v.vbmd_mg_cm3), unit=c.UNIT_MG_CM3, method=calibration_method
            )
        )
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

    outline = v.outline
    source = by_sop.get(outline.sop_instance_uid) if outline and outline.sop_instance_uid else None
    if outline is not None and source is not None and len(outline.points_cr) >= 3:
        import numpy as np  # local: only this branch needs the array

        points = np.asarray(outline.points_cr, dtype=np.float64)
        if not np.allclose(points[0], points[-1]):
            points = np.vstack([points, points[:1]])  # SCOORD closed POLYLINE: first point == last
        frames = [outline.frame_number] if outline.frame_number is not None else None
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                referenced_frame_numbers=frames,
            ),
        )
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
    # no outline on a source image (NIfTI, reformat): same content without the region
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=c.VERTEBRAL_BODY,
        finding_category=c.FINDING_CATEGORY,
        algorithm_id=algo,
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _summary_group(
    s: Summary, algo: hd.sr.AlgorithmIdentification, uids: UidPolicy, calibration_method: Code | None
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
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
    if _finite(cal.kvp) and cal.kvp is not None:
        measurements.append(hd.sr.Measurement(name=c.KVP, value=float(cal.kvp), unit=c.UNIT_KV))
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
    evaluations = [
        hd.sr.QualitativeEvaluation(
            c.CONTRAST_PHASE, c.CONTRAST_PHASE_VALUES.get(s.contrast_phase.value, c.UNKNOWN)
        )
    ]
    if s.category is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(c.BMD_CATEGORY, c.CATEGORY_VALUES[s.category.value]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.uid("tracking-summary"), identifier="vBMD summary"
        ),
        finding_category=c.FINDING_CATEGORY,
        finding_type=c.LUMBAR_SPINE,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=c.LUMBAR_SPINE)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def build_sr(
    result: AnalysisResult,
    source_datasets: Sequence[Dataset],
    uids: UidPolicy,
    *,
    series_number: int = SR_SERIES_NUMBER,
    institution_name: str | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 SR of ``result``, with the source CT images as evidence.

    Parameters
    ----------
    result
        An analysis with status ok and at least one vertebra.
    source_datasets
        The analysed series' datasets (headers suffice; pixel data is not read). Patient and study
        modules are copied from them, so the SR lands in the source study.
    uids
        UID policy (deterministic per job, or random).
    series_number, institution_name
        Written as given.
    previous_versions
        The SRs this one replaces (earlier versions of the same analysis), each a dataset with at least
        Study, Series and SOP Instance UID and SOP Class UID (:func:`predecessor_references`); they go into
        the Predecessor Documents Sequence. Empty for a first version.

    Raises
    ------
    InputError
        When there is nothing to report or no source image to reference.
    """
    if not source_datasets:
        raise InputError("no source DICOM images: an SR needs the analysed CT as evidence")
    if not result.vertebrae:
        raise InputError("no vertebra in the result: nothing to report in an SR")
    by_sop = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
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
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        _vertebra_group(v, algo, uids, by_sop, method)
        for v in result.vertebrae
        if v.level in c.VERTEBRA_SITES
    ]
    if result.summary is not None:
        groups.append(_summary_group(result.summary, algo, uids, method))
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(hd.UID.from_uuid("7b0f2b5e-3c1a-4f0e-9d36-6f9c1d0e5a11")),
            name="dicomnode",
            manufacturer_name=MANUFACTURER,
            model_name=result.algorithm_name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c.PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(source_datasets),
        content=report,
        series_instance_uid=uids.uid("sr-series"),
        series_number=series_number,
        sop_instance_uid=uids.uid("sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,  # PRELIMINARY: research output, needs a physician's review
        is_verified=False,
        previous_versions=list(previous_versions) or None,
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
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
    the SOP class Comprehensive 3D SR and the source study. Without a job key (random UIDs) a missing file
    cannot be rebuilt and is left out (logged).

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
            ref.SOPClassUID = Comprehensive3DSRStorage
            ref.SOPInstanceUID = old.uid("sr-instance")
        uid = str(ref.SOPInstanceUID)
        if uid == own or uid in seen:
            continue
        seen.add(uid)
        refs.append(ref)
    return refs
