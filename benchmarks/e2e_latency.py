"""End-to-end latency of the local stack: last image received by the node -> SR stored in the PACS.

Starts ``deploy/local-stack.sh`` (Orthanc + ``dicomnode serve``) on free ports, sends a phantom study (a
localizer, a thick bone-kernel series and a 3 mm soft series) with ``storescu`` to Orthanc, which routes it to
the node; then polls Orthanc (QIDO-RS) until the node's SR is there. Prints, per run, the latency from the
last instance the node received to the SR found in Orthanc, minus the node's quiet period (the time the
node waits on purpose), with the steps in between, against the target (<= 15 s on 2 cores). Figures only.

    .venv/bin/python benchmarks/e2e_latency.py [--cores 2] [--repeat 2] [--quiet 2] [--matrix 256] [--keep D]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from dicomnode.netutil import free_port as _free_port

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 15.0


def _sr_in_orthanc(dicomweb: str, study_uid: str) -> bool:
    r = requests.get(f"{dicomweb}/studies/{study_uid}/series", params={"Modality": "SR"}, timeout=5)
    if r.status_code != 200 or not r.content:
        return False
    return any(s.get("00080060", {}).get("Value") == ["SR"] for s in r.json())


def _run_once(
    stack_env: dict[str, str], state: Path, study_dir: Path, study_uid: str, quiet: float
) -> dict[str, Any]:
    from dicomnode.store import Store, make_engine

    dicomweb = f"http://127.0.0.1:{stack_env['ORTHANC_HTTP_PORT']}/dicom-web"
    t_send0 = datetime.now(UTC)
    subprocess.run(
        [
            "/usr/bin/storescu",  # dcmtk; pynetdicom installs another storescu into .venv/bin
            "-aet",
            "STORESCU",
            "-aec",
            "ORTHANC",
            "+sd",
            "+r",
            "127.0.0.1",
            stack_env["ORTHANC_DICOM_PORT"],
            str(study_dir),
        ],
        env={**stack_env, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
        timeout=300,
    )
    t_sent = datetime.now(UTC)
    deadline = time.monotonic() + 600
    while not _sr_in_orthanc(dicomweb, study_uid):
        if time.monotonic() > deadline:
            raise SystemExit("the SR did not arrive within 600 s; see the logs under " + str(state / "logs"))
        time.sleep(0.1)
    t_sr = datetime.now(UTC)
    store = Store(make_engine(f"sqlite:///{state / 'node-data' / 'dicomnode.sqlite3'}"))
    try:
        series = store.list_series(study_uid=study_uid, limit=100).items
        last_rx = max(s.last_received_at for s in series)
        first_rx = min(s.first_received_at for s in series)
        completed = max(s.completed_at for s in series if s.completed_at is not None)
        (job,) = store.list_jobs(study_uid=study_uid).items
        # The SR is sent first: the delivery (SR + SCs) is confirmed a moment after the SR was found.
        while True:
            detail = store.job_detail(job.id)
            confirmed = [d.delivered_at for d in detail.deliveries if d.delivered_at is not None]
            if confirmed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        at = {e.to_state.value: e.at for e in detail.events}
        delivered = max(confirmed) if confirmed else t_sr
    finally:
        store.close()

    def s(a: datetime, b: datetime) -> float:
        return (b - a).total_seconds()

    return {
        "send (storescu -> Orthanc)": s(t_send0, t_sent),
        "Orthanc stable + route (sent -> first at node)": s(t_sent, first_rx),
        "routing transfer (first -> last at node)": s(first_rx, last_rx),
        "quiet period + sweep (last -> complete)": s(last_rx, completed),
        "job queued (complete -> analysing)": s(completed, at["analysing"]),
        "analysis + report (analysing -> reported)": s(at["analysing"], at["reported"]),
        "analysis done -> SR found by QIDO-RS": s(at["reported"], t_sr),
        "delivery of SR + SCs (reported -> confirmed)": s(at["reported"], delivered),
        "LATENCY last received -> SR in PACS": s(last_rx, t_sr),
        "LATENCY minus quiet period": s(last_rx, t_sr) - quiet,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cores", type=int, default=2, help="CPUs the stack may use (default 2)")
    ap.add_argument("--repeat", type=int, default=2, help="studies sent one after the other (default 2)")
    ap.add_argument(
        "--quiet", type=float, default=2.0, help="node quiet period, series and study (default 2 s)"
    )
    ap.add_argument("--matrix", type=int, default=256, help="phantom matrix (default 256)")
    ap.add_argument(
        "--keep", type=Path, help="keep the stack's state dir here (default: a temp dir, removed)"
    )
    args = ap.parse_args(argv)
    for tool in ("Orthanc", "/usr/bin/storescu"):
        if shutil.which(tool) is None:
            print(f"e2e_latency: {tool} not found (apt-get install orthanc orthanc-dicomweb dcmtk)")
            return 1
    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)  # inherited by Orthanc and the node started below

    from dicomnode.imaging.writer import write_study
    from dicomnode.phantom import PhantomSpec, make_phantom

    work = args.keep or Path(tempfile.mkdtemp(prefix="dicomnode-e2e-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    state = work / "stack"
    env = dict(os.environ)
    env.update(
        ORTHANC_HTTP_PORT=str(_free_port()),
        ORTHANC_DICOM_PORT=str(_free_port()),
        NODE_DICOM_PORT=str(_free_port()),
        NODE_HTTP_PORT=str(_free_port()),
        MODALITY_PORT=str(_free_port()),
        NODE_SERIES_QUIET=str(args.quiet),
        NODE_STUDY_QUIET=str(args.quiet),
        PYTHON=sys.executable,
        DICOMNODE=str(Path(sys.executable).parent / "dicomnode"),
    )
    spacing = 1.3 * 256 / args.matrix
    ph = make_phantom(
        PhantomSpec(matrix=args.matrix, spacing_mm=spacing, thickness_mm=1.5, z_levels=("T11", "L5"))
    )
    print(f"e2e_latency: {len(cpus)} core(s), node quiet period {args.quiet:g} s, phantom {ph.volume.shape}")
    subprocess.run(["bash", str(REPO / "deploy" / "local-stack.sh"), "up", str(state)], env=env, check=True)
    rows: list[dict[str, Any]] = []
    try:
        import pydicom

        for k in range(args.repeat):
            study_dir = work / f"study{k}"
            written = write_study(ph.volume, study_dir)
            n = sum(len(v) for v in written.values())
            uid = str(pydicom.dcmread(written["soft"][0], stop_before_pixels=True).StudyInstanceUID)
            row = _run_once(env, state, study_dir, uid, args.quiet)
            rows.append(row)
            print(f"\nrun {k + 1}: {n} instances in 3 series")
            for name, value in row.items():
                print(f"  {name:<50s} {value:7.2f} s")
    finally:
        subprocess.run(
            ["bash", str(REPO / "deploy" / "local-stack.sh"), "down", str(state)], env=env, check=False
        )
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    key = "LATENCY minus quiet period"
    values = sorted(r[key] for r in rows)
    print(
        f"\n{key}: median {statistics.median(values):.2f} s, max {values[-1]:.2f} s "
        f"(target <= {TARGET_S:g} s on 2 cores)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
