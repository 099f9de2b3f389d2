"""Several processes receiving C-STORE on one port (``dicom.receive_processes`` > 1).

Why: one Python process serialises its associations on one interpreter lock; with four parallel
associations the receiver used one core of two while the group commit waited for it
(``benchmarks/ingest.py``).
Here the node's process binds the DICOM port(s) once (plain and TLS) and starts ``N`` receiving processes
(``multiprocessing`` "spawn": nothing of the parent's threads or connections is inherited). Each accepts on
the shared listening socket and runs the same :class:`~dicomnode.ingest.scp.StorageSCP` with its own
:class:`~dicomnode.ingest.spool.Spool` (its own group commit) and its own database connection.

The guarantee does not change: a receiving process answers 0x0000 only once the file is flushed under its
final name and the record committed, so a kill -9 of a receiving process, or of the node's process, loses
nothing acknowledged (``tests/integration/test_ingest_processes.py``). What the processes share
(:class:`SharedReceivers`, one array of shared memory in which each process writes only its own record):

* the peer addresses of their established associations, so ``max_associations`` and
  ``max_associations_per_address`` hold for the node as a whole (admission under a file lock, which the kernel
  releases if a process dies holding it); ``max_pending_connections_per_address`` is counted per process;
* their open connections: a process with more open connections than another lets it accept first (up to
  50 ms), so four associations land two and two on two processes rather than by chance;
* the ingest counters (instances by result, bytes, associations rejected): the node's process adds them to its
  own Prometheus counters every second, so ``/metrics`` shows the node's totals.

Lifecycle: a receiving process that ends (crash, kill) is replaced within a second (after 5 s when it ended
within 5 s of its start); the receiving processes stop when the node's process stops them (SIGTERM to
``serve``/``receive``), and on their own when the node's process dies (kill -9): no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import DicomnodeError

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Event as MpEvent

    from dicomnode.config import Settings
    from dicomnode.ingest.spool import Spool

LOGGER = logging.getLogger(__name__)

# One record per receiving process in the shared array: these fields, then the address slots.
_CONNECTIONS, _USED, _STORED, _IGNORED, _FAILED, _BYTES, _REJECTED, _PID = range(8)
_FIXED = 8
_RESULTS = {"stored": _STORED, "ignored": _IGNORED, "failed": _FAILED}
#: The open connections of a process that ended: never "fewer than mine", so nobody waits for it.
_GONE = 1 << 40
#: How long a process with more open connections lets the others accept a new one first.
BALANCE_WAIT_S = 0.05
#: A receiving process that ended within this many seconds of its start is restarted after as many.
RESTART_BACKOFF_S = 5.0
#: Backlog of the shared listening sockets (socketserver's default of 5 is for one process).
LISTEN_BACKLOG = 128


def _address_key(address: str) -> int:
    # Stable across processes (hash() of a str is salted per process); 0 marks an empty slot.
    key = int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "little", signed=True)
    return key or 1


class SharedReceivers:
    """What the receiving processes share (see the module docstring); created by the node's process.

    Parameters
    ----------
    processes
        Number of receiving processes (records in the array).
    slots
        Association addresses kept per process (the node's ``max_associations``: no process can hold more).
    lock_path
        A file whose lock serialises admissions (the kernel drops the lock of a process that dies).
    """

    def __init__(self, processes: int, slots: int, lock_path: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.processes = processes
        self.slots = slots
        self.stride = _FIXED + slots
        self.array: Any = ctx.RawArray(ctypes.c_int64, processes * self.stride)
        self.lock_path = str(lock_path)
        self.index = -1
        self._tlock = threading.Lock()
        self._lock_fd = -1
        self._folded = [[0] * _FIXED for _ in range(processes)]
        for i in range(processes):
            self.array[i * self.stride + _CONNECTIONS] = _GONE

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_tlock"]
        state["_lock_fd"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tlock = threading.Lock()

    # -- in a receiving process -------------------------------------------------------------------------
    def attach(self, index: int) -> None:
        """Take record ``index`` for this process (a replacement keeps the counts of the one it replaces)."""
        self.index = index
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        base = index * self.stride
        for i in range(self.slots):
            self.array[base + _FIXED + i] = 0
        self.array[base + _USED] = 0
        self.array[base + _PID] = os.getpid()
        self.array[base + _CONNECTIONS] = 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write_addresses(self, addresses: list[str]) -> None:
        base = self.index * self.stride
        keys = [_address_key(a) for a in addresses[: self.slots]]
        used = int(self.array[base + _USED])
        for i in range(max(used, len(keys))):
            self.array[base + _FIXED + i] = keys[i] if i < len(keys) else 0
        self.array[base + _USED] = len(keys)

    def admit(self, peer: str, identified: list[str], max_total: int, per_address: int) -> tuple[int, int]:
        """Count the associations open in all processes (``identified``: this process's, without the one
        asking) and take a slot for ``peer`` if both limits allow it. Returns (total, from that address)
        counted before it: the caller refuses when a limit is reached."""
        key = _address_key(peer)
        with self._locked():
            self._write_addresses(identified)
            total = same = 0
            for j in range(self.processes):
                base = j * self.stride
                used = int(self.array[base + _USED])
                for i in range(used):
                    total += 1
                    same += self.array[base + _FIXED + i] == key
            if total < max_total and same < per_address:
                self._write_addresses([*identified, peer])
        return total, same

    def publish(self, identified: list[str], connections: int) -> None:
        """This process's established associations (peer addresses) and open connections, after a change."""
        with self._locked():
            self._write_addresses(identified)
            self.array[self.index * self.stride + _CONNECTIONS] = connections

    def opened(self) -> None:
        """A connection was just accepted here (before its association thread exists)."""
        with self._tlock:
            self.array[self.index * self.stride + _CONNECTIONS] += 1

    def wait_turn(self) -> None:
        """Before accepting: while another process has fewer open connections, let it accept first."""
        me = self.index * self.stride + _CONNECTIONS
        deadline = time.monotonic() + BALANCE_WAIT_S
        while time.monotonic() < deadline:
            mine = self.array[me]
            if all(
                mine <= self.array[j * self.stride + _CONNECTIONS]
                for j in range(self.processes)
                if j != self.index
            ):
                return
            time.sleep(0.002)

    def count_instance(self, source: str, result: str, size_bytes: int) -> None:
        """:data:`dicomnode.ingest.prometheus.forward_instance` in a receiving process."""
        field = _RESULTS.get(result)
        if field is None or source != "dimse":
            return
        base = self.index * self.stride
        with self._tlock:
            self.array[base + field] += 1
            if size_bytes > 0:
                self.array[base + _BYTES] += size_bytes

    def count_rejection(self) -> None:
        """:data:`dicomnode.ingest.prometheus.forward_rejection` in a receiving process."""
        with self._tlock:
            self.array[self.index * self.stride + _REJECTED] += 1

    # -- in the node's process --------------------------------------------------------------------------
    def clear(self, index: int) -> None:
        """Process ``index`` ended: its associations are gone (its counts stay, for the metrics)."""
        base = index * self.stride
        self.array[base + _USED] = 0
        self.array[base + _CONNECTIONS] = _GONE

    def fold_metrics(self) -> None:
        """Add what the receiving processes counted since the last call to this process's counters."""
        from dicomnode.ingest import prometheus as metrics

        for j in range(self.processes):
            base = j * self.stride
            seen = self._folded[j]
            for field in (_STORED, _IGNORED, _FAILED, _BYTES, _REJECTED):
                now = int(self.array[base + field])
                delta, seen[field] = now - seen[field], now
                if delta <= 0:
                    continue
                if field == _BYTES:
                    metrics.BYTES.labels(source="dimse").inc(delta)
                elif field == _REJECTED:
                    metrics.ASSOCIATIONS_REJECTED.inc(delta)
                else:
                    result = next(k for k, v in _RESULTS.items() if v == field)
                    metrics.INSTANCES.labels(source="dimse", result=result).inc(delta)

    def pids(self) -> list[int]:
        """Process ids as the receiving processes wrote them (tests)."""
        return [int(self.array[j * self.stride + _PID]) for j in range(self.processes)]


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening, for the receiving processes to share."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


#: ``settings -> (spool, close)``: a receiving process's spool over its own database connection, and what
#: releases both. A module-level function (it is pickled to the process):
#: ``dicomnode.cli.node.receiver_spool``.
SpoolFactory = Callable[["Settings"], tuple["Spool", Callable[[], None]]]


@dataclass
class _ChildSpec:
    index: int
    settings: Settings
    spool_factory: SpoolFactory
    plain: socket.socket | None
    tls: socket.socket | None
    shared: SharedReceivers
    stop: MpEvent
    ready: MpEvent
    log_level: int
    pynetdicom_level: int


def _child_main(spec: _ChildSpec) -> None:
    """A receiving process: the SCP on the shared sockets until told to stop or the node's process ends."""
    # Ctrl-C reaches the whole process group: the node's process stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[receiver {spec.index}]: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(spec.pynetdicom_level)
    from dicomnode.ingest import prometheus as metrics
    from dicomnode.ingest.scp import StorageSCP, _acceptors

    settings, shared = spec.settings, spec.shared
    shared.attach(spec.index)
    metrics.forward_instance = shared.count_instance
    metrics.forward_rejection = shared.count_rejection
    spool, close = spec.spool_factory(settings)
    scp = StorageSCP.from_settings(
        settings.dicom, spool, listen_socket=spec.plain, tls_listen_socket=spec.tls, shared=shared
    )
    scp.start()
    spec.ready.set()
    parent = multiprocessing.parent_process()
    try:
        while not stop.is_set() and not spec.stop.wait(0.5):
            if parent is not None and not parent.is_alive():
                LOGGER.warning("the node's process ended: receiving process %d stops", spec.index)
                break
    finally:
        scp.stop()
        # Associations still open are aborted: an instance not yet answered is resent by its sender; one
        # being committed finishes first where it can (its answer may be lost: the resend overwrites it).
        for assoc in _acceptors():
            with contextlib.suppress(Exception):
                assoc.abort()
        deadline = time.monotonic() + 5.0
        for assoc in _acceptors():
            assoc.join(max(0.0, deadline - time.monotonic()))
        close()


class ReceiverPool:
    """The receiving processes of a node: the same interface as :class:`~dicomnode.ingest.scp.StorageSCP`
    for :class:`dicomnode.cli.node.Node` (``start``, ``stop``, ``is_listening``, ``port``, ``tls_port``).

    Parameters
    ----------
    settings
        The node's settings (``dicom`` section, spool directory, database URL).
    spool_factory
        Builds each receiving process's spool and database connection (:data:`SpoolFactory`).
    processes
        How many receiving processes (>= 1; ``dicom.receive_process_count``).
    start_timeout_s
        How long :meth:`start` waits for every process to listen.
    """

    def __init__(
        self,
        settings: Settings,
        spool_factory: SpoolFactory,
        processes: int,
        *,
        start_timeout_s: float = 60.0,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.settings = settings
        self.spool_factory = spool_factory
        self.processes = processes
        self.start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._plain: socket.socket | None = None
        self._tls: socket.socket | None = None
        self.shared: SharedReceivers | None = None
        self._procs: list[BaseProcess] = []
        self._started_at: list[float] = []
        self._not_before: list[float] = []
        self._stop_event: MpEvent | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the port(s), start the receiving processes and wait until each one listens.

        Raises
        ------
        DicomnodeError
            A process did not start (its log says why: database, certificate...); nothing stays running.
        """
        if self._procs:
            return
        dicom = self.settings.dicom
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        try:
            if dicom.port is not None:
                self._plain = listen(dicom.host, dicom.port)
            if dicom.tls is not None:
                self._tls = listen(dicom.host, dicom.tls.port)
        except OSError:
            self._close_sockets()
            raise
        self.shared = SharedReceivers(
            self.processes, dicom.max_associations, self.settings.spool_dir / ".receivers.lock"
        )
        self._stop_event = self._ctx.Event()
        self._stopping.clear()
        readies = []
        for i in range(self.processes):
            proc, ready = self._spawn(i)
            self._procs.append(proc)
            self._started_at.append(time.monotonic())
            self._not_before.append(0.0)
            readies.append(ready)
        deadline = time.monotonic() + self.start_timeout_s
        for i, ready in enumerate(readies):
            while not ready.wait(0.1):
                if not self._procs[i].is_alive() or time.monotonic() > deadline:
                    code = self._procs[i].exitcode
                    self.stop()
                    raise DicomnodeError(
                        f"receiving process {i} did not start (exit code {code}; see its log lines above)"
                    )
        self._watcher = threading.Thread(target=self._watch, name="dicomnode-receivers", daemon=True)
        self._watcher.start()
        LOGGER.info(
            "DICOM SCP %s: %d receiving processes (pids %s) on %s",
            dicom.ae_title,
            self.processes,
            ", ".join(str(p.pid) for p in self._procs),
            ", ".join(f"{dicom.host}:{p}" for p in (self.port, self.tls_port) if p is not None),
        )

    def _spawn(self, index: int) -> tuple[BaseProcess, MpEvent]:
        assert self.shared is not None and self._stop_event is not None
        ready = self._ctx.Event()
        root = logging.getLogger()
        spec = _ChildSpec(
            index=index,
            settings=self.settings,
            spool_factory=self.spool_factory,
            plain=self._plain,
            tls=self._tls,
            shared=self.shared,
            stop=self._stop_event,
            ready=ready,
            log_level=root.getEffectiveLevel(),
            pynetdicom_level=logging.getLogger("pynetdicom").getEffectiveLevel(),
        )
        proc = self._ctx.Process(target=_child_main, args=(spec,), name=f"dicomnode-receiver-{index}")
        proc.daemon = True  # also ended by multiprocessing when this process exits normally
        proc.start()
        return proc, ready

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                if self._stopping.is_set():
                    return
                self._restart_ended()
            self.fold_metrics()

    def _restart_ended(self) -> None:
        assert self.shared is not None
        now = time.monotonic()
        for i, proc in enumerate(self._procs):
            if proc.is_alive():
                continue
            if self._not_before[i] == 0.0:
                self.shared.clear(i)
                quick = now - self._started_at[i] < RESTART_BACKOFF_S
                self._not_before[i] = now + (RESTART_BACKOFF_S if quick else 0.0)
                LOGGER.warning(
                    "receiving process %d (pid %s) ended with exit code %s; starting another%s",
                    i,
                    proc.pid,
                    proc.exitcode,
                    f" in {RESTART_BACKOFF_S:.0f} s" if quick else "",
                )
            if now >= self._not_before[i]:
                self._procs[i], _ = self._spawn(i)
                self._started_at[i] = now
                self._not_before[i] = 0.0

    def fold_metrics(self) -> None:
        """Add the receiving processes' counts to this process's Prometheus counters (every second)."""
        if self.shared is not None:
            try:
                self.shared.fold_metrics()
            except Exception:  # metrics must never stop the watcher
                LOGGER.debug("could not fold the receivers' metrics", exc_info=True)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the receiving processes (each aborts its open associations) and release the port(s)."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        self._watcher = None
        with self._lock:
            if self._stop_event is not None:
                self._stop_event.set()
            deadline = time.monotonic() + timeout_s
            for proc in self._procs:
                proc.join(max(0.1, deadline - time.monotonic()))
            for proc in self._procs:
                if proc.is_alive():
                    LOGGER.warning("receiving process pid %s did not stop in time: killed", proc.pid)
                    proc.kill()
                    proc.join(5)
            self.fold_metrics()
            self._procs = []
            self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._plain, self._tls):
            if sock is not None:
                sock.close()
        self._plain = self._tls = None

    def pids(self) -> list[int]:
        """Process ids of the receiving processes (tests, the log)."""
        with self._lock:
            return [int(p.pid) for p in self._procs if p.pid is not None]

    @property
    def port(self) -> int | None:
        """The plain DICOM port (None = no plain listener)."""
        return int(self._plain.getsockname()[1]) if self._plain is not None else self.settings.dicom.port

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port (None = no TLS listener)."""
        if self._tls is not None:
            return int(self._tls.getsockname()[1])
        tls = self.settings.dicom.tls
        return tls.port if tls is not None else None

    @property
    def is_listening(self) -> bool:
        """Whether the port(s) are bound and at least one receiving process runs."""
        return (self._plain is not None or self._tls is not None) and any(
            p.is_alive() for p in list(self._procs)
        )

    def __enter__(self) -> ReceiverPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
