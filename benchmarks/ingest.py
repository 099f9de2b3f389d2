"""C-STORE ingest throughput: dicomnode's SCP against dcmtk's storescp, same series, same sender.

Generates a CT series (default 300 images of 512x512 int16, Explicit VR Little Endian) with pydicom in a
temp dir, then sends it with dcmtk ``storescu +sd`` (one association, loopback, ``TCP_NODELAY=1``) to:

* dcmtk ``storescp`` (``TCP_NODELAY=1``, writes files, no fsync) -- the reference;
* dicomnode's ``StorageSCP`` (TCP_NODELAY patched in), full durability path: header check, temp file,
  fsync, rename, directory fsync, record in a sink -- what production does;
* the same SCP with ``fsync=False`` -- the protocol/CPU cost alone, comparable to storescp.

Each receiver gets ``--runs`` runs (interleaved); the median wall time of storescu is reported as images/s and
MB/s, with the ratio to storescp (target >= 0.8). Timings are noisy on shared machines (+-30 %); nothing here
is asserted.

Usage::

    .venv/bin/python benchmarks/ingest.py [--images 300] [--size 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.scp import StorageSCP

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def send(port: int, aec: str, folder: Path) -> float:
    """Wall time of one storescu run sending the whole folder on one association."""
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [STORESCU, "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), "+sd", str(folder)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="StorageSCP poll_interval_s (default: pynetdicom's 1 ms)",
    )
    args = ap.parse_args(argv)
    for tool in (STORESCU, STORESCP):
        if not os.path.exists(tool):
            print(f"{tool} not found (install dcmtk)", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-ingest-"))
    try:
        series = work / "series"
        t0 = time.perf_counter()
        total = make_series(series, args.images, args.size)
        print(
            f"series: {args.images} images {args.size}x{args.size} int16, {total / 1e6:.1f} MB "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )

        # dcmtk storescp, the reference receiver
        scp_out = work / "storescp"
        scp_out.mkdir()
        dport = free_port()
        dcmtk = subprocess.Popen(
            [STORESCP, "-aet", "STORESCP", "-od", str(scp_out), str(dport)],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(dport)

        # name -> (label, fsync, poll interval)
        configs: dict[str, tuple[str, bool, float | None]] = {
            "durable": ("dicomnode SCP (fsync + rename + record)", True, None),
            "nofsync": ("dicomnode SCP (no fsync)", False, None),
        }
        if args.poll_interval is not None:
            ms = args.poll_interval * 1000
            configs["durable-poll"] = (f"dicomnode SCP (fsync, poll {ms:g} ms)", True, args.poll_interval)
            configs["nofsync-poll"] = (f"dicomnode SCP (no fsync, poll {ms:g} ms)", False, args.poll_interval)
        sinks = {name: MemorySink() for name in configs}
        ours = {
            name: StorageSCP(
                Spool(work / f"spool-{name}", sinks[name], fsync=fsync),
                ae_title="DICOMNODE",
                port=0,
                poll_interval_s=poll,
            )
            for name, (_, fsync, poll) in configs.items()
        }
        for scp in ours.values():
            scp.start()

        times: dict[str, list[float]] = {"storescp": [], **{name: [] for name in configs}}
        try:
            for run in range(args.runs):
                times["storescp"].append(send(dport, "STORESCP", series))
                shutil.rmtree(scp_out)
                scp_out.mkdir()
                for name, scp in ours.items():
                    times[name].append(send(scp.port, "DICOMNODE", series))
                    if len(sinks[name]) != args.images:
                        raise RuntimeError(f"{name}: {len(sinks[name])} of {args.images} instances recorded")
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        finally:
            for scp in ours.values():
                scp.stop()
            dcmtk.terminate()
            dcmtk.wait(timeout=10)

        med = {k: statistics.median(v) for k, v in times.items()}
        ref = args.images / med["storescp"]
        labels = {"storescp": "dcmtk storescp (TCP_NODELAY)", **{k: v[0] for k, v in configs.items()}}
        print(f"\nmedian of {args.runs} runs; storescu +sd, one association, loopback, TCP_NODELAY both ends")
        print(f"{'receiver':44s} {'time s':>8s} {'img/s':>8s} {'MB/s':>8s} {'ratio':>6s}")
        for key in times:
            ips = args.images / med[key]
            print(
                f"{labels[key]:44s} {med[key]:8.2f} {ips:8.1f} {total / 1e6 / med[key]:8.1f} {ips / ref:6.2f}"
            )
        for key in configs:
            ratio = (args.images / med[key]) / ref
            print(f"ratio {key} / storescp = {ratio:.2f} (target >= 0.8)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
