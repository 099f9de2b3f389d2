"""Acceptance: the same round trip over DICOMweb both ways (STOW-RS into the node, STOW-RS out to Orthanc)."""

from __future__ import annotations

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
    node = NodeProcess("serve", cfg, tmp_path / "node.log", http).start()
    with running(node):
        stow_to_node(http, phantom_study.all_files)
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
