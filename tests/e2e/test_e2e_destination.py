"""Acceptance: a destination down for a while gets the result once it is up; a destination that rejects our
AE title stops the delivery as permanent (no retry loop), visible in the database and the log.

One node, two DIMSE destinations on the same PACS: "pacs" (our AE title is registered there) and "intruder"
(we call with an AE title the PACS does not know, so it rejects the association). The PACS is down at first.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_support import (
    NodeProcess,
    PhantomStudy,
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
from dicomnode.store import Delivery

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_destination_down_then_up_and_rejected_ae(
    tmp_path: Path, stack: Stack, phantom_study: PhantomStudy
) -> None:
    data = tmp_path / "node-data"
    http = free_port()
    pacs = {"kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": stack.orthanc_dicom}
    cfg = write_node_config(
        tmp_path / "node.yaml",
        data_dir=data,
        dicom_port=free_port(),
        http_port=http,
        destinations=[
            {**pacs, "name": "pacs"},
            {**pacs, "name": "intruder", "calling_ae": "INTRUDER"},
        ],
        backoff_base_s=1.0,
        backoff_max_s=2.0,
        max_attempts=100,
    )
    node = NodeProcess("serve", cfg, tmp_path / "node.log", http).start()
    store = open_store(data)
    with running(node):
        try:
            stow_to_node(http, phantom_study.all_files)

            def deliveries() -> dict[str, Delivery]:
                jobs = store.list_jobs(study_uid=phantom_study.study_uid).items
                if not jobs:
                    return {}
                return {d.destination: d for d in store.list_deliveries(job_id=jobs[0].id).items}

            # The PACS is down: both deliveries are retried, with backoff, and nothing is lost.
            def retried_twice() -> bool:
                ds = deliveries()
                return len(ds) == 2 and all(
                    d.outcome is DeliveryOutcome.RETRYING and d.attempts >= 2 for d in ds.values()
                )

            wait_for("two failed attempts per delivery", retried_twice, timeout=180, interval=0.5)

            # The PACS comes up: the result arrives.
            stack.up(NODE_START="0")
            out = wait_for(
                "the SR in the PACS",
                lambda: (o := node_outputs(stack, phantom_study.study_uid))["SR"] and o,
                timeout=120,
                interval=0.5,
            )
            assert len(out["SR"]) == 1
            final = wait_for(
                "both deliveries final",
                lambda: (ds := deliveries()) and all(d.outcome.is_final for d in ds.values()) and ds,
                timeout=60,
            )
            assert final["pacs"].outcome is DeliveryOutcome.SUCCESS
            rejected = final["intruder"]
            assert rejected.outcome is DeliveryOutcome.PERMANENT_FAILURE
            # No retry loop: several backoff periods later the attempts have not moved.
            attempts = rejected.attempts
            time.sleep(5)
            assert store.get_delivery(rejected.id).attempts == attempts
            assert store.get_delivery(rejected.id).next_attempt_at is None
            history = store.delivery_attempts(rejected.id)
            assert history[-1].outcome is DeliveryOutcome.PERMANENT_FAILURE
            assert all(a.outcome is DeliveryOutcome.RETRYING for a in history[:-1])
            job = store.get_job(rejected.job_id)
            assert job.state is JobState.FAILED and "intruder" in (job.message or "")
        finally:
            store.close()
    # Logged once, as an error naming the destination.
    lines = [line for line in node.log_text().splitlines() if "failed permanently" in line]
    assert len(lines) == 1 and "intruder" in lines[0]
