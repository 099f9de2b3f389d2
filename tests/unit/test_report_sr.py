"""TID 1500 SR, SC and write_outputs: content, source study, UIDs, and the read-back round trip."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from synthetic_case import SyntheticCase, make_case

from dicomnode.domain import AnalysisResult, AnalysisStatus, PreviousReport
from dicomnode.errors import InputError
from dicomnode.imaging.volume import Volume
from dicomnode.report import UidPolicy, read_sr_measurements, write_outputs
from dicomnode.report.render import render_overview
from dicomnode.report.sc import build_sc
from dicomnode.report.sr import build_sr, predecessor_references


def _approx(value: float | None) -> object:
    """The SR stores numbers as DS (16 characters): equal up to the last printed digit."""
    return pytest.approx(value, rel=1e-9, abs=1e-9)


@dataclass(frozen=True)
class Measured:
    result: AnalysisResult
    canonical: Volume
    roi_masks: Mapping[str, npt.NDArray[np.bool_]] | None


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return make_case(shape=(84, 128, 128), spacing=(2.0, 2.0, 3.0))


@pytest.fixture(scope="module")
def written(case: SyntheticCase, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("report")
    return write_outputs(
        Measured(case.result, case.canonical, case.roi_masks), case.datasets, out, job_key="job-7"
    )


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def test_round_trip_numbers_equal_the_result(case: SyntheticCase, written: Any) -> None:
    got = read_sr_measurements(written.sr)
    for v in case.result.vertebrae:
        m = got[v.level]
        assert m["hu_mean"] == _approx(v.trabecular_hu_mean)
        assert m["hu_median"] == _approx(v.trabecular_hu_median)
        assert m["hu_sd"] == _approx(v.trabecular_hu_sd)
        assert m["roi_volume_mm3"] == _approx(v.roi_volume_mm3)
        assert m["vbmd_mg_cm3"] == _approx(v.vbmd_mg_cm3)
        assert m["level_uncertain"] == ("Yes" if v.level_uncertain else "No")
        assert m["excluded"] == ("Yes" if v.excluded else "No")
    assert got["L3"]["fracture_suspected"] == "Yes" and got["L3"]["exclusion_reason"] == "Fracture suspected"
    s = case.result.summary
    assert s is not None and s.category is not None
    summary = got["summary"]
    assert summary["vbmd_l1_l2_mg_cm3"] == _approx(s.vbmd_l1_l2_mg_cm3)
    assert summary["l1_hu"] == _approx(s.l1_hu)
    assert summary["category"] == s.category.value
    assert summary["contrast_phase"] == s.contrast_phase.value
    assert summary["kvp"] == pytest.approx(s.calibration.kvp)
    assert summary["calibration_slope"] == pytest.approx(s.calibration.slope_mg_cm3_per_hu)
    for tissue, hu in s.calibration.reference_hu.items():
        assert summary[f"ref_hu_{tissue}"] == pytest.approx(hu)


def test_sr_lives_in_the_source_study(case: SyntheticCase, written: Any) -> None:
    sr = pydicom.dcmread(written.sr)
    src = case.datasets[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: only 2D SCOORD inside
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.PatientID == src.PatientID and sr.PatientName == src.PatientName
    assert sr.AccessionNumber == src.AccessionNumber
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.Modality == "SR" and sr.SeriesDescription == "dicomnode BMD report"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(d.SOPInstanceUID) for d in case.datasets}


def test_roi_is_a_closed_polyline_on_the_mid_vertebral_image(case: SyntheticCase, written: Any) -> None:
    sr = pydicom.dcmread(written.sr)
    scoords = [ds for ds in _walk(sr) if getattr(ds, "ValueType", "") == "SCOORD"]
    assert len(scoords) == len(case.result.vertebrae)
    by_sop = {v.outline.sop_instance_uid: v for v in case.result.vertebrae if v.outline is not None}
    for item in scoords:
        assert item.GraphicType == "POLYLINE"
        pts = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
        assert np.allclose(pts[0], pts[-1])
        ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        v = by_sop[ref]
        assert v.outline is not None
        assert np.allclose(pts, np.asarray(v.outline.points_cr), atol=1e-3)


def test_no_dxa_t_score_codes(written: Any) -> None:
    sr = pydicom.dcmread(written.sr)
    values = {getattr(ds, "CodeValue", None) for ds in _walk(sr)}
    meanings = " ".join(str(getattr(ds, "CodeMeaning", "")) for ds in _walk(sr)).lower()
    assert not values & {"38267-1", "104938-6", "85394-5", "24966-4"}
    assert "t-score" not in meanings


def test_uids_follow_the_job(case: SyntheticCase) -> None:
    a = build_sr(case.result, case.datasets, UidPolicy("job-1", 1))
    b = build_sr(case.result, case.datasets, UidPolicy("job-1", 1))
    c = build_sr(case.result, case.datasets, UidPolicy("job-1", 2))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID
    d = build_sr(case.result, case.datasets, UidPolicy())
    assert d.SOPInstanceUID != a.SOPInstanceUID


def _predecessors(sr: Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of every item of the Predecessor Documents Sequence."""
    return [
        (
            str(study.StudyInstanceUID),
            str(series.SeriesInstanceUID),
            str(inst.ReferencedSOPClassUID),
            str(inst.ReferencedSOPInstanceUID),
        )
        for study in (sr[0x0040, 0xA360].value if (0x0040, 0xA360) in sr else [])
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    ]


def _identity(ds: Dataset) -> tuple[str, str, str, str]:
    return (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def test_version_2_sr_names_the_version_1_sr_as_predecessor(case: SyntheticCase, tmp_path: Path) -> None:
    measured = Measured(case.result, case.canonical, case.roi_masks)
    v1 = write_outputs(measured, case.datasets, tmp_path / "v1", job_key="series/bmd", version=1)
    assert v1.sr is not None
    first = pydicom.dcmread(v1.sr)
    assert "PredecessorDocumentsSequence" not in first  # a first version replaces nothing
    v2 = write_outputs(
        measured,
        case.datasets,
        tmp_path / "v2",
        job_key="series/bmd",
        version=2,
        previous_reports=[PreviousReport(version=1, sr_path=str(v1.sr))],
    )
    assert v2.sr is not None
    second = pydicom.dcmread(v2.sr)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID != first.SeriesInstanceUID
    # (0040,A360) names the version-1 SR by study, series, SOP class and SOP instance.
    assert _predecessors(second) == [_identity(first)]


def test_predecessor_of_a_removed_sr_file_is_rebuilt_from_its_uids(
    case: SyntheticCase, tmp_path: Path
) -> None:
    measured = Measured(case.result, case.canonical, case.roi_masks)
    v1 = write_outputs(measured, case.datasets, tmp_path / "v1", job_key="series/bmd", version=1)
    assert v1.sr is not None
    first = _identity(pydicom.dcmread(v1.sr, stop_before_pixels=True))
    v1.sr.unlink()  # removed by retention before the late instance arrived
    (tmp_path / "junk.dcm").write_bytes(b"not DICOM")  # an unreadable file is not trusted either
    for path in (str(v1.sr), str(tmp_path / "junk.dcm"), None):
        refs = predecessor_references(
            [PreviousReport(1, path)], UidPolicy("series/bmd", 2), str(case.datasets[0].StudyInstanceUID)
        )
        assert [_identity(r) for r in refs] == [first]


def test_predecessor_references_skip_the_own_sr_and_unknown_random_uids(case: SyntheticCase) -> None:
    study = str(case.datasets[0].StudyInstanceUID)
    uids = UidPolicy("series/bmd", 3)
    refs = predecessor_references(
        [PreviousReport(1), PreviousReport(2), PreviousReport(2), PreviousReport(3)], uids, study
    )
    # Newest first, each once, never the new version's own SR.
    assert [str(r.SOPInstanceUID) for r in refs] == [
        UidPolicy("series/bmd", 2).uid("sr-instance"),
        UidPolicy("series/bmd", 1).uid("sr-instance"),
    ]
    sr = build_sr(case.result, case.datasets, uids, previous_versions=refs)
    assert {p[3] for p in _predecessors(sr)} == {str(r.SOPInstanceUID) for r in refs}
    # Random UIDs cannot be rebuilt: a missing file is left out rather than invented.
    assert predecessor_references([PreviousReport(1)], UidPolicy(), study) == []


def _container(sr: Dataset, code: str) -> Dataset:
    (found,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == code]
    return found


def test_vertebra_without_outline_is_named_but_kept_out_of_the_measurement_groups(
    case: SyntheticCase,
) -> None:
    """A group without an image region in 126010 crashes OHIF's SR loader: such a vertebra is only named."""
    verts = tuple(
        dataclasses.replace(v, outline=None) if v.level == "L2" else v for v in case.result.vertebrae
    )
    result = dataclasses.replace(case.result, vertebrae=verts)
    sr = build_sr(result, case.datasets, UidPolicy())
    scoords = [ds for ds in _walk(sr) if getattr(ds, "ValueType", "") == "SCOORD"]
    assert len(scoords) == len(verts) - 1
    groups = _container(sr, "126010").ContentSequence
    idents = [str(i.TextValue) for g in groups for i in g.ContentSequence if i.get("ValueType") == "TEXT"]
    assert "L2 trabecular ROI" not in idents and "L1 trabecular ROI" in idents
    comments = [str(i.TextValue) for i in _container(sr, "C0034375").ContentSequence if i.ValueType == "TEXT"]
    assert any(c.startswith("L2:") for c in comments)


def test_outline_only_in_patient_space_gives_a_3d_region_and_comprehensive_3d_sr(case: SyntheticCase) -> None:
    from dicomnode.domain import RoiOutline

    def lps_only(v: Any) -> Any:
        pts = ((0.0, 0.0, -100.0), (10.0, 0.0, -100.0), (10.0, 10.0, -100.0), (0.0, 0.0, -100.0))
        return dataclasses.replace(v, outline=RoiOutline(None, None, (), pts))

    verts = tuple(lps_only(v) if v.level == "L3" else v for v in case.result.vertebrae)
    sr = build_sr(dataclasses.replace(case.result, vertebrae=verts), case.datasets, UidPolicy())
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    (s3,) = [ds for ds in _walk(sr) if getattr(ds, "ValueType", "") == "SCOORD3D"]
    assert s3.ReferencedFrameOfReferenceUID == case.datasets[0].FrameOfReferenceUID
    assert len([ds for ds in _walk(sr) if getattr(ds, "ValueType", "") == "SCOORD"]) == len(verts) - 1


def test_viewer_layout_every_group_has_a_region_and_vbmd_comes_first(
    case: SyntheticCase, written: Any
) -> None:
    """What OHIF needs (issue 10): regions on every 126010 group, vBMD the first value, exam level outside."""
    sr = pydicom.dcmread(written.sr)
    root_codes = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    # TID 1500 order: image library, imaging measurements, derived, qualitative evaluations
    assert root_codes[-4:] == ["111028", "126010", "126011", "C0034375"]
    groups = _container(sr, "126010").ContentSequence
    assert len(groups) == len(case.result.vertebrae)
    for g in groups:
        assert g.ConceptNameCodeSequence[0].CodeValue == "125007"  # Measurement Group
        assert [i.ValueType for i in g.ContentSequence].count("SCOORD") == 1
        nums = [i for i in g.ContentSequence if i.ValueType == "NUM"]
        assert nums[0].ConceptNameCodeSequence[0].CodeValue == "VBMD-TRAB"
    idents = [str(i.TextValue) for g in groups for i in g.ContentSequence if i.get("ValueType") == "TEXT"]
    assert "vBMD summary" not in idents
    derived = _container(sr, "126011").ContentSequence
    assert {i.ValueType for i in derived} == {"NUM"}
    assert derived[0].ConceptNameCodeSequence[0].CodeValue == "VBMD-TRAB"
    qualitative = {
        i.ConceptNameCodeSequence[0].CodeValue: i for i in _container(sr, "C0034375").ContentSequence
    }
    s = case.result.summary
    assert s is not None and s.category is not None
    assert (
        qualitative["BMD-CATEGORY"].ConceptCodeSequence[0].CodeValue
        == ({"normal": "17621005", "osteopenia": "312894000", "osteoporosis": "64859006"}[s.category.value])
    )
    assert str(qualitative["111001"].TextValue) == case.result.algorithm_name


def test_withheld_category_is_absent_and_the_reason_is_given(case: SyntheticCase, tmp_path: Path) -> None:
    s = case.result.summary
    assert s is not None
    withheld = dataclasses.replace(s, category=None, notes=("naming uncertain: no category",))
    sr = build_sr(dataclasses.replace(case.result, summary=withheld), case.datasets, UidPolicy())
    items = _container(sr, "C0034375").ContentSequence
    assert "BMD-CATEGORY" not in {i.ConceptNameCodeSequence[0].CodeValue for i in items}
    texts = [str(i.get("TextValue", "")) for i in items]
    assert any("naming uncertain" in t for t in texts) and any("No bone density category" in t for t in texts)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert "category" not in read_sr_measurements(tmp_path / "sr.dcm")["summary"]


def test_adhoc_outputs_are_one_overlay_series_in_order(case: SyntheticCase, tmp_path: Path) -> None:
    """``dicomnode analyze`` has no job key (random UIDs): still one SC series, instances 1..n in order."""
    out = write_outputs(Measured(case.result, case.canonical, case.roi_masks), case.datasets, tmp_path)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.sc]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert {int(h.SeriesNumber) for h in headers} == {9902}
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, len(headers) + 1))
    assert headers[0].DerivationDescription.endswith(out.sc[0].stem.split("_")[-1]) or "overview" in (
        headers[0].DerivationDescription.lower()
    )


def test_build_sr_refuses_without_evidence(case: SyntheticCase) -> None:
    with pytest.raises(InputError):
        build_sr(case.result, [], UidPolicy())


def test_sc_is_rgb_in_the_source_study(case: SyntheticCase) -> None:
    image = render_overview(case.result, case.canonical, case.roi_masks)
    sc = build_sc(image, case.datasets[10], UidPolicy("job-1", 1), 1, disclaimer="NOT FOR DIAGNOSTIC USE")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.Modality == "OT" and sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert (sc.Rows, sc.Columns) == image.rgb.shape[:2]
    assert sc.StudyInstanceUID == case.datasets[10].StudyInstanceUID
    assert sc.PatientID == case.datasets[10].PatientID
    assert sc.BodyPartExamined and sc.SeriesDescription == "dicomnode BMD overlay"
    assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert np.array_equal(sc.pixel_array, image.rgb)


def test_write_outputs_files_and_result_json(case: SyntheticCase, written: Any) -> None:
    assert written.sr is not None and written.sr.name == "sr.dcm"
    assert written.sc[0].name == "sc_00_overview.dcm"
    assert len(written.sc) == 1 + len(case.result.vertebrae) == len(written.png)
    doc = json.loads(written.result_json.read_text())
    assert doc == json.loads(json.dumps(case.result.to_json_dict()))
    for key in ("status", "reason", "study_instance_uid", "series_instance_uid", "vertebrae", "summary"):
        assert key in doc
    assert set(doc["summary"]) >= {
        "l1_hu",
        "vbmd_l1_l2_mg_cm3",
        "category",
        "levels_used",
        "contrast_phase",
        "calibration",
    }
    sc_uids = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in written.sc}
    assert len(sc_uids) == 1  # one overlay series


def test_nifti_input_gives_json_and_png_only(case: SyntheticCase, tmp_path: Path) -> None:
    out = write_outputs(Measured(case.result, case.canonical, case.roi_masks), [], tmp_path)
    assert out.sr is None and out.sc == () and len(out.png) == 1 + len(case.result.vertebrae)
    assert out.result_json.is_file() and any("NIfTI" in n for n in out.notes)


def test_not_ok_result_gives_json_only(case: SyntheticCase, tmp_path: Path) -> None:
    failed = AnalysisResult(AnalysisStatus.NOT_QUALIFYING, "lumbar spine not in view", "1.2.3", "1.2.3.4")
    out = write_outputs(Measured(failed, case.canonical, None), case.datasets, tmp_path)
    assert out.sr is None and out.sc == () and out.png == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    doc = json.loads(out.result_json.read_text())
    assert doc["status"] == "not_qualifying" and doc["reason"] == "lumbar spine not in view"


def test_rerun_into_the_same_folder_leaves_one_analysis(case: SyntheticCase, tmp_path: Path) -> None:
    full = write_outputs(Measured(case.result, case.canonical, case.roi_masks), case.datasets, tmp_path)
    (tmp_path / "notes.txt").write_text("not ours")
    fewer = dataclasses.replace(case.result, vertebrae=case.result.vertebrae[:3])
    again = write_outputs(Measured(fewer, case.canonical, case.roi_masks), case.datasets, tmp_path)
    assert len(again.sc) == 4 < len(full.sc)
    assert sorted(tmp_path.glob("sc_*.dcm")) == sorted(again.sc)
    assert sorted(tmp_path.glob("overlay_*.png")) == sorted(again.png)
    failed = AnalysisResult(AnalysisStatus.FAILED, "boom", "", "")
    write_outputs(Measured(failed, case.canonical, None), case.datasets, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "result.json"]


def test_multiframe_source_references_the_frame(case: SyntheticCase, shared_data: Path) -> None:
    from dicomnode.domain import RoiOutline

    enhanced = pydicom.dcmread(
        shared_data / "edge_and_negative" / "pydicom-data" / "eCT_Supplemental.dcm", stop_before_pixels=True
    )
    square = ((10.5, 10.5), (20.5, 10.5), (20.5, 20.5), (10.5, 10.5))
    outline = RoiOutline(str(enhanced.SOPInstanceUID), 2, square)
    verts = tuple(dataclasses.replace(v, outline=outline) for v in case.result.vertebrae[:2])
    sr = build_sr(dataclasses.replace(case.result, vertebrae=verts), [enhanced], UidPolicy())
    refs = [
        ds.ReferencedSOPSequence[0]
        for ds in _walk(sr)
        if getattr(ds, "ValueType", "") == "IMAGE" and "ReferencedSOPSequence" in ds
    ]
    assert len(refs) == 2
    assert all(r.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID for r in refs)
    assert all(int(r.ReferencedFrameNumber) == 2 for r in refs)
    assert sr.StudyInstanceUID == enhanced.StudyInstanceUID
