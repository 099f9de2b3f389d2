"""Header summaries: plain values, routing keywords, age, z extent; and the light-import rule."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydicom.dataset import Dataset

from dicomnode.imaging.headers import header_dict, patient_age_years, summarize, z_extent_mm


def header(z: float, **extra: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.ConvolutionKernel = "B30f"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.Rows = 512
    ds.Columns = 512
    ds.SeriesNumber = "3"
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "12345"
    ds.ContrastBolusAgent = ""
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def test_summarize_plain_values_and_extent() -> None:
    s = summarize([header(z) for z in (10.0, -20.0, 0.0)])
    assert s.series_instance_uid == "1.2.3.4" and s.study_instance_uid == "1.2.3"
    assert s.n_instances == 3
    assert s.z_extent_mm == pytest.approx(30.0)
    assert s.get("ImageType") == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert s.get("SliceThickness") == 1.25 and isinstance(s.get("SliceThickness"), float)
    assert s.get("KVP") == 120.0 and s.get("SeriesNumber") == 3
    assert s.get("PixelSpacing") == (0.7, 0.7)
    assert s.get("ContrastBolusAgent") is None  # empty means unknown
    # no names or IDs in the routing summary
    assert "PatientName" not in s.attributes and "PatientID" not in s.attributes


def test_summarize_overrides_blank_series_uid() -> None:
    s = summarize([header(0.0, SeriesInstanceUID="")], series_instance_uid="2.25.1")
    assert s.series_instance_uid == "2.25.1"
    assert s.get("SeriesInstanceUIDSynthesized") is True


@pytest.mark.parametrize(
    ("extra", "years"),
    [
        ({"PatientAge": "058Y"}, 58.0),
        ({"PatientAge": "006M"}, 0.5),
        ({"PatientBirthDate": "19600615", "StudyDate": "20200615"}, 60.0),
        ({"PatientBirthDate": "", "StudyDate": "20200615"}, None),
        ({}, None),
    ],
)
def test_patient_age(extra: dict[str, str], years: float | None) -> None:
    ds = header(0.0, **extra)
    age = patient_age_years(ds)
    assert age == (pytest.approx(years, abs=0.01) if years is not None else None)
    d = header_dict(ds)
    assert "PatientBirthDate" not in d
    assert d.get("PatientAgeYears") == age


def test_enhanced_functional_group_values_found() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    pm = Dataset()
    pm.PixelSpacing = [0.5, 0.5]
    pm.SliceThickness = 2.0
    xr = Dataset()
    xr.KVP = 100
    shared = Dataset()
    shared.PixelMeasuresSequence = [pm]
    shared.CTXRayDetailsSequence = [xr]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in (0.0, 5.0, 10.0):
        pp = Dataset()
        pp.ImagePositionPatient = [0, 0, z]
        po = Dataset()
        po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        f = Dataset()
        f.PlanePositionSequence = [pp]
        f.PlaneOrientationSequence = [po]
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = frames
    d = header_dict(ds)
    assert d["PixelSpacing"] == (0.5, 0.5) and d["SliceThickness"] == 2.0 and d["KVP"] == 100.0
    assert z_extent_mm([ds]) == pytest.approx(10.0)


def test_headers_module_imports_only_pydicom_and_stdlib() -> None:
    # numpy is not checked: pydicom itself imports it
    code = (
        "import sys; import dicomnode.imaging.headers, dicomnode.imaging.series; "
        "bad = [m for m in ('torch', 'monai', 'highdicom', 'nibabel', 'scipy') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
