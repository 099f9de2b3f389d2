"""Knee radiographs through the node's own steps (issue 12, item 1): received, completed, routed by the
shipped rules to the knee-xray pipeline, analysed by the real analysis step; without a knee bundle the job
ends NOT_QUALIFYING with "no model configured", and a chest radiograph of the same study is not analysed,
with the reason in its routing decision. No torch: nothing is classified here."""

from __future__ import annotations

from pathlib import Path

import pydicom
from web_testing import complete_and_route, ingest, make_runner, make_settings, make_store

from dicomnode.domain import JobState
from dicomnode.ml.knee_synthetic import make_knee, write_dx
from dicomnode.pipeline.rules_in_force import RulesInForce


def test_knee_radiograph_without_a_bundle_is_received_and_says_no_model(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store = make_store(settings)
    case = make_knee(5, spacing_mm=1.6)
    knee = write_dx(case, tmp_path / "in" / "knee.dcm")
    study = str(pydicom.dcmread(knee, stop_before_pixels=True).StudyInstanceUID)
    chest = write_dx(
        case, tmp_path / "in" / "chest.dcm", study_uid=study, body_part="CHEST", series_description="CHEST PA"
    )
    assert ingest(settings, store, [knee, chest]) == 2
    rules = RulesInForce(store, settings)
    runner = make_runner(settings, store, rules.select)
    (job_id,) = complete_and_route(runner)
    job = store.get_job(job_id)
    assert job.pipeline == "knee-xray"
    decisions = {d.decision.series_instance_uid: d.decision for d in store.decisions(study)}
    chest_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).SeriesInstanceUID)
    assert not decisions[chest_uid].selected
    assert any("FAIL (CHEST)" in r for r in decisions[chest_uid].reasons)
    assert runner.run_next_job("test-worker") == job_id
    job = store.get_job(job_id)
    assert job.state is JobState.NOT_QUALIFYING
    assert (job.message or "").startswith("no model configured")
    assert store.instances(job.series_instance_uid)  # the radiograph is kept
