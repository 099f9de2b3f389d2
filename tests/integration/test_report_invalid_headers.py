"""Tolerant decode, strict encode through the real ``dicomnode analyze`` (issue 9 item 8, issue 10).

A phantom CT series whose headers carry the invalid values real PACS and de-identification tools send (a
UUID as PatientBirthDate, malformed DA / TM / AS / CS, an over-long name, letters in a DS) is analysed by the
console script: the analysis succeeds, ``result.json`` reports the patient values as missing, the SR and
every SC pass ``dciodvfy`` without errors and carry none of the invalid values, and the overlays are one
series (the ad-hoc path has no job key, hence random UIDs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:(Invalid value|The PN component|The value length):UserWarning"),
]

BAD = {
    "PatientBirthDate": str(uuid.UUID(int=0x5EED)),
    "PatientAge": "sixty",
    "PatientSex": "female",
    "PatientName": "A" * 70 + "^B",
    "StudyTime": "12:3x",
    "SeriesDate": "2024-13-45",
}
#: dciodvfy warns that an emptied StudyTime is needed to build a DICOMDIR: a warning, not an error.
ACCEPTED = ("99DCMNODE", "needed to build DICOMDIR")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} not installed -- required under CI")
        pytest.skip(f"{name} not installed (apt-get install dicom3tools dcmtk)")
    return path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicomnode.imaging.writer import write_dicom_series
    from dicomnode.phantom import PhantomSpec, make_phantom

    tmp = tmp_path_factory.mktemp("badheaders")
    ph = make_phantom(
        PhantomSpec(matrix=160, spacing_mm=2.0, thickness_mm=2.5, z_levels=("T11", "L5"), seed=5)
    )
    write_dicom_series(ph.volume, tmp / "ct")
    for f in sorted((tmp / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for kw, value in BAD.items():
            setattr(ds, kw, value)  # pydicom warns and keeps the value, as a careless writer does
        # letters in a DS: stored as LO with implicit VR, read back as DS "heavy"
        ds.add_new(0x00101030, "LO", "heavy")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    script = Path(sys.executable).parent / "dicomnode"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    proc = subprocess.run(
        [str(script), "analyze", str(tmp / "ct"), "--out", str(tmp / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return tmp / "out"


def test_analysis_succeeds_and_reports_invalid_patient_values_as_missing(analysed: Path) -> None:
    doc = json.loads((analysed / "result.json").read_text())
    assert doc["status"] == "ok", doc["reason"]
    assert doc["patient"] == {"age_years": None, "sex": None}


def test_outputs_pass_dciodvfy_and_carry_no_invalid_value(analysed: Path) -> None:
    files = [analysed / "sr.dcm", *sorted(analysed.glob("sc_*.dcm"))]
    assert len(files) > 2
    for path in files:
        proc = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        assert [ln for ln in lines if ln.startswith("Error")] == [], path.name
        assert [ln for ln in lines if ln.startswith("Warning") and not any(a in ln for a in ACCEPTED)] == []
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in (*BAD, "PatientWeight"):
            assert str(ds.get(kw, "") or "") == "", (path.name, kw)
        assert ds.PatientID  # valid values are still copied: the outputs land in the patient's study


def test_dsrdump_reads_the_sr(analysed: Path) -> None:
    proc = subprocess.run([_tool("dsrdump"), str(analysed / "sr.dcm")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == ""
    assert "Imaging Measurement Report" in proc.stdout and "Derived Imaging Measurements" in proc.stdout


def test_adhoc_analyze_writes_one_overlay_series(analysed: Path) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(analysed.glob("sc_*.dcm"))]
    assert len(headers) > 1
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert sorted(int(h.InstanceNumber) for h in headers) == list(range(1, len(headers) + 1))
