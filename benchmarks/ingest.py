"""C-STORE ingest throughput: dicomnode, dcmtk ``storescp --fork`` and Orthanc side by side in one run.

Generates a CT series (default 336 images of 512x512 int16, Explicit VR Little Endian) with pydicom in a temp
dir, then sends it with dcmtk ``storescu`` over loopback (``TCP_NODELAY=1``; storescu waits for each response
before sending the next image) to each receiver, once over **one** association and once over **four** parallel
associations (the series split round-robin into four folders, four storescu processes started together: what a
PACS or a router does). The receivers:

* dcmtk ``storescp --fork`` (one process per association; writes each file, no fsync): the reference;
* Orthanc (the PACS the node sits beside; its default SQLite index and file storage);
* dicomnode's receiver as ``serve``/``receive`` builds it from the default settings (only the data folder
  and the port set): ``dicom.receive_processes`` ("auto" = min(4, CPUs), 1 with 2 CPUs or fewer) receiving
  processes, each running the ``StorageSCP``: structure check, header parse, the file written to the spool,
  the record in the embedded SQLite store (WAL, ``synchronous=FULL``), the success status only once both are
  durable (the group commit: one flush of the files and one database transaction for all instances waiting
  at that moment, across the associations of that process). This is ``dicom.durability: power``, the
  default: a success survives a power loss;
* ``node-process``: the same with ``dicom.durability: process``: the same write, rename, commit and answer,
  in the same order, without any flush (the recording connection on SQLite ``synchronous=NORMAL``): a success
  survives a crash of the node's process, not a power loss.

``--only`` also takes ``node1`` (``power``, one receiving process inside the benchmark's process) and
``node-process2`` (``process``, two receiving processes), for comparison.

The node's receiving processes are started (and the listening socket bound) before the clock starts, as
Orthanc and storescp are; what is timed is the transfer, from the first storescu start to the last end.

Each of ``--runs`` rounds sends the series to every receiver at 1 and at 4 associations, rotating the order;
every receiver gets a fresh output folder (and database) each time. Medians over the rounds are printed as
seconds and images/s with the ratios node/storescp and node/Orthanc at each association count, and the CPU
the node's receiver used per image during the transfers (user + system, of its receiving processes or, for
``node1``, of this process): on a shared machine a steadier measure than the wall time for comparing code
versions. The load average is printed before and after (the machine may be shared); nothing here is asserted.
Compare CPU figures only between runs with the same ``--dir``: creating a file costs every receiver more or
less kernel CPU depending on the folder (on one ext4 machine 0.3-1 ms in the system temp folder, 0.03-0.2 ms
elsewhere). On ext4 without a journal the inode allocator steps over every inode of the block group freed in
the last minute or more (``recently_deleted``), and every round here deletes the previous receiver's 336
files nearby, so creating a file costs up to about 1 ms of kernel CPU (perf) whoever creates it: the node
creates its temp files ahead in a thread of their own, storescp in its forked children.

Usage::

    .venv/bin/python benchmarks/ingest.py [--images 336] [--size 512] [--runs 5] [--only node,orthanc,...]

``--only`` names: storescp, orthanc, node, node-process (the default set), node1, node-process2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.cli.node import build_spool, receiver_spool
from dicomnode.config import Settings
from dicomnode.ingest.processes import ReceiverPool
from dicomnode.ingest.scp import StorageSCP
from dicomnode.netutil import free_port, wait_port
from dicomnode.store import Store, make_engine, upgrade

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
RECEIVERS = ("storescp", "orthanc", "node", "node-process")
#: Also accepted by ``--only``: the node with one receiving process (inside the benchmark's process), and the
#: node with ``dicom.durability: process`` and two receiving processes.
EXTRA_RECEIVERS = ("node1", "node-process2")
#: The node's variants: receiver name -> (``dicom.receive_processes``, ``dicom.durability``).
NODES: dict[str, tuple[int | str, str]] = {
    "node": ("auto", "power"),
    "node-process": ("auto", "process"),
    "node1": (1, "power"),
    "node-process2": (2, "process"),
}
ASSOCIATIONS = (1, 4)


def make_series(folder: Path, n: int, size: int) -> int:
    """Write ``n`` CT images of ``size`` x ``size``; return the total bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.42) ** 2
    total = 0
    for i in range(n):
        img = np.where(body, 40, -1000) + rng.normal(0, 12, (size, size))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName = "Bench^Mark"
        ds.PatientID = "BENCH"
        ds.StudyDescription = "CT ABDOMEN PELVIS"
        ds.SeriesDescription = "Benchmark 1.0 mm"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.7, 0.7]
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-179.2, -179.2, -float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (img + 1024).astype(np.int16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def split(series: Path, parts: int) -> list[Path]:
    """The series split round-robin into ``parts`` folders (hard links), one per association."""
    files = sorted(series.glob("*.dcm"))
    out = [series.parent / f"{series.name}-{parts}x{k}" for k in range(parts)]
    for k, folder in enumerate(out):
        folder.mkdir(exist_ok=True)
        for f in files[k::parts]:
            target = folder / f.name
            if not target.exists():
                os.link(f, target)
    return out


def send(port: int, aec: str, folders: list[Path]) -> float:
    """Wall time of one storescu per folder, all started together, until the last one ends."""
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "STORESCU", "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err.decode(errors='replace')[-500:]}")
    return elapsed


def run_storescp(folder: Path, senders: list[Path], n: int) -> float:
    folder.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "--fork", "-aet", "STORESCP", "-od", str(folder), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        elapsed = send(port, "STORESCP", senders)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    got = sum(1 for _ in folder.rglob("*") if _.is_file())
    if got != n:
        raise RuntimeError(f"storescp: {got} of {n} files written")
    return elapsed


def run_orthanc(folder: Path, senders: list[Path], n: int) -> float:
    folder.mkdir(parents=True)
    http, dicom = free_port(), free_port()
    config = {
        "Name": "BENCH",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpServerEnabled": True,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [ORTHANC, str(folder / "orthanc.json")],
        cwd=folder,
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        end = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{http}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("Orthanc did not start: " + (folder / "orthanc.log").read_text()[-800:])
            time.sleep(0.1)
        wait_port(dicom)
        elapsed = send(dicom, "ORTHANC", senders)
        got = requests.get(f"http://127.0.0.1:{http}/statistics", timeout=10).json()["CountInstances"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    if got != n:
        raise RuntimeError(f"Orthanc: {got} of {n} instances stored")
    return elapsed


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc; 0 elsewhere)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


#: CPU seconds the node's receiver used during each timed transfer (receiver, associations) -> list.
NODE_CPU: dict[tuple[str, int], list[float]] = {}


def run_node(folder: Path, senders: list[Path], n: int, name: str = "node") -> float:
    """The node's receiver ``name`` (:data:`NODES`) as ``dicomnode serve``/``receive`` builds it from the
    settings (defaults but the folder, the port, ``dicom.receive_processes`` and ``dicom.durability``):
    that many receiving processes on one port, or the SCP inside this process when that is 1."""
    folder.mkdir(parents=True)
    processes, durability = NODES[name]
    settings = Settings(
        data_dir=folder,
        dicom={"port": free_port(), "receive_processes": processes, "durability": durability},
    )
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    store = Store(engine)
    count = settings.dicom.receive_process_count
    spool, close_spool = build_spool(settings, engine)  # the node's own spool (STOW-RS when count > 1)
    scp: StorageSCP | ReceiverPool = (
        ReceiverPool(settings, receiver_spool, count)
        if count > 1
        else StorageSCP.from_settings(settings.dicom, spool)
    )
    scp.start()
    pids = scp.pids() if isinstance(scp, ReceiverPool) else [os.getpid()]
    try:
        assert scp.port is not None
        cpu0 = _cpu_seconds(pids)
        elapsed = send(scp.port, settings.dicom.ae_title, senders)
        cpu = _cpu_seconds(pids) - cpu0
        NODE_CPU.setdefault(
            (f"{name} ({count} process{'es' if count > 1 else ''})", len(senders)), []
        ).append(cpu)
        got = store.ingest_totals()[0]
    finally:
        scp.stop()
        close_spool()
        engine.dispose()
    if got != n:
        raise RuntimeError(f"dicomnode: {got} of {n} instances recorded")
    return elapsed


def _node_runner(name: str) -> Callable[[Path, list[Path], int], float]:
    def run(folder: Path, senders: list[Path], n: int) -> float:
        return run_node(folder, senders, n, name)

    return run


RUNNERS: dict[str, Callable[[Path, list[Path], int], float]] = {
    "storescp": run_storescp,
    "orthanc": run_orthanc,
    **{name: _node_runner(name) for name in NODES},
}
LABELS = {
    "storescp": "dcmtk storescp --fork (no fsync)",
    "orthanc": "Orthanc (default storage and index)",
    "node": "dicomnode (durability power; receive_processes auto)",
    "node-process": "dicomnode (durability process; receive_processes auto)",
    "node1": "dicomnode (durability power; receive_processes 1)",
    "node-process2": "dicomnode (durability process; receive_processes 2)",
}


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--images", type=int, default=336)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="rounds (median reported; >= 5 recommended)")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the work folder (default: system temp)")
    ap.add_argument(
        "--only",
        default=",".join(RECEIVERS),
        help=f"comma-separated receivers to run, of: {', '.join((*RECEIVERS, *EXTRA_RECEIVERS))}",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    receivers = [r for r in (*RECEIVERS, *EXTRA_RECEIVERS) if r in args.only.split(",")]
    # As the node runs (dicomnode.cli): pynetdicom's per-message INFO lines off.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for tool in (STORESCU, STORESCP, ORTHANC):
        if not os.path.exists(tool):
            print(f"{tool} not found (install dcmtk and orthanc)", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-ingest-", dir=args.dir))
    try:
        series = work / "series"
        t0 = time.perf_counter()
        total = make_series(series, args.images, args.size)
        print(
            f"series: {args.images} images {args.size}x{args.size} int16, {total / 1e6:.1f} MB "
            f"(generated in {time.perf_counter() - t0:.1f} s); storescu over loopback, TCP_NODELAY"
        )
        print(f"load average before: {_load()}")
        folders = {k: split(series, k) if k > 1 else [series] for k in ASSOCIATIONS}
        times: dict[tuple[str, int], list[float]] = {(r, k): [] for r in receivers for k in ASSOCIATIONS}
        for run in range(args.runs):
            order = receivers[run % len(receivers) :] + receivers[: run % len(receivers)]
            line = []
            for k in ASSOCIATIONS:
                for name in order:
                    out = work / f"r{run}-{name}-{k}"
                    elapsed = RUNNERS[name](out, folders[k], args.images)
                    shutil.rmtree(out, ignore_errors=True)
                    times[(name, k)].append(elapsed)
                    line.append(f"{name}x{k} {elapsed:.2f}s")
            print(f"round {run + 1}: " + ", ".join(line), flush=True)

        med = {key: statistics.median(v) for key, v in times.items()}
        print(f"\nmedian of {args.runs} rounds, {args.images} images, wall time of the whole transfer")
        print(f"{'receiver':56s} {'assoc':>5s} {'time s':>7s} {'img/s':>7s} {'MB/s':>6s}")
        for k in ASSOCIATIONS:
            for name in receivers:
                t = med[(name, k)]
                print(f"{LABELS[name]:56s} {k:5d} {t:7.2f} {args.images / t:7.1f} {total / 1e6 / t:6.1f}")
        for (name, k), cpus in sorted(NODE_CPU.items()):
            per = statistics.median(cpus) / args.images * 1000
            print(f"CPU {name} x{k}: receiver CPU {per:.2f} ms per image (median of {len(cpus)})")
        for k in ASSOCIATIONS:
            if "node" in receivers:
                for other in ("node1", "node-process"):
                    if other in receivers:
                        print(
                            f"RATIO {k} association(s): {other}/node {med[('node', k)] / med[(other, k)]:.2f}"
                        )
            if "node-process" in receivers and "node-process2" in receivers:
                ratio = med[("node-process", k)] / med[("node-process2", k)]
                print(f"RATIO {k} association(s): node-process2/node-process {ratio:.2f}")
            for name in (r for r in receivers if r in NODES):
                node = med[(name, k)]
                parts = [f"{k} association{'s' if k > 1 else ''}:"]
                if "storescp" in receivers:
                    parts.append(f"{name}/storescp --fork {med[('storescp', k)] / node:.2f}")
                if "orthanc" in receivers:
                    parts.append(f"{name}/Orthanc {med[('orthanc', k)] / node:.2f}")
                if len(parts) > 1:
                    print("RATIO " + " ".join(parts) + " (speed ratios, >1 = node faster)")
        print(f"load average after: {_load()}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
