"""C-STORE ingest throughput: dicomnode's SCP against dcmtk's storescp, same series, same sender, same disk.

Generates a CT series (default 300 images of 512x512 int16, Explicit VR Little Endian) with pydicom in a
temp dir, then sends it with dcmtk ``storescu +sd`` (one association, loopback, ``TCP_NODELAY=1``; storescu
waits for each response before sending the next image) to, in one run, side by side:

* dcmtk ``storescp`` (``TCP_NODELAY=1``; writes each file, no fsync): the reference;
* dicomnode's ``StorageSCP`` on the production path: header check, temp file, fdatasync, rename, directory
  fsync, then the record in the embedded SQLite store (WAL, ``synchronous=FULL``), then the success status.
  This is the headline figure: what a C-STORE success means in dicomnode;
* the same SCP and spool with an in-memory sink (the spool's share of the cost, without the database);
* the same SCP without any fsync and an in-memory sink: a diagnostic of the protocol and CPU cost alone,
  comparable to storescp but NOT what the node does;
* pynetdicom itself, doing nothing: a bare pynetdicom AE (same TCP_NODELAY and event-driven reactor patches as
  the node, CT Image Storage, every transfer syntax the node accepts) whose C-STORE handler answers 0x0000
  without reading the dataset or writing anything. No SCP built on pynetdicom, the DIMSE library of the chosen
  stack, can be faster than this line on this machine: it is the ceiling of any dicomnode figure.

All receivers write under one temp folder (one filesystem). Each of ``--runs`` rounds sends the series once to
every receiver, rotating the order; every receiver gets a fresh output folder (and database) each round. The
median storescu wall time per receiver is reported as images/s with the ratio to storescp (target >= 0.8).

So that a reader can see what the hardware imposes, each round also measures on the same filesystem the
latency of the spool's durable write sequence alone (write an image-sized temp file, fdatasync, rename,
directory fsync) and of one fsync'd SQLite commit: with a synchronous sender, one image can never take less
than their sum, whatever the protocol code does. The load average is printed before and after (the machine
may be shared). Timings are noisy on shared machines; nothing here is asserted.

Usage::

    .venv/bin/python benchmarks/ingest.py [--images 300] [--size 512] [--runs 5]
        [--stock-reactors] [--sequential-record]

``--stock-reactors`` keeps pynetdicom's 1 ms polling loops and ``--sequential-record`` writes the file before
recording it instead of both at once: together they measure the code as it was before both changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.scp import StorageSCP
from dicomnode.netutil import free_port, wait_port
from dicomnode.pipeline.sink import StoreSink
from dicomnode.store import Store, make_engine, upgrade

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


def send(port: int, aec: str, folder: Path) -> float:
    """Wall time of one storescu run sending the whole folder on one association."""
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [STORESCU, "-aet", "STORESCU", "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


def _durable_write_ms(folder: Path, size: int, n: int) -> list[float]:
    """Latency of the spool's durable sequence alone: temp file, fdatasync, rename, directory fsync."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tmp").mkdir(exist_ok=True)
    (folder / "final").mkdir(exist_ok=True)
    data = os.urandom(size)
    sync = getattr(os, "fdatasync", os.fsync)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        tmp = folder / "tmp" / f"{i}.part"
        with open(tmp, "wb") as fp:
            fp.write(data)
            fp.flush()
            sync(fp.fileno())
        os.replace(tmp, folder / "final" / f"{i}.dcm")
        fd = os.open(folder / "final", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        out.append((time.perf_counter() - t0) * 1000)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def _sqlite_commit_ms(path: Path, n: int) -> list[float]:
    """Latency of one small fsync'd commit in a WAL SQLite database (the store's settings)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t (v) VALUES (?)", (f"1.2.3.{i}",))
        con.execute("COMMIT")
        out.append((time.perf_counter() - t0) * 1000)
    con.close()
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


class _PynetdicomFloor:
    """A bare pynetdicom SCP acknowledging every C-STORE without touching the data: the ceiling."""

    label = "pynetdicom alone, handler does nothing (ceiling)"

    def run(self, folder: Path, series: Path, n: int) -> float:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        from dicomnode.ingest.scp import TRANSFER_SYNTAXES
        from dicomnode.netutil import enable_event_driven_reactors, enable_tcp_nodelay

        enable_tcp_nodelay()
        enable_event_driven_reactors()
        ae = AE("DICOMNODE")
        ae.maximum_pdu_size = 0  # as the node (StorageSCP's default)
        ae.add_supported_context(CTImageStorage, list(TRANSFER_SYNTAXES))
        received: list[int] = []

        def on_store(event: Any) -> int:
            received.append(1)
            return 0x0000

        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            elapsed = send(int(server.server_address[1]), "DICOMNODE", series)
        finally:
            server.shutdown()
        if len(received) != n:
            raise RuntimeError(f"{self.label}: {len(received)} of {n} instances acknowledged")
        return elapsed


class _Ours:
    """One configuration of dicomnode's SCP; a fresh spool (and database) for every round."""

    def __init__(self, label: str, fsync: bool, database: bool, event_driven: bool, concurrent: bool) -> None:
        self.label = label
        self.concurrent = concurrent
        self.fsync = fsync
        self.database = database
        self.event_driven = event_driven

    def run(self, folder: Path, series: Path, n: int) -> float:
        folder.mkdir(parents=True)
        count: Callable[[], int]
        engine = None
        if self.database:
            engine = make_engine(f"sqlite:///{folder / 'node.sqlite3'}")
            upgrade(engine)
            store = Store(engine)
            sink: MemorySink | StoreSink = StoreSink(store)
            count = lambda: store.series_summaries(study_uid)[0].n_instances  # noqa: E731
        else:
            memory = MemorySink()
            sink = memory
            count = memory.__len__
        study_uid = _study_uid(series)
        scp = StorageSCP(
            Spool(folder / "spool", sink, fsync=self.fsync, record_concurrently=self.concurrent),
            ae_title="DICOMNODE",
            port=0,
            event_driven=self.event_driven,
        )
        scp.start()
        try:
            elapsed = send(scp.port, "DICOMNODE", series)
            got = count()
        finally:
            scp.stop()
            if engine is not None:
                engine.dispose()
        if got != n:
            raise RuntimeError(f"{self.label}: {got} of {n} instances recorded")
        return elapsed


def _study_uid(series: Path) -> str:
    from pydicom import dcmread

    first = next(iter(sorted(series.glob("*.dcm"))))
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="rounds (median reported; >= 5 recommended)")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the work folder (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--stock-reactors",
        action="store_true",
        help="keep pynetdicom's polling reactors (measure the 'before'; process-wide)",
    )
    ap.add_argument(
        "--sequential-record",
        action="store_true",
        help="write the file, then record it (the 'before'), instead of both at once",
    )
    args = ap.parse_args(argv)
    for tool in (STORESCU, STORESCP):
        if not os.path.exists(tool):
            print(f"{tool} not found (install dcmtk)", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-ingest-", dir=args.dir))
    load_before = _load()
    try:
        series = work / "series"
        t0 = time.perf_counter()
        total = make_series(series, args.images, args.size)
        per_image = total // args.images
        print(
            f"series: {args.images} images {args.size}x{args.size} int16, {total / 1e6:.1f} MB "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )
        print(f"work folder filesystem: {work} (all receivers write here)")
        print(f"load average before: {load_before}")

        event_driven = not args.stock_reactors
        concurrent = not args.sequential_record
        how = ("event-driven" if event_driven else "polling") + (
            ", concurrent record" if concurrent else ", sequential record"
        )
        flags = (event_driven, concurrent)
        ours = {
            "durable": _Ours(f"dicomnode durable: fsync + SQLite ({how})", True, True, *flags),
            "durable-mem": _Ours("dicomnode durable spool, in-memory sink", True, False, *flags),
            "nofsync": _Ours("dicomnode NO fsync, in-memory sink (diagnostic)", False, False, *flags),
        }
        floor_rx = _PynetdicomFloor()
        names = ["storescp", *ours, "pynetdicom"]
        times: dict[str, list[float]] = {name: [] for name in names}
        disk_ms: list[float] = []
        db_ms: list[float] = []
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                folder = work / f"r{run}-{name}"
                if name == "storescp":
                    times[name].append(_run_storescp(folder, series))
                elif name == "pynetdicom":
                    times[name].append(floor_rx.run(folder, series, args.images))
                else:
                    times[name].append(ours[name].run(folder, series, args.images))
                shutil.rmtree(folder, ignore_errors=True)
            disk_ms += _durable_write_ms(work / f"r{run}-disk", per_image, 20)
            db_ms += _sqlite_commit_ms(work / f"r{run}-commit.sqlite3", 20)
            print(
                f"round {run + 1} ({', '.join(order)}): "
                + ", ".join(f"{k} {args.images / v[-1]:.0f}/s" for k, v in times.items())
            )

        med = {k: statistics.median(v) for k, v in times.items()}
        ref = args.images / med["storescp"]
        labels = {
            "storescp": "dcmtk storescp (reference, no fsync)",
            **{k: v.label for k, v in ours.items()},
            "pynetdicom": floor_rx.label,
        }
        print(f"\nmedian of {args.runs} rounds; storescu +sd, one association, loopback, TCP_NODELAY")
        print(f"{'receiver':66s} {'time s':>7s} {'img/s':>7s} {'MB/s':>6s} {'ratio':>6s}")
        for key in names:
            ips = args.images / med[key]
            mbs = total / 1e6 / med[key]
            print(f"{labels[key]:66s} {med[key]:7.2f} {ips:7.1f} {mbs:6.1f} {ips / ref:6.2f}")

        d50, d90 = statistics.median(disk_ms), _pct(disk_ms, 0.9)
        c50, c90 = statistics.median(db_ms), _pct(db_ms, 0.9)
        # With the concurrent record the file and the database commit overlap: the slower one bounds.
        floor = max(d50, c50) if concurrent else d50 + c50
        ours_ips = args.images / med["durable"]
        nofsync_ips = args.images / med["nofsync"]
        floor_ips = args.images / med["pynetdicom"]
        print(
            f"\ndisk, same filesystem, {len(disk_ms)} samples each: durable write of one "
            f"{per_image / 1e6:.2f} MB image (temp, fdatasync, rename, dir fsync) p50 {d50:.2f} ms, "
            f"p90 {d90:.2f} ms; SQLite WAL FULL commit p50 {c50:.2f} ms, p90 {c90:.2f} ms"
        )
        print(
            f"hardware floor for one synchronous association: >= {floor:.2f} ms/image, i.e. at most "
            f"{1000 / floor:.0f} img/s durable ({1000 / d50:.0f} img/s without the database) before any "
            f"protocol or CPU work; ratio 0.8 against this storescp needs <= "
            f"{1000 / (0.8 * ref):.2f} ms/image"
        )
        print(f"load average after: {_load()}")
        print(
            f"\nHEADLINE: storescp {ref:.1f} img/s, dicomnode durable {ours_ips:.1f} img/s, "
            f"ratio {ours_ips / ref:.2f} (target >= 0.8)"
        )
        print(
            f"diagnostic (not the headline): dicomnode without fsync {nofsync_ips:.1f} img/s, "
            f"ratio {nofsync_ips / ref:.2f}"
        )
        print(
            f"ceiling of the stack: pynetdicom alone, doing nothing with the data, {floor_ips:.1f} img/s, "
            f"ratio {floor_ips / ref:.2f}; dicomnode durable reaches {ours_ips / floor_ips:.2f} of it"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _run_storescp(folder: Path, series: Path) -> float:
    folder.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "STORESCP", "-od", str(folder), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return send(port, "STORESCP", series)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
