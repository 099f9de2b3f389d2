"""Acceptance: the same round trip over DICOMweb both ways (STOW-RS into the node, STOW-RS out to Orthanc);
then a late instance re-opens the series and a new version of the result follows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from e2e_support import (
    NodeProcess,
    PhantomStudy,
    Stack,
    free_port,
    node_outputs,
    open_store,
    retrieve,
    running,
    stow_to_node,
    wait_for,
    write_node_config,
)

from dicomnode.domain import DeliveryOutcome, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_stow_into_node_and_stow_out_to_orthanc(
    tmp_path: Path, stack: Stack, phantom_study: PhantomStudy
) -> None:
    stack.up(NODE_START="0")
    data = tmp_path / "node-data"
    http = free_port()
    cfg = write_node_config(
        tmp_path / "node.yaml",
        data_dir=data,
        dicom_port=free_port(),
        http_port=http,
        destinations=[{"kind": "dicomweb", "name": "pacs-web", "url": stack.dicomweb}],
    )
    # The destination answers the DICOMweb probe of ``dicomnode echo``.
    probe = subprocess.run(
        [sys.executable, "-m", "dicomnode", "echo", "pacs-web", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and "OK" in probe.stdout, probe.stdout + probe.stderr
    node = NodeProcess("serve", cfg, tmp_path / "node.log", http).start()
    with running(node):
        # The last soft slice is held back: it arrives after the analysis, as a late instance.
        late = phantom_study.files["soft"][-1]
        stow_to_node(http, [f for f in phantom_study.all_files if f != late])
        out = wait_for(
            "the node's SR in Orthanc",
            lambda: (o := node_outputs(stack, phantom_study.study_uid))["SR"] and o,
            timeout=180,
            interval=1.0,
        )
        sr = pydicom.dcmread(retrieve(stack, phantom_study.study_uid, out["SR"][0], tmp_path / "sr.dcm"))
        evidence = {
            s.SeriesInstanceUID
            for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence
        }
        assert evidence == {phantom_study.series["soft"]}
        store = open_store(data)
        try:
            (job,) = store.list_jobs(study_uid=phantom_study.study_uid).items
            wait_for("job done", lambda: store.get_job(job.id).state is JobState.DONE, timeout=30)
            (delivery,) = store.list_deliveries(job_id=job.id).items
            assert delivery.destination == "pacs-web"
            assert delivery.outcome is DeliveryOutcome.SUCCESS
            result = store.get_result(job.id)
            assert result is not None
            n_sc = sum(1 for f in result.files if Path(f).name.startswith("sc_"))
        finally:
            store.close()
        # Every secondary capture the job wrote reached Orthanc, once.
        assert n_sc >= 1
        assert len(node_outputs(stack, phantom_study.study_uid)["OT"]) == n_sc

        # A late instance re-opens the series: version 2 is analysed and sent, version 1 is superseded.
        stow_to_node(http, [late])
        store = open_store(data)
        try:
            job2 = wait_for(
                "the version-2 job done",
                lambda: [
                    j
                    for j in store.list_jobs(study_uid=phantom_study.study_uid).items
                    if j.version == 2 and j.state is JobState.DONE
                ],
                timeout=180,
                interval=1.0,
            )[0]
            assert job2.series_instance_uid == phantom_study.series["soft"]
            assert store.get_job(job.id).state is JobState.SUPERSEDED
            result2 = store.get_result(job2.id)
            assert result2 is not None
        finally:
            store.close()
        # The new SR is in the PACS beside the first (new content, new UIDs), with the late slice in evidence
        srs = node_outputs(stack, phantom_study.study_uid)["SR"]
        assert len(srs) == 2
        (new_uid,) = set(srs) - set(out["SR"])
        sr2 = pydicom.dcmread(retrieve(stack, phantom_study.study_uid, new_uid, tmp_path / "sr2.dcm"))
        late_uid = pydicom.dcmread(late, stop_before_pixels=True).SOPInstanceUID
        refs = {
            r.ReferencedSOPInstanceUID
            for e in sr2.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        }
        assert late_uid in refs
        # ... and names the first SR as the one it replaces (Predecessor Documents Sequence, 0040,A360).
        predecessors = [
            (
                study.StudyInstanceUID,
                series.SeriesInstanceUID,
                inst.ReferencedSOPClassUID,
                inst.ReferencedSOPInstanceUID,
            )
            for study in sr2.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for inst in series.ReferencedSOPSequence
        ]
        assert predecessors == [
            (sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPClassUID, sr.SOPInstanceUID)
        ]
