"""Acceptance: a study sent with storescu to the reference PACS comes back analysed, over DIMSE both ways.

storescu -> Orthanc -> (auto-route, stable CT series) -> node C-STORE SCP -> completion -> routing picks the
3 mm soft series -> analysis -> SR + SC C-STOREd back to Orthanc into the same study (QIDO-RS finds them);
the SR's evidence names the soft series and the SR passes dciodvfy.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from e2e_support import (
    DCMTK_STORESCU,
    PhantomStudy,
    Stack,
    node_outputs,
    open_store,
    require_tools,
    retrieve,
    storescu_into_orthanc,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_storescu_to_orthanc_to_node_and_back(
    tmp_path: Path, stack: Stack, phantom_study: PhantomStudy
) -> None:
    require_tools("Orthanc", DCMTK_STORESCU, "dciodvfy")
    stack.up(NODE_DESTINATION="dimse")
    storescu_into_orthanc(stack, phantom_study.folder, phantom_study.study_uid, len(phantom_study.all_files))

    def outputs() -> dict[str, list[str]] | None:
        out = node_outputs(stack, phantom_study.study_uid)
        return out if out["SR"] and len(out["OT"]) >= 1 else None

    out = wait_for("the node's SR and SC in Orthanc", outputs, timeout=180, interval=1.0)
    assert len(out["SR"]) == 1
    sr_path = retrieve(stack, phantom_study.study_uid, out["SR"][0], tmp_path / "sr.dcm")
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == phantom_study.study_uid
    evidence = {
        s.SeriesInstanceUID
        for e in sr.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
    }
    # The 3 mm soft-kernel series is the one to measure; never the localizer or the bone-kernel series.
    assert evidence == {phantom_study.series["soft"]}
    check = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
    # Only the CT image series went to the node: its own results are never routed back to it, even once they
    # are stable in Orthanc (StableAge 3 s in the local stack).
    time.sleep(5)
    log = (stack.state / "logs" / "orthanc.log").read_text(errors="replace")
    assert log.count("autoroute: sending CT series") == 3
    store = open_store(stack.state / "node-data")
    try:
        received = {s.series_instance_uid for s in store.list_series(study_uid=phantom_study.study_uid).items}
        (job,) = store.list_jobs(study_uid=phantom_study.study_uid).items
        result = store.get_result(job.id)
    finally:
        store.close()
    assert received == set(phantom_study.series.values())
    # Every secondary capture the job wrote is in the study too, once.
    assert result is not None
    sc_files = [Path(f) for f in result.files if Path(f).name.startswith("sc_")]
    assert sc_files
    assert sorted(node_outputs(stack, phantom_study.study_uid)["OT"]) == sorted(
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sc_files
    )
