"""The node's processes: ``serve`` (everything), ``receive`` + ``work`` (the same, split), and ``echo``.

* ``dicomnode serve [--config FILE]``: the embedded default in one process: SQLite in the data dir (unless
  ``database_url`` says otherwise), the spool, the C-STORE SCP, the HTTP app (health, metrics, STOW-RS),
  the sweeps (APScheduler) and the workers.
* ``dicomnode receive``: the SCP and the HTTP app with STOW-RS only (never analyses; stays light).
* ``dicomnode work``: sweeps, workers and an HTTP admin/health app. Run it beside ``receive`` on the same
  database (SQLite WAL on one host, PostgreSQL across hosts); give it another ``--http-port`` on one host.
* ``dicomnode echo DEST``: C-ECHO (DIMSE) or a DICOMweb probe to a configured destination.

All of them validate the config first (exit 2 naming the field) and apply the database migrations; SIGTERM
or SIGINT stops them gracefully (listeners closed, workers finish or leave their job to recovery).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import ConfigError, DicomnodeError

if TYPE_CHECKING:
    from dicomnode.config import Settings

log = logging.getLogger("dicomnode.node")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

ROLES = ("serve", "receive", "work")


def register(subparsers: Any) -> None:
    """Add ``serve``, ``receive``, ``work`` and ``echo``."""
    helps = {
        "serve": "run the whole node in one process (receiver, HTTP, scheduler, workers)",
        "receive": "run the receiver only: C-STORE SCP and HTTP with STOW-RS",
        "work": "run the scheduler and the workers (with an HTTP admin/health app)",
    }
    for role in ROLES:
        p: argparse.ArgumentParser = subparsers.add_parser(role, help=helps[role], description=helps[role])
        _common(p)
        p.add_argument("--http-port", type=int, help="HTTP port (overrides http.port)")
        if role != "receive":
            p.add_argument(
                "--analysis-in-process",
                action="store_true",
                help="run the analysis in the worker thread instead of a child process (debugging)",
            )
            p.add_argument(
                "--delivery-lease",
                type=float,
                default=None,
                metavar="S",
                help="seconds a delivery being sent is reserved; after a crash it is resent after that "
                "(overrides workers.delivery_lease_seconds, default 120)",
            )
            p.add_argument(
                "--stale-job",
                type=float,
                default=None,
                metavar="S",
                help="seconds without heartbeat after which another host's ANALYSING job is taken back "
                "(overrides workers.stale_job_seconds, default 300)",
            )
        if role == "work":
            p.add_argument(
                "--celery-worker",
                action="store_true",
                help="run a Celery worker only (workers.executor celery): it takes the jobs the sweeps of "
                "another 'work' process queue on the broker; no scheduler, no HTTP",
            )
        p.set_defaults(handler=run_node, role=role)

    e: argparse.ArgumentParser = subparsers.add_parser(
        "echo",
        help="C-ECHO (or DICOMweb probe) a configured destination",
        description="Verify a destination: C-ECHO for DIMSE, a probe for DICOMweb; exit 0 if it answers.",
    )
    _common(e)
    e.add_argument("destination", help="the destination's name in the config")
    e.set_defaults(handler=run_echo)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config file, YAML or TOML (default: $DICOMNODE_CONFIG)")


def load(args: argparse.Namespace) -> Settings:
    """The validated settings of ``--config`` / ``$DICOMNODE_CONFIG`` (ConfigError naming the field)."""
    from dicomnode.config import load_settings

    path = args.config
    if path is None and os.environ.get("DICOMNODE_CONFIG"):
        path = Path(os.environ["DICOMNODE_CONFIG"])
    settings = load_settings(path)
    port = getattr(args, "http_port", None)
    if port is not None:
        if not 1 <= port <= 65535:
            raise ConfigError(f"config: --http-port: {port} is not a port number")
        settings = settings.model_copy(update={"http": settings.http.model_copy(update={"port": port})})
    workers: dict[str, float] = {}
    for flag, key in (("delivery_lease", "delivery_lease_seconds"), ("stale_job", "stale_job_seconds")):
        value = getattr(args, flag, None)
        if value is not None:
            if not 0 < value <= 86400:
                raise ConfigError(f"config: --{flag.replace('_', '-')}: must be > 0 and <= 86400 seconds")
            workers[key] = float(value)
    if workers:
        settings = settings.model_copy(update={"workers": settings.workers.model_copy(update=workers)})
    return settings


def run_echo(args: argparse.Namespace) -> int:
    """``dicomnode echo DEST``."""
    from dicomnode import delivery

    try:
        settings = load(args)
        try:
            dest = settings.destination(args.destination)
        except KeyError:
            known = ", ".join(settings.destination_names) or "none configured"
            raise ConfigError(
                f"config: destinations: no destination named {args.destination!r} ({known})"
            ) from None
    except ConfigError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    result = delivery.echo(dest, calling_ae_title=settings.dicom.ae_title)
    status = "OK" if result.ok else "FAILED"
    print(f"echo {args.destination}: {status} in {result.elapsed_s:.3f} s: {result.message}")
    return EXIT_OK if result.ok else EXIT_FAILURE


@dataclass
class Node:
    """The parts of one running node process (built by :func:`build_node`, stopped by :meth:`stop`)."""

    role: str
    settings: Settings
    store: Any
    app: Any
    scp: Any = None
    runner: Any = None
    executor: Any = None
    scheduler: Any = None
    analyzer: Any = None
    server: Any = None
    server_thread: threading.Thread | None = None
    close_spool: Callable[[], None] | None = None
    stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start listeners, recovery, scheduler and workers (HTTP last: health means everything is up)."""
        if self.scp is not None:
            self.scp.start()
        if self.runner is not None:
            self.runner.recover()
            if self.analyzer is not None:
                self.analyzer.start(warm=True)
            self.executor.start()
            self.scheduler.start()
        self._start_http()
        log.info("dicomnode %s running (pid %d)", self.role, os.getpid())

    def _start_http(self) -> None:
        import uvicorn

        from dicomnode.tls import uvicorn_options

        cfg = uvicorn.Config(
            self.app,
            host=self.settings.http.host,
            port=self.settings.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            **uvicorn_options(self.settings.http),  # HTTPS and trusted reverse proxies (dicomnode.tls)
        )
        self.server = uvicorn.Server(cfg)
        # In a thread: uvicorn then leaves the signal handlers to us (it would re-raise them after its own
        # shutdown, killing the process before the workers and the SCP were stopped).
        self.server_thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.server_thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.server_thread.is_alive():
                raise DicomnodeError(
                    f"HTTP server could not start on {self.settings.http.host}:{self.settings.http.port}"
                )
            if time.monotonic() > deadline:
                raise DicomnodeError("HTTP server did not start within 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Graceful stop: stop accepting, stop the sweeps, let workers finish their step, close the store."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        log.info("dicomnode %s stopping", self.role)
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.runner is not None:
            self.runner.release_sweeps()  # another 'work' process takes the sweeps over at once
        if self.executor is not None:
            self.executor.stop(timeout=30)
        if self.analyzer is not None:
            self.analyzer.stop()
        if self.server is not None:
            self.server.should_exit = True
            if self.server_thread is not None:
                self.server_thread.join(timeout=10)
        if self.close_spool is not None:  # its temp files made ahead, its recording connection if its own
            self.close_spool()
        self.store.close()


def build_node(
    settings: Settings,
    role: str,
    *,
    analysis_in_process: bool = False,
    delivery_lease_s: float | None = None,
    stale_job_s: float | None = None,
    analyze: Any = None,
) -> Node:
    """Create every part of a node process for ``role`` ("serve", "receive" or "work"); nothing started.

    Parameters
    ----------
    settings
        Validated settings.
    role
        Which parts to build.
    analysis_in_process
        Run the analysis in the worker thread (default: in a pool of child processes).
    delivery_lease_s, stale_job_s
        See :class:`dicomnode.pipeline.runner.Runner`; None = ``workers.delivery_lease_seconds`` /
        ``workers.stale_job_seconds`` of the settings (the CLI flags are folded into those by :func:`load`).
    analyze
        An analysis callable replacing the real one (tests).
    """
    from dicomnode.store import Store, make_engine, upgrade
    from dicomnode.web.app import create_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    store = Store(engine)
    # The one rules provider: the runner routes with it, the admin UI shows and edits it. A version saved
    # in the UI applies to the next routing decision, in this process and in any other on the same database.
    from dicomnode.pipeline.rules_in_force import RulesInForce

    rules = RulesInForce(store, settings)
    routers: list[Any] = []
    readiness: list[tuple[str, Any]] = [
        ("database", lambda: None if store.ping() else "database unreachable")
    ]
    node = Node(role=role, settings=settings, store=store, app=None)

    if role in ("serve", "receive"):
        from dicomnode.ingest.scp import StorageSCP
        from dicomnode.ingest.stow import build_stow_router

        # dicom.durability: flushed before the answer (power, on the node's engine) or not (process, on a
        # recording connection of its own); STOW-RS stores through the same spool, so it follows too.
        spool, node.close_spool = build_spool(settings, engine)
        processes = settings.dicom.receive_process_count
        if processes > 1:
            # Several receiving processes on the DICOM port(s), each with its own spool writer and group
            # commit (dicomnode.ingest.processes); STOW-RS stays in this process, on this spool.
            from dicomnode.ingest.processes import ReceiverPool

            node.scp = ReceiverPool(settings, receiver_spool, processes)
        else:
            node.scp = StorageSCP.from_settings(settings.dicom, spool)
        routers.append(build_stow_router(spool))
        scp = node.scp
        readiness.append(("dicom", lambda: None if scp.is_listening else "DICOM listener not started"))

    if role in ("serve", "work"):
        from dicomnode.pipeline.executors import (
            CeleryExecutor,
            LocalExecutor,
            ProcessAnalyzer,
            job_function,
            make_celery_app,
        )
        from dicomnode.pipeline.runner import Runner
        from dicomnode.pipeline.scheduler import build_scheduler

        if analyze is None:
            from dicomnode.pipeline.measure import options_from_settings

            job = job_function(options_from_settings(settings))
            if analysis_in_process or settings.workers.executor == "celery":
                analyze = job
            else:
                node.analyzer = ProcessAnalyzer(settings.workers.count, fn=job)
                analyze = node.analyzer
        runner = Runner(
            settings,
            store,
            analyze=analyze,
            select=rules.select,
            delivery_lease_s=(
                delivery_lease_s if delivery_lease_s is not None else settings.workers.delivery_lease_seconds
            ),
            stale_job_s=stale_job_s if stale_job_s is not None else settings.workers.stale_job_seconds,
        )
        if settings.workers.executor == "celery":
            assert settings.workers.broker_url is not None  # validated by the settings
            node.executor = CeleryExecutor(make_celery_app(settings.workers.broker_url), store=store)
        else:
            node.executor = LocalExecutor(runner, settings.workers.count)
        runner.on_jobs_created = node.executor.wake
        node.runner = runner
        node.scheduler = build_scheduler(runner)
        sched = node.scheduler
        readiness.append(("scheduler", lambda: None if sched.running else "scheduler not running"))

    node.app = create_app(settings, store, role=role, routers=routers, readiness=readiness, rules=rules)
    if node.runner is not None and hasattr(node.app.state, "web"):
        node.app.state.web.actions.on_jobs_created = node.executor.wake
    return node


def build_spool(settings: Settings, engine: Any = None) -> tuple[Any, Callable[[], None]]:
    """The spool of received instances (C-STORE and STOW-RS) as the settings ask, and what closes it.

    ``dicom.durability`` decides what a success status promises: ``power`` flushes the files and directories
    (the spool's ``fsync``) and records over a ``synchronous=FULL`` SQLite connection; ``process`` flushes
    nothing and records over a ``synchronous=NORMAL`` one (WAL: survives a crash of the process, not a power
    loss). Only the recording connection changes: the node's other commits (jobs, deliveries, accounts) stay
    ``FULL``. PostgreSQL commits are left as the server does them (flushed) in both modes.

    Parameters
    ----------
    settings
        The node's settings (``dicom`` section, spool directory, database URL).
    engine
        The node's engine, recorded over when it has the synchronous setting wanted (``power``, or
        PostgreSQL); None, or a different setting wanted: a new engine of the spool's own, disposed by the
        returned ``close`` (the database must be migrated already).
    """
    from dicomnode.ingest import Spool
    from dicomnode.pipeline.sink import StoreSink
    from dicomnode.store import Store, make_engine
    from dicomnode.store.engine import SYNCHRONOUS_FULL, SYNCHRONOUS_NORMAL

    flush = settings.dicom.flush_to_device
    own = engine is None or (not flush and engine.dialect.name == "sqlite")
    if own:
        synchronous = SYNCHRONOUS_FULL if flush else SYNCHRONOUS_NORMAL
        engine = make_engine(settings.database_url_resolved(), sqlite_synchronous=synchronous)
    spool = Spool(
        settings.spool_dir,
        StoreSink(Store(engine)),
        free_space_floor_mb=settings.dicom.free_space_floor_mb,
        other_classes=settings.dicom.accept_other_storage_classes,
        fsync=flush,
    )

    def close() -> None:
        spool.close()
        if own:
            engine.dispose()

    return spool, close


def receiver_spool(settings: Settings) -> tuple[Any, Callable[[], None]]:
    """A receiving process's spool over its own database connection, and what closes both.

    The :data:`dicomnode.ingest.processes.SpoolFactory` of ``serve``/``receive`` with several receiving
    processes: called in each of them (the database was migrated by the node's process before).
    """
    return build_spool(settings)


def check_analysis(settings: Settings) -> list[str]:
    """Start-up check of the analysis configuration (``serve``/``work``).

    Every model bundle the settings name (``analysis.backend``, ``segmentation_backend``,
    ``bmd_estimator``) is verified (:func:`dicomnode.ml.bundle.validate_bundles`: manifest, SHA-256), loaded,
    and checked for the right task and an input spec the node's CT series can meet. Nothing is loaded when
    only the built-in methods are configured.

    Returns
    -------
    list of str
        One line per part in use (for the log).

    Raises
    ------
    BundleError, ConfigError
        One line naming the bundle (or setting) and the reason.
    """
    from dicomnode.pipeline.measure import check_options, options_from_settings

    options = options_from_settings(settings)
    if not options.bundles():
        return [f"segmentation {options.segmentation}, vBMD {options.bmd_estimator}"]
    from dicomnode.ml.bundle import validate_bundles

    validate_bundles(settings)
    return check_options(options)


def run_node(args: argparse.Namespace) -> int:
    """``dicomnode serve|receive|work``: build, start, wait for SIGTERM/SIGINT, stop."""
    try:
        settings = load(args)
    except ConfigError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from dicomnode.tls import check_settings

    tls_problems = check_settings(settings)  # an expired or mismatched certificate: refuse now, one line each
    for line in tls_problems:
        print(f"dicomnode: {line}", file=sys.stderr)
    if tls_problems:
        return EXIT_CONFIG
    if not log.isEnabledFor(logging.DEBUG):
        # Lines per sweep tick (run, skipped while the previous one still runs) are noise; -vv shows them.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        # pynetdicom logs every association and C-STORE at INFO: thousands of lines per study.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        stop.set()

    if args.role in ("serve", "work"):
        # A tampered bundle, or one whose input spec the node's series cannot meet, is refused now, with
        # one line naming it, not at the first study in the night.
        try:
            for line in check_analysis(settings):
                log.info("analysis %s", line)
        except DicomnodeError as exc:
            print(f"dicomnode {args.role}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if getattr(args, "celery_worker", False):
        return run_celery_worker(settings)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    node: Node | None = None
    try:
        node = build_node(
            settings,
            args.role,
            analysis_in_process=getattr(args, "analysis_in_process", False),
        )
        node.start()
        from dicomnode.tls import listeners_line

        print(f"dicomnode {args.role}: {listeners_line(settings, dicom=node.scp is not None)}", flush=True)
        while not stop.wait(1.0):
            if node.server_thread is not None and not node.server_thread.is_alive():
                log.error("HTTP server stopped unexpectedly")
                return EXIT_FAILURE
        return EXIT_OK
    except ConfigError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DicomnodeError, OSError) as exc:
        print(f"dicomnode {args.role}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if node is not None:
            node.stop()
        for s, h in previous.items():
            signal.signal(s, h)


def run_celery_worker(settings: Settings) -> int:
    """``dicomnode work --celery-worker``: a Celery worker running :meth:`Runner.run_next_job` tasks.

    Celery handles SIGTERM itself (warm shutdown: the task in progress finishes; tasks are acknowledged late,
    so one lost with a killed worker is delivered again, and its job is reset by the recovery sweep).
    """
    if settings.workers.executor != "celery" or not settings.workers.broker_url:
        print(
            "dicomnode: config: workers.executor: must be 'celery' (with broker_url) for --celery-worker",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from dicomnode.pipeline.executors import configure_celery_worker, job_function, make_celery_app
    from dicomnode.pipeline.measure import options_from_settings
    from dicomnode.pipeline.runner import Runner
    from dicomnode.store import Store, make_engine, upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url_resolved())
    upgrade(engine)
    store = Store(engine)
    configure_celery_worker(Runner(settings, store, analyze=job_function(options_from_settings(settings))))
    app = make_celery_app(settings.workers.broker_url)
    try:
        app.worker_main(
            [
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(settings.workers.count),
                "--loglevel",
                "INFO",
            ]
        )
    finally:
        store.close()
    return EXIT_OK
