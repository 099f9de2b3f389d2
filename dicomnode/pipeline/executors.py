"""Who runs the jobs: the analysis step itself, in-process worker threads, a process pool, Celery.

* :func:`analyze_job` - the real analysis step: ``dicomnode.pipeline.analyze.analyze_path`` on the job's
  input folder, turned into an :class:`~dicomnode.pipeline.runner.AnalysisOutcome`.
* :class:`ProcessAnalyzer` - runs an analysis function in a pool of child processes, so a long analysis never
  holds the interpreter lock of the process that receives images (children die with their parent).
* :class:`LocalExecutor` - N worker threads that claim jobs from the database and run them.
* :class:`CeleryExecutor` - hands "run the next job" to Celery workers (broker from the settings); the task
  calls the very same :meth:`Runner.run_next_job`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import multiprocessing
import signal
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from dicomnode.domain import AnalysisStatus, ResultFiles
from dicomnode.pipeline.runner import AnalysisOutcome, AnalysisRequest, AnalyzeFn, Runner, make_worker_id

if TYPE_CHECKING:
    from dicomnode.pipeline.measure import AnalysisOptions

log = logging.getLogger(__name__)

__all__ = ["CeleryExecutor", "LocalExecutor", "ProcessAnalyzer", "analyze_job", "job_function"]


def analyze_job(request: AnalysisRequest, options: AnalysisOptions | None = None) -> AnalysisOutcome:
    """The real analysis step: ``analyze_path`` on the job's files, outputs into ``request.out_dir``.

    The series is the one routing chose (``request.series_instance_uid``): no rule is evaluated again.

    ``options`` are the node's analysis settings (:func:`dicomnode.pipeline.measure.options_from_settings`);
    bind them with :func:`job_function`. Never raises for bad input; the status and reason say what happened.
    """
    from dicomnode.pipeline.analyze import analyze_path

    if request.pipeline == "knee-xray":  # founding study (e): knee radiographs, not the CT measurement
        from dicomnode.pipeline.knee import analyze_knee_job

        return analyze_knee_job(request, options)
    run = analyze_path(
        request.input_dir,
        request.out_dir,
        job_key=request.job_key,
        version=request.version,
        disclaimer=request.disclaimer,
        write_png=True,
        options=options,
        previous_reports=request.previous_reports,
        series_instance_uid=request.series_instance_uid,
        selection=request.selection,
        lab_values=request.lab_values,
    )
    if run.error is not None:
        log.error("job %d: analysis error: %r", request.job_id, run.error)
    o = run.outputs
    outputs = ResultFiles()
    if o is not None:
        sr = str(o.sr) if o.sr is not None else None
        outputs = ResultFiles(str(o.result_json), sr, tuple(map(str, o.sc)), tuple(map(str, o.png)))
    return AnalysisOutcome(
        status=run.result.status,
        reason=run.result.reason,
        result_json=run.result.to_json_dict(),
        outputs=outputs,
    )


def job_function(options: AnalysisOptions | None) -> AnalyzeFn:
    """:func:`analyze_job` bound to the node's analysis options (picklable: it runs in pool children)."""
    if options is None:
        return analyze_job
    return functools.partial(analyze_job, options=options)


# -- analysis in child processes ------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_init() -> None:
    """Runs in each pool child: die with the parent, ignore Ctrl-C (the parent decides when to stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # Linux: a SIGKILLed parent must not leave an orphan analysis running on
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # another OS: children exit when their task pipe closes
        pass


def _warm() -> bool:
    """Import the analysis stack once in the child (the first job then does not pay for it)."""
    import dicomnode.bmd
    import dicomnode.pipeline.analyze
    import dicomnode.report  # noqa: F401

    return True


def _log_warm_failure(future: concurrent.futures.Future[bool]) -> None:
    exc = future.exception()
    if exc is not None:  # warming is an optimisation; the first job will tell the real story
        log.warning("analysis process warm-up failed: %s", exc)


class ProcessAnalyzer:
    """Runs an analysis function (default :func:`analyze_job`) in a pool of ``workers`` child processes.

    The pool is created (and warmed) by the thread that calls :meth:`start`, which must live as long as the
    pool (the main thread): on Linux the children get SIGKILL when that thread's process dies.
    """

    def __init__(self, workers: int = 1, fn: AnalyzeFn = analyze_job) -> None:
        self.workers = workers
        self.fn = fn
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self, warm: bool = True) -> None:
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            pool = self._pool
        if warm:
            # Submitted from this thread (so the children are its children), not waited for: the node is up
            # while the children import the analysis stack.
            for _ in range(self.workers):
                pool.submit(_warm).add_done_callback(_log_warm_failure)

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")  # never fork a process with threads and sockets
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=ctx, initializer=_child_init
        )

    def __call__(self, request: AnalysisRequest) -> AnalysisOutcome:
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            pool = self._pool
        try:
            return pool.submit(self.fn, request).result()
        except BrokenProcessPool:
            # The child died (out of memory, killed): fail this job, start a fresh pool for the next.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            return AnalysisOutcome(
                AnalysisStatus.FAILED,
                "the analysis process died (out of memory or killed)",
                {"status": "failed", "reason": "analysis process died"},
            )

    def stop(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


# -- executors ---------------------------------------------------------------------------------------------


class LocalExecutor:
    """``count`` worker threads claiming jobs from the database and running them with ``runner``.

    Workers sleep until :meth:`wake` (called when a sweep created jobs) or ``poll_s`` passed.
    """

    def __init__(self, runner: Runner, count: int = 1, *, poll_s: float = 1.0) -> None:
        self.runner = runner
        self.count = count
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        for i in range(self.count):
            t = threading.Thread(target=self._loop, args=(make_worker_id(f"t{i}"),), name=f"worker-{i}")
            t.daemon = True
            t.start()
            self._threads.append(t)
        log.info("%d local worker(s) started", self.count)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self, worker_id: str) -> None:
        while not self._stop.is_set():
            try:
                job_id = self.runner.run_next_job(worker_id)
            except Exception:  # the database hiccuped; never let a worker thread die
                log.exception("worker %s: step failed", worker_id)
                job_id = None
            if job_id is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the workers to stop after their current job, and wait up to ``timeout`` seconds."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()


#: Set in a Celery worker process by :func:`configure_celery_worker`.
_CELERY_RUNNER: Runner | None = None


def configure_celery_worker(runner: Runner) -> None:
    """Give the Celery task of this process its runner (called once when a Celery worker starts)."""
    global _CELERY_RUNNER
    _CELERY_RUNNER = runner


def run_next_job_task() -> int:
    """The Celery task body: the step the local workers run, repeated while PENDING jobs are left.

    Draining makes a task sent once too often a no-op, and one sent too few made up by any other.
    Returns how many jobs this task ran.
    """
    if _CELERY_RUNNER is None:
        raise RuntimeError("the Celery worker has no runner (configure_celery_worker was not called)")
    worker_id = make_worker_id("celery")
    n = 0
    while _CELERY_RUNNER.run_next_job(worker_id) is not None:
        n += 1
    return n


def make_celery_app(broker_url: str, *, name: str = "dicomnode") -> Any:
    """A Celery app with one task, ``dicomnode.run_next_job`` (no result backend: the database decides)."""
    from celery import Celery

    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_acks_late=True,  # a worker killed mid-task leaves the message for another one
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="dicomnode.run_next_job")(run_next_job_task)
    return app


class CeleryExecutor:
    """Sends "run the pending jobs" tasks to Celery (workers may run on other hosts).

    One task per PENDING job, at most ``max_tasks`` per wake. A task runs jobs until none is left, so one
    sent too many is a no-op and one too few is made up by the others, or by the next wake (every sweep that
    creates jobs, and every recovery sweep while jobs are pending: a broker that was down is caught up).
    """

    def __init__(self, app: Any, *, store: Any, max_tasks: int = 8) -> None:
        self.app = app
        self.store = store
        self.max_tasks = max_tasks

    def start(self) -> None:
        log.info("Celery executor: jobs go to the broker at %s", self.app.conf.broker_url)

    def wake(self) -> None:
        from dicomnode.domain import JobState

        try:
            pending = self.store.list_jobs(state=JobState.PENDING, limit=1).total
            for _ in range(min(pending, self.max_tasks)):
                self.app.send_task("dicomnode.run_next_job")
        except Exception as exc:  # broker down: the jobs stay PENDING and the next wake sends them
            log.warning("Celery broker unreachable: %s", exc)

    def stop(self, timeout: float = 30.0) -> None:
        return None
