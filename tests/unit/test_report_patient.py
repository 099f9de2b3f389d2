"""Tolerant decode, strict encode (issue 9 item 8): invalid source values are missing when read and never
written into an SR or SC."""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian

from dicomnode.imaging.headers import element_is_valid, header_dict, patient_age_years
from dicomnode.report.patient import sanitized_source

# building the bad values below makes pydicom warn; that is the point of these tests
pytestmark = pytest.mark.filterwarnings(
    "ignore:(Invalid value|The PN component|The value length):UserWarning"
)


@pytest.mark.parametrize(
    ("vr", "value", "valid"),
    [
        ("DA", "20240229", True),
        ("DA", "20230229", False),  # no 29 February in 2023
        ("DA", str(uuid.UUID(int=7)), False),
        ("DA", "2024-01-02", False),
        ("DA", "", True),
        ("TM", "1230", True),
        ("TM", "123045.5", True),
        ("TM", "12:30", False),
        ("TM", "2561", False),
        ("DT", "20240102123045+0100", True),
        ("DT", "2024130", False),
        ("AS", "065Y", True),
        ("AS", "sixty", False),
        ("AS", "65Y", False),
        ("CS", "F", True),
        ("CS", "female", False),
        ("PN", "DOE^JANE", True),
        ("PN", "A" * 80 + "^B", False),
        ("DS", "1.5", True),
        ("LO", "x" * 65, False),
    ],
)
def test_element_validity(vr: str, value: str, valid: bool) -> None:
    assert element_is_valid(DataElement(0x00100030, vr, value)) is valid


def _bad_header() -> Dataset:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "P1"
    ds.PatientBirthDate = str(uuid.UUID(int=12345))
    ds.PatientSex = "female"
    ds.PatientAge = "sixty"
    ds.StudyDate = "20240102"
    ds.StudyTime = "12:3x"
    ds.SeriesDate = "not a date"
    ds.StudyInstanceUID = "1.2.3"
    ds.BodyPartExamined = "abdomen, pelvis"
    ds.ImagePositionPatient = [0.0, 0.0, 1.5]
    return ds


def test_header_reading_counts_invalid_dates_times_and_ages_as_missing() -> None:
    ds = _bad_header()
    d = header_dict(ds)
    assert "PatientAge" not in d and "StudyTime" not in d and "SeriesDate" not in d
    assert d["StudyDate"] == "20240102"
    assert d["BodyPartExamined"] == "abdomen, pelvis"  # a code string is kept for tolerant routing
    assert "PatientAgeYears" not in d
    assert patient_age_years(ds) is None


def test_sanitized_copy_empties_only_the_invalid_values_and_leaves_the_source_alone() -> None:
    ds = _bad_header()
    clean = sanitized_source(ds)
    for kw in ("PatientBirthDate", "PatientSex", "PatientAge", "StudyTime", "SeriesDate", "BodyPartExamined"):
        assert kw in clean and clean[kw].value in (None, ""), kw
    assert clean.PatientName == "DOE^JANE" and clean.PatientID == "P1" and clean.StudyDate == "20240102"
    assert [float(v) for v in clean.ImagePositionPatient] == [0.0, 0.0, 1.5]
    assert ds.PatientBirthDate == str(uuid.UUID(int=12345)) and ds.PatientSex == "female"


def test_a_value_pydicom_cannot_convert_is_emptied_and_reads_as_missing(tmp_path: Path) -> None:
    """Letters in a DS (WindowCenter) as stored by some PACS: converting it raises inside pydicom."""
    ds = _bad_header()
    ds.add_new(0x00281050, "LO", "one")  # written with implicit VR: read back as DS "one"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert "WindowCenter" not in header_dict(back)
    clean = sanitized_source(back)
    assert clean[0x00281050].value in (None, "") and clean.PatientID == "P1"


def test_uids_are_copied_as_received_even_when_a_strict_reader_refuses_them() -> None:
    """A leading-zero UID component (seen from real PACS): the outputs must still land in that study."""
    ds = _bad_header()
    ds.StudyInstanceUID = "1.2.03.4"
    assert not element_is_valid(ds["StudyInstanceUID"])
    assert sanitized_source(ds).StudyInstanceUID == "1.2.03.4"
