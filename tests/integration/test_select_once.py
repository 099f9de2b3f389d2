"""Select once: the routing decision, made by the rules in force, is the analysis step's input.

Issue 11 acceptance: a site rule that selects a series the shipped default would refuse (6 mm slices) leads to
an analysed job, not NOT_QUALIFYING; the same through the CLI with ``--rules``. Before, the worker re-ran the
shipped default rules on the job's folder and answered NOT_QUALIFYING for a series the site had selected.

The measurement is replaced by the synthetic case's hand-made result (what is checked is which series reaches
it and with which reasons); reading, loading, routing, the store, the runner and the report are the real ones.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from synthetic_case import SyntheticCase, make_case
from web_testing import complete_and_route, ingest, make_settings, make_store

from dicomnode import routing
from dicomnode.cli import main
from dicomnode.delivery import DeliveryResult
from dicomnode.domain import AnalysisResult, DeliveryOutcome, JobState
from dicomnode.imaging.volume import Volume
from dicomnode.pipeline import analyze as pa
from dicomnode.pipeline.executors import analyze_job
from dicomnode.pipeline.rules_in_force import RulesInForce
from dicomnode.pipeline.runner import Runner

pytestmark = pytest.mark.integration

SITE_RULE = "site-abdominal-ct-thick"


@dataclass(frozen=True)
class Measured:
    result: AnalysisResult
    canonical: Volume
    roi_masks: Mapping[str, npt.NDArray[np.bool_]] | None


@pytest.fixture(scope="module")
def thick_case() -> SyntheticCase:
    """A CT series of 6 mm slices: the shipped rules refuse it (slices of at most 5 mm)."""
    return make_case(shape=(40, 128, 128), spacing=(2.0, 2.0, 6.0))


@pytest.fixture
def thick_series(thick_case: SyntheticCase, tmp_path: Path) -> list[Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for n, ds in enumerate(thick_case.datasets):
        ds = copy.deepcopy(ds)
        ds.save_as(folder / f"{n:03d}.dcm", enforce_file_format=True)
        paths.append(folder / f"{n:03d}.dcm")
    return paths


@pytest.fixture
def measured_here(thick_case: SyntheticCase, monkeypatch: pytest.MonkeyPatch) -> list[Volume]:
    """The measurement of the case replaced by its hand-made result; returns the volumes it was given."""
    seen: list[Volume] = []

    def measure(volume: Volume) -> Measured:
        seen.append(volume)
        result = replace(thick_case.result, study_instance_uid="", series_instance_uid="")
        return Measured(result, volume.canonical(), thick_case.roi_masks)

    monkeypatch.setattr(pa, "default_measure", measure)
    return seen


def site_rules_text() -> str:
    """The shipped rules with a site's slice-thickness limit of 8 mm, under a site rule name."""
    text = routing.default_rules_text()
    assert "{attribute: derived.slice_mm, range: {max: 5}}" in text
    text = text.replace(
        "{attribute: derived.slice_mm, range: {max: 5}}", "{attribute: SliceThickness, range: {max: 8}}"
    )
    return text.replace("name: abdominal-ct-bmd", f"name: {SITE_RULE}")


def _ok_sender(destination: Any, files: Any, *, calling_ae_title: str) -> DeliveryResult:
    return DeliveryResult(destination.name, DeliveryOutcome.SUCCESS, "stored")


def test_a_site_rule_selection_is_analysed_by_the_node(
    thick_series: list[Path], measured_here: list[Volume], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "data")
    store = make_store(settings)
    assert ingest(settings, store, thick_series) == len(thick_series)
    (summary,) = store.series_summaries(store.list_studies(limit=1).items[0].study_instance_uid)
    # the shipped default refuses the series: its decision names the slice thickness
    (default,) = routing.select([summary], routing.default_rules())
    assert not default.selected and any("derived.slice_mm <= 5: FAIL (6.0)" in r for r in default.reasons)

    store.add_rule_version("admin", site_rules_text(), "6 mm slices are fine here")
    rules = RulesInForce(store, settings)  # the one provider (cli/node.py hands it to runner and web)
    runner = Runner(settings, store, analyze=analyze_job, select=rules.select, deliver=_ok_sender)
    (job_id,) = complete_and_route(runner)
    assert runner.run_next_job("w1") == job_id
    job = store.get_job(job_id)
    assert job.state not in (JobState.NOT_QUALIFYING, JobState.FAILED), job.message
    assert job.state is JobState.DONE  # analysed, reported and delivered
    assert len(measured_here) == 1 and measured_here[0].shape[0] == len(thick_series)  # the series measured
    result = store.get_result(job_id)
    assert result is not None
    doc = json.loads(next(Path(f) for f in result.files if Path(f).name == "result.json").read_text())
    assert doc["status"] == "ok"
    # the analysis carries the reasons of the routing decision that chose the series, not new ones
    assert any(SITE_RULE in line for line in doc["series_selection"]), doc["series_selection"]


def test_the_cli_uses_a_site_rules_file(
    thick_series: list[Path], measured_here: list[Volume], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = thick_series[0].parent
    assert main(["analyze", str(folder), "--out", str(tmp_path / "default")]) == 2
    err = capsys.readouterr().err
    assert "not qualifying" in err and "derived.slice_mm <= 5: FAIL" in err and not measured_here
    rules = tmp_path / "site-rules.yaml"
    rules.write_text(site_rules_text())
    assert main(["analyze", str(folder), "--out", str(tmp_path / "site"), "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert SITE_RULE in out and len(measured_here) == 1
    doc = json.loads((tmp_path / "site" / "result.json").read_text())
    assert doc["status"] == "ok" and any(SITE_RULE in line for line in doc["series_selection"])


def test_the_cli_refuses_invalid_rules_in_one_line(
    thick_series: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text(site_rules_text().replace("SliceThickness, range", "SliceThicknes, range"))
    assert (
        main(["analyze", str(thick_series[0].parent), "--out", str(tmp_path / "o"), "--rules", str(rules)])
        == 2
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "SliceThicknes" in err[0] and "Traceback" not in err[0]
