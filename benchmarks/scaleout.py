"""Scale-out benchmark: analysis throughput with 1, 2 and 4 Celery workers on this machine.

For each worker count, in a fresh PostgreSQL database and a fresh data directory: the same phantom CT studies
(one series each, 512 x 512 x 300, 1 mm, by default) are ingested into the spool, N ``dicomnode work
--celery-worker`` processes are started (each one job at a time, as one per host or per core would run) and
waited for, then the completion sweep creates one job per study and the Celery executor queues them on the
broker (loopback Redis by default, RabbitMQ with ``--broker amqp://...``). The clock runs from the queueing to
the last job reported. Prints, per worker count: wall time, studies per minute, the workers' CPU time per
study (from the queueing on; and over their whole life, start-up and imports included) and the
machine's load average, then the speed-up over one worker and the space a study takes (spool, results,
PostgreSQL). Figures only, never pass/fail.

On a 2-core machine more than 2 workers cannot go faster: they share the same two cores (and the machine is
shared with other work: "cores busy" says how much of the machine the workers got, and the load average
how many others wanted it). The CPU time per study is the figure to size a site with (docs/capacity.md).

    .venv/bin/python benchmarks/scaleout.py [--workers 1 2 4] [--studies 8] [--matrix 512] [--slices 300]
        [--broker redis://127.0.0.1:6379/12] [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]

Needs PostgreSQL and the broker on loopback (the machine's services; see tests/postgres_testing.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from sqlalchemy import Engine, create_engine, text

if TYPE_CHECKING:
    from collections.abc import Iterator

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER = "redis://127.0.0.1:6379/12"


@dataclass
class Round:
    workers: int
    studies: int
    wall_s: float
    cpu_s: float
    busy_cpu_s: float
    load: float
    done: int
    db_bytes: int
    spool_bytes: int
    other_bytes: int

    @property
    def per_minute(self) -> float:
        return self.done / self.wall_s * 60.0


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database beside ``server_url``'s, dropped afterwards."""
    base = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"dicomnode_scaleout_{uuid.uuid4().hex[:10]}"
    with base.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with base.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        base.dispose()


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist); links (a job's inputs) not followed."""
    if not folder.is_dir():
        return 0
    return sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def db_bytes(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_studies(folder: Path, n: int, matrix: int, slices: int) -> list[Path]:
    """``n`` studies of one phantom series each (the same volume, new UIDs per study)."""
    from dicomnode.imaging.writer import write_dicom_series
    from dicomnode.phantom import PhantomSpec, make_phantom

    spec = PhantomSpec(
        matrix=matrix, spacing_mm=0.7 * 512 / matrix, thickness_mm=1.0, n_slices=slices, seed=5
    )
    volume = make_phantom(spec).volume
    out = []
    for i in range(n):
        d = folder / f"study{i:02d}"
        write_dicom_series(volume, d, header={"PatientID": f"SCALE{i:02d}", "AccessionNumber": f"S{i:04d}"})
        out.append(d)
    return out


def run_round(workers: int, studies: list[Path], args: argparse.Namespace, work: Path, threads: int) -> Round:
    """One worker count: fresh database and data directory, N workers, all studies queued at once."""
    from dicomnode.config import load_settings
    from dicomnode.domain import JobState
    from dicomnode.ingest import Spool
    from dicomnode.pipeline.executors import CeleryExecutor, analyze_job, make_celery_app
    from dicomnode.pipeline.runner import Runner
    from dicomnode.pipeline.sink import StoreSink
    from dicomnode.store import Store, make_engine, upgrade

    with fresh_database(args.postgres) as db_url:
        root = work / f"w{workers}"
        cfg = root / "node.yaml"
        root.mkdir()
        cfg.write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(root / "data"),
                    "database_url": db_url,
                    "completion": {"series_quiet_seconds": 1, "study_quiet_seconds": 1},
                    "workers": {"executor": "celery", "broker_url": args.broker, "count": 1},
                }
            )
        )
        settings = load_settings(cfg)
        engine = make_engine(settings.database_url_resolved())
        upgrade(engine)
        db_empty = db_bytes(engine)
        store = Store(engine)
        app = make_celery_app(args.broker)
        app.control.purge()
        spool = Spool(settings.spool_dir, StoreSink(store))
        for study in studies:
            for f in sorted(study.glob("*.dcm")):
                if not spool.ingest_file(f).ok:
                    raise RuntimeError(f"ingest failed: {f}")

        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for i in range(workers):
            log = root / f"worker{i}.log"
            with log.open("wb") as fh:
                cmd = [
                    sys.executable,
                    "-m",
                    "dicomnode",
                    "-v",
                    "work",
                    "--config",
                    str(cfg),
                    "--celery-worker",
                ]
                procs.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), log))
        try:
            deadline = time.monotonic() + 300
            for proc, log in procs:
                while "ready" not in log.read_text(errors="replace"):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("a Celery worker did not start:\n" + log.read_text()[-3000:])
                    time.sleep(0.5)
            idle_cpu = sum(proc_cpu_s(p.pid) for p, _ in procs)  # start-up and imports
            runner = Runner(settings, store, analyze=analyze_job)
            executor = CeleryExecutor(app, store=store, max_tasks=len(studies))
            t0 = time.perf_counter()
            load0 = os.getloadavg()[0]
            job_ids = runner.sweep_completion(now=datetime.now(UTC) + timedelta(seconds=5))
            executor.wake()
            deadline = time.monotonic() + args.timeout
            next_wake = time.monotonic() + 10
            while not all(store.get_job(j).state.is_final for j in job_ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jobs not done after {args.timeout} s")
                if time.monotonic() > next_wake:  # as the sweeps of 'work' do: a lost task is made up
                    executor.wake()
                    next_wake = time.monotonic() + 10
                time.sleep(0.2)
            wall = time.perf_counter() - t0
            load = max(load0, os.getloadavg()[0])
            done = sum(store.get_job(j).state is JobState.DONE for j in job_ids)
            busy_cpu = sum(proc_cpu_s(p.pid) for p, _ in procs) - idle_cpu
            db_used = db_bytes(engine) - db_empty
        finally:
            for proc, _ in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, _ in procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            store.close()
            engine.dispose()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if done != len(job_ids) or len(job_ids) != len(studies):
            print(
                f"  warning: {done} of {len(job_ids)} jobs DONE for {len(studies)} studies", file=sys.stderr
            )
        spooled = tree_bytes(settings.spool_dir)
        other = tree_bytes(settings.data_dir) - spooled
        return Round(workers, len(studies), wall, cpu, busy_cpu, load, done, db_used, spooled, other)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--studies", type=int, default=8, help="studies per worker count")
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--broker", default=os.environ.get("DICOMNODE_BENCH_BROKER", DEFAULT_BROKER))
    ap.add_argument("--postgres", default=os.environ.get("DICOMNODE_TEST_POSTGRES_URL", DEFAULT_POSTGRES))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per worker count")
    ap.add_argument("--keep", type=Path, default=None, help="keep studies, logs and data in this folder")
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0))
    work = args.keep or Path(tempfile.mkdtemp(prefix="dn-scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        studies = make_studies(work / "studies", args.studies, args.matrix, args.slices)
        print(
            f"{args.studies} studies of {args.matrix}x{args.matrix}x{args.slices} written in "
            f"{time.perf_counter() - t0:.1f} s; {cores} cores; broker {args.broker.split('@')[-1]}"
        )
        rounds = []
        for n in args.workers:
            threads = max(1, cores // n)
            r = run_round(n, studies, args, work, threads)
            rounds.append(r)
            print(
                f"workers={n} (OMP threads {threads}): {r.done}/{r.studies} studies in {r.wall_s:.1f} s = "
                f"{r.per_minute:.2f} studies/min; worker CPU per study {r.busy_cpu_s / r.studies:.1f} s "
                f"({r.cpu_s / r.studies:.1f} s with the workers' start-up); cores busy "
                f"{r.busy_cpu_s / r.wall_s:.2f} of {cores}; load avg {r.load:.1f}",
                flush=True,
            )
        base = rounds[0].per_minute
        print("\nworkers  studies/min  speed-up  CPU s/study  cores busy")
        for r in rounds:
            cpu = r.busy_cpu_s / r.studies
            busy = r.busy_cpu_s / r.wall_s
            speedup = r.per_minute / base
            print(f"{r.workers:7d}  {r.per_minute:11.2f}  {speedup:7.2f}x  {cpu:11.1f}  {busy:10.2f}")
        best = min(r.busy_cpu_s / r.studies for r in rounds)
        print(
            f"one core fully used would analyse {60 / best:.1f} studies/min at the lowest CPU cost measured "
            f"({best:.1f} s/study)"
        )
        last = rounds[-1]
        mb = 1e6 * last.studies
        print(
            f"per study: spool {last.spool_bytes / mb:.0f} MB, other data (results, logs) "
            f"{last.other_bytes / mb:.1f} MB, PostgreSQL {last.db_bytes / mb:.2f} MB "
            f"({args.slices} instances a study)"
        )
        if any(r.workers > cores for r in rounds):
            print(f"(more workers than the {cores} cores share them: no speed-up is expected past {cores})")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
