"""The SR and SC we write pass dciodvfy (no errors) and dsrdump reads the SR (real dicom3tools / dcmtk)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from synthetic_case import make_case

from dicomnode.domain import AnalysisResult, PreviousReport
from dicomnode.imaging.volume import Volume
from dicomnode.report import read_sr_measurements, write_outputs

pytestmark = pytest.mark.integration

#: The one warning we accept: our documented private coding scheme (docs/conformance.md).
ACCEPTED_WARNING = "Unrecognized defined term <99DCMNODE> for value 1 of attribute <Coding Scheme Designator>"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not installed (Debian package {'dicom3tools' if name == 'dciodvfy' else 'dcmtk'})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)
    return path


@dataclass(frozen=True)
class Measured:
    result: AnalysisResult
    canonical: Volume
    roi_masks: Mapping[str, npt.NDArray[np.bool_]] | None


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    case = make_case(shape=(84, 128, 128), spacing=(2.0, 2.0, 3.0))
    out = tmp_path_factory.mktemp("dciodvfy")
    return write_outputs(
        Measured(case.result, case.canonical, case.roi_masks), case.datasets, out, job_key="j"
    )


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dciodvfy for one file."""
    proc = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def test_sr_has_no_dciodvfy_errors(outputs: Any) -> None:
    errors, warnings = dciodvfy_findings(outputs.sr)
    assert errors == []
    unexpected = sorted({w for w in warnings if ACCEPTED_WARNING not in w})
    assert unexpected == [], unexpected
    assert warnings, "the private scheme warning is expected; none seen means dciodvfy did not check codes"


def test_version_2_sr_with_predecessor_has_no_dciodvfy_errors(
    outputs: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A re-opened series' new SR names the first one in (0040,A360), and is still valid."""
    import pydicom

    case = make_case(shape=(84, 128, 128), spacing=(2.0, 2.0, 3.0))
    v2 = write_outputs(
        Measured(case.result, case.canonical, case.roi_masks),
        case.datasets,
        tmp_path_factory.mktemp("dciodvfy-v2"),
        job_key="j",
        version=2,
        previous_reports=[PreviousReport(version=1, sr_path=str(outputs.sr))],
    )
    first = pydicom.dcmread(outputs.sr, stop_before_pixels=True)
    second = pydicom.dcmread(v2.sr, stop_before_pixels=True)
    (study,) = second.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (inst,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, inst.ReferencedSOPInstanceUID) == (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
    )
    errors, warnings = dciodvfy_findings(v2.sr)
    assert errors == []
    unexpected = sorted({w for w in warnings if ACCEPTED_WARNING not in w})
    assert unexpected == [], unexpected


def test_every_sc_is_clean(outputs: Any) -> None:
    assert outputs.sc
    for path in outputs.sc:
        errors, warnings = dciodvfy_findings(path)
        assert errors == [], (path.name, errors)
        assert warnings == [], (path.name, warnings)


def test_dsrdump_reads_the_sr(outputs: Any) -> None:
    proc = subprocess.run([_tool("dsrdump"), str(outputs.sr)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Imaging Measurement Report" in proc.stdout
    assert "L1 vertebra" in proc.stdout and "Attenuation Coefficient" in proc.stdout
    assert proc.stderr.strip() == ""


@pytest.mark.slow
def test_real_phantom_analysis_outputs_are_valid_and_round_trip(tmp_path: Path) -> None:
    """Phantom + real measurement: valid DICOM, and the SR holds the numbers of result.json."""
    phantom = pytest.importorskip("dicomnode.phantom")
    from dicomnode.imaging.writer import write_dicom_series
    from dicomnode.pipeline.analyze import analyze_path

    ph = phantom.make_phantom(
        phantom.PhantomSpec(matrix=256, spacing_mm=1.4, thickness_mm=3.0, z_levels=("T11", "L4"), seed=3)
    )
    write_dicom_series(ph.volume, tmp_path / "ct")
    run = analyze_path(tmp_path / "ct", tmp_path / "out", job_key="phantom-1")
    assert run.error is None, run.result.reason
    assert run.result.status.value == "ok", run.result.reason
    assert run.outputs is not None and run.outputs.sr is not None
    for path in (run.outputs.sr, *run.outputs.sc):
        errors, _ = dciodvfy_findings(path)
        assert errors == [], (path.name, errors)
    got = read_sr_measurements(run.outputs.sr)
    for v in run.result.vertebrae:
        if (
            v.outline is None
        ):  # no region (an excluded level with an empty ROI): named, never a region-less group
            assert v.level not in got and f"{v.level}: no outline" in str(got["summary"]["comments"])
            continue
        assert got[v.level]["hu_mean"] == pytest.approx(v.trabecular_hu_mean, rel=1e-9, abs=1e-9)
        if v.vbmd_mg_cm3 is not None:
            assert got[v.level]["vbmd_mg_cm3"] == pytest.approx(v.vbmd_mg_cm3, rel=1e-9, abs=1e-9)
    s = run.result.summary
    if s is not None and s.vbmd_l1_l2_mg_cm3 is not None:
        assert got["summary"]["vbmd_l1_l2_mg_cm3"] == pytest.approx(s.vbmd_l1_l2_mg_cm3, rel=1e-9, abs=1e-9)
    if s is not None:
        assert got["summary"].get("category") == (s.category.value if s.category is not None else None)
