"""Acceptance: ``work`` killed with SIGKILL during analysis and during delivery resumes; every result
arrives once.

``receive`` and ``work`` run as two processes over one SQLite (WAL) database. The link to the PACS is slowed
down by a relay so that the delivery lasts long enough to be interrupted half-way.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from e2e_support import (
    NodeProcess,
    PhantomStudy,
    SlowRelay,
    Stack,
    free_port,
    node_outputs,
    open_store,
    running,
    stow_to_node,
    wait_for,
    write_node_config,
)

from dicomnode.domain import DeliveryOutcome, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_work_killed_during_analysis_and_delivery(
    tmp_path: Path, stack: Stack, phantom_study: PhantomStudy
) -> None:
    stack.up(NODE_START="0")
    relay = SlowRelay(stack.orthanc_dicom, bytes_per_s=3e6)
    data = tmp_path / "node-data"
    recv_http, work_http = free_port(), free_port()
    cfg = write_node_config(
        tmp_path / "node.yaml",
        data_dir=data,
        dicom_port=free_port(),
        http_port=recv_http,
        destinations=[
            {"kind": "dimse", "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": relay.port}
        ],
    )
    receiver = NodeProcess("receive", cfg, tmp_path / "receive.log", recv_http).start()
    work_args = ("--delivery-lease", "3")
    worker = NodeProcess("work", cfg, tmp_path / "work.log", work_http, *work_args).start()
    store = open_store(data)
    with running(receiver):
        try:
            stow_to_node(recv_http, phantom_study.all_files)

            def job_in(state: JobState) -> object:
                jobs = store.list_jobs(study_uid=phantom_study.study_uid).items
                return jobs[0] if jobs and jobs[0].state is state else None

            # 1. Killed while analysing: the job is given back and analysed again by the next worker.
            job = wait_for(
                "a job being analysed", lambda: job_in(JobState.ANALYSING), timeout=120, interval=0.1
            )
            assert worker.kill(signal.SIGKILL) == -signal.SIGKILL
            assert store.get_job(job.id).state is JobState.ANALYSING  # nobody finished it
            worker = NodeProcess("work", cfg, tmp_path / "work.log", work_http, *work_args).start()

            # 2. Killed while delivering: some files are in Orthanc, not all.
            wait_for(
                "the delivery to start", lambda: node_outputs(stack, phantom_study.study_uid)["OT"], 180, 0.1
            )
            assert store.get_job(job.id).state is JobState.DELIVERING
            assert worker.kill(signal.SIGKILL) == -signal.SIGKILL
            worker = NodeProcess("work", cfg, tmp_path / "work.log", work_http, *work_args).start()

            done = wait_for("the job to be done", lambda: job_in(JobState.DONE), timeout=180, interval=0.5)
            assert done.id == job.id
            assert done.attempts == 2  # analysed twice: once killed, once to the end
            (delivery,) = store.list_deliveries(job_id=job.id).items
            assert delivery.outcome is DeliveryOutcome.SUCCESS
            result = store.get_result(job.id)
            assert result is not None
            n_sc = sum(1 for f in result.files if Path(f).name.startswith("sc_"))
            # Every result arrived, and once: one SR and one copy of each SC (same UIDs when resent).
            out = node_outputs(stack, phantom_study.study_uid)
            assert len(out["SR"]) == 1
            assert len(out["OT"]) == n_sc == len(set(out["OT"]))
            assert len(store.list_jobs(study_uid=phantom_study.study_uid).items) == 1
        finally:
            worker.stop()
            store.close()
            relay.close()
