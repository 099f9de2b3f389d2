"""``dicomnode analyze``: the real console script on good and bad input, and the pipeline behind it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.uid import generate_uid
from synthetic_case import SyntheticCase, make_case

from dicomnode.domain import AnalysisResult, AnalysisStatus
from dicomnode.imaging.volume import Volume
from dicomnode.pipeline.analyze import analyze_path

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _console_script() -> Path:
    script = Path(sys.executable).parent / "dicomnode"
    if not script.exists():
        msg = f"console script {script} not installed (pip install -e .)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return script


def _run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    return subprocess.run(
        [str(_console_script()), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def _negative_inputs() -> list[Path]:
    data = Path(os.environ.get("DICOMNODE_TEST_DATA") or REPO.parent / "shared" / "data")
    edge = data / "edge_and_negative"
    if not edge.is_dir():
        return []
    files = sorted(p for p in edge.rglob("*") if p.is_file())
    return [
        *files,
        edge / "pydicom" / "head_ct_series_16x16",
        data / "totalsegmentator_mr_nifti" / "example_mr_sm.nii.gz",
    ]


NEGATIVE = _negative_inputs()


@pytest.mark.parametrize("path", NEGATIVE, ids=[p.name for p in NEGATIVE] or None)
def test_bad_input_gives_one_clear_line(path: Path, shared_data: Path, tmp_path: Path) -> None:
    assert path.exists()
    proc = _run("analyze", path, "--out", tmp_path / "out")
    assert proc.returncode in (1, 2), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    label = "not qualifying" if proc.returncode == 2 else "failed"
    assert lines[0].startswith(f"dicomnode analyze: {label}: ")
    assert len(lines[0]) > len(f"dicomnode analyze: {label}: ") + 10  # a reason, not just a label
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["status"] == ("not_qualifying" if proc.returncode == 2 else "failed")
    assert doc["reason"] and doc["reason"] in lines[0]
    assert doc["vertebrae"] == []


def test_missing_path_fails_cleanly(tmp_path: Path) -> None:
    proc = _run("analyze", tmp_path / "nope", "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "no such file" in proc.stderr


@pytest.mark.slow
def test_phantom_study_end_to_end(tmp_path: Path) -> None:
    """A phantom study (localizer + soft + bone series): the soft series is chosen and analysed."""
    gen = _run(
        "phantom", "--out", tmp_path / "ph", "--matrix", "256", "--spacing", "1.4", "--thickness", "2",
        "--z-range", "T11:L4", "--study",
    )  # fmt: skip
    if gen.returncode != 0:
        pytest.skip(f"phantom generator unavailable: {gen.stderr.strip()[-200:]}")
    proc = _run("analyze", tmp_path / "ph", "--out", tmp_path / "out", "--job-key", "e2e-1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "L1" in proc.stdout and "mg/cm3" in proc.stdout and "series " in proc.stdout
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["status"] == "ok" and doc["vertebrae"]
    assert any("soft" in s.lower() or "STANDARD" in s for s in doc["series_selection"])
    assert (tmp_path / "out" / "sr.dcm").is_file()
    assert sorted(p.name for p in (tmp_path / "out").glob("sc_*.dcm"))[0] == "sc_00_overview.dcm"


# --- the pipeline in-process, with the measurement injected ----------------------------------------------


@dataclass(frozen=True)
class Measured:
    result: AnalysisResult
    canonical: Volume
    roi_masks: Mapping[str, npt.NDArray[np.bool_]] | None


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return make_case(shape=(84, 128, 128), spacing=(2.0, 2.0, 3.0))


def _write_series(case: SyntheticCase, folder: Path, *, kernel: str | None = None) -> str:
    """Write the case's slices; with ``kernel``, as a second series (new UIDs) with that kernel."""
    folder.mkdir(parents=True)
    series_uid = generate_uid() if kernel else str(case.datasets[0].SeriesInstanceUID)
    for n, ds in enumerate(case.datasets):
        ds = copy.deepcopy(ds)  # pydicom's copy() shares elements: setting a value would change the case
        if kernel:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ConvolutionKernel = kernel
            ds.SeriesDescription = f"Abdomen 3.0 {kernel}"
            ds.SeriesNumber = 3
        ds.save_as(folder / f"{n:03d}.dcm", enforce_file_format=True)
    return series_uid


def test_pipeline_chooses_the_soft_series_and_writes_everything(case: SyntheticCase, tmp_path: Path) -> None:
    _write_series(case, tmp_path / "in" / "soft")
    _write_series(case, tmp_path / "in" / "sharp", kernel="B70f")
    seen: list[str] = []

    def measure(volume: Volume) -> Measured:
        seen.append(str(volume.header.get("ConvolutionKernel")))
        canonical = volume.canonical()
        assert canonical.shape == case.canonical.shape
        return Measured(
            replace(case.result, study_instance_uid="", series_instance_uid=""), canonical, case.roi_masks
        )

    run = analyze_path(tmp_path / "in", tmp_path / "out", measure=measure, job_key="k")
    assert run.error is None and run.exit_code == 0, run.result.reason
    assert seen == ["B30f"]
    assert run.result.series_instance_uid == case.datasets[0].SeriesInstanceUID  # filled in by the pipeline
    assert run.result.study_instance_uid == case.datasets[0].StudyInstanceUID
    assert run.result.series_selection and run.choice is not None and len(run.choice.others) == 1
    assert run.outputs is not None and run.outputs.sr is not None and len(run.outputs.sc) == 8
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["series_selection"] == list(run.result.series_selection)


def test_unexpected_error_is_one_line_and_kept_for_vv(case: SyntheticCase, tmp_path: Path) -> None:
    _write_series(case, tmp_path / "in")

    def boom(volume: Volume) -> Measured:
        raise RuntimeError("boom")

    run = analyze_path(tmp_path / "in", tmp_path / "out", measure=boom)
    assert run.exit_code == 1 and run.result.status is AnalysisStatus.FAILED
    assert run.result.reason == "internal error (RuntimeError: boom)"
    assert isinstance(run.error, RuntimeError)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "failed"


def test_cli_prints_hint_on_unexpected_error(
    case: SyntheticCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode import cli
    from dicomnode.pipeline import analyze as pa

    _write_series(case, tmp_path / "in")

    def boom(volume: Volume) -> Measured:
        raise ValueError("unexpected")

    monkeypatch.setattr(pa, "default_measure", boom)
    rc = cli.main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1] == (
        "dicomnode analyze: failed: internal error (ValueError: unexpected) "
        "(unexpected error; rerun with -vv for the traceback)"
    )


def test_each_file_is_read_once_and_outputs_match_a_reread(
    case: SyntheticCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scan headers are reused for loading and for the SR/SC: no file is parsed twice, and the SR
    references exactly the analysed images, as it did when the headers were read again."""
    from dicomnode.imaging import loader, series
    from dicomnode.pipeline import analyze as pa

    _write_series(case, tmp_path / "in")
    parsed: list[str] = []
    real_read = series.read_dicom

    def counting_read(path: str | os.PathLike[str], header_only: bool = False) -> object:
        parsed.append(os.fspath(path))
        return real_read(path, header_only=header_only)

    monkeypatch.setattr(series, "read_dicom", counting_read)
    monkeypatch.setattr(loader, "read_dicom", counting_read)

    def measure(volume: Volume) -> Measured:
        return Measured(case.result, volume.canonical(), case.roi_masks)

    run = analyze_path(tmp_path / "in", tmp_path / "out", measure=measure, job_key="once")
    assert run.exit_code == 0 and run.outputs is not None and run.outputs.sr is not None
    assert len(parsed) == len(case.datasets) == len(set(parsed))  # the scan's single read of each file
    # the SR's evidence is the analysed series, every image of it
    import pydicom

    sr = pydicom.dcmread(run.outputs.sr)
    refs = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for ser in study.ReferencedSeriesSequence
        for item in ser.ReferencedSOPSequence
    }
    assert refs == {str(ds.SOPInstanceUID) for ds in case.datasets}
    # the headers reused from the scan are the ones a fresh read gives (for the SR/SC modules)
    [chosen] = loader.scan(tmp_path / "in").series
    volume = loader.load_series(chosen)
    reused = pa.source_datasets(volume, chosen)
    fresh = [real_read(p, header_only=True) for p in volume.source]
    for a, b in zip(reused, fresh, strict=True):
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.PatientID == b.PatientID
        assert a.StudyInstanceUID == b.StudyInstanceUID and a.SOPClassUID == b.SOPClassUID


def test_command_exit_is_immediate_only_for_the_command_process() -> None:
    """In-process callers (tests, workers) get the exit status back; only the ``dicomnode`` process ends
    itself without the interpreter teardown (the subprocess tests above check its exit status)."""
    from dicomnode.cli import analyze as cli_analyze

    assert cli_analyze._is_command_process() is False


def test_analyze_path_imports_no_ml_or_plotting_stack(case: SyntheticCase, tmp_path: Path) -> None:
    """The classical analysis path stays light: no torch, MONAI, scikit-learn or matplotlib imports
    (they cost seconds at start-up and are only for model bundles and evaluation plots)."""
    _write_series(case, tmp_path / "in")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dicomnode.pipeline.analyze import analyze_path\n"
        f"run = analyze_path(Path({str(tmp_path / 'in')!r}), Path({str(tmp_path / 'out')!r}))\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(top & {'torch', 'monai', 'sklearn', 'matplotlib'})\n"
        "print(run.result.status.value, ','.join(heavy) or 'none')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, heavy = proc.stdout.split()[-2:]
    assert status in ("ok", "not_qualifying", "failed")  # the engine ran (whatever it made of the case)
    assert heavy == "none"
