"""Event-driven reactors for pynetdicom 3.0.4: the receiver's one patch of pynetdicom internals.

Why it exists: pynetdicom 3.0 runs two polling loops per association that sleep 1 ms whenever they find
nothing to do; a synchronous C-STORE pays that twice per instance plus the scheduling jitter of both sleeps,
which capped the SCP's ingest rate (see the comment below and ``benchmarks/ingest.py``). The patch keeps
pynetdicom's loops and state machine as they are and only replaces the sleeps by waits that end when there is
work. The two loops are *copies* of pynetdicom 3.0.4's private ``DULServiceProvider.run_reactor`` and
``Association._run_reactor``, so the patch is applied on exactly that version only (any other keeps the stock
loops), and ``tests/unit/test_ingest_reactors.py`` pins the installed version and the source of the copied
functions: a pynetdicom upgrade fails that test until the copies are compared with the new loops.

The SCP applies it at start-up (:func:`enable_event_driven_reactors`), never at import.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
from typing import Any, cast

import pynetdicom
from pynetdicom import evt

log = logging.getLogger(__name__)
#: The association reactor copied below logs where pynetdicom's does, so its messages stay in the same stream.
_ASSOC_LOGGER = logging.getLogger("pynetdicom.association")
_DUL_LOGGER = logging.getLogger("pynetdicom.dul")


# -- event-driven reactors ------------------------------------------------------------------------------
#
# pynetdicom 3.0 runs two polling loops per association: the DUL reactor (network side) sleeps
# ``_run_loop_delay`` (1 ms) whenever it finds nothing to do, and the association reactor (service side)
# sleeps 1 ms before every look at its message queue. A synchronous C-STORE (the sender waits for each
# response) therefore pays up to ~1 ms to notice the request, ~1 ms to notice the handler's response and the
# scheduling jitter of both sleeps on a loaded machine. The patch below keeps pynetdicom's loops and state
# machine exactly as they are and only replaces those sleeps by waits that end as soon as there is work:
#
# * the DUL reactor waits in ``select()`` on the peer socket and on a self-pipe (a socket pair) that every
#   put into its ``event_queue`` / ``to_provider_queue`` from another thread, and every kill request, writes a
#   byte to;
# * the association reactor waits on a ``threading.Event`` that the DUL reactor sets after each state-machine
#   action (the only place where DIMSE messages and ACSE primitives are queued for it) and when it exits.
#
# Both waits are capped at ``_MAX_IDLE_WAIT_S`` so the timers pynetdicom checks in those loops (ARTIM, network
# idle timeout) and anything not covered by a wake-up still run, just as before but less often when idle.
# The patch is version-guarded: on any pynetdicom other than 3.0.4 it does nothing and the stock loops run.

#: The pynetdicom version whose private reactor loops are copied below.
SUPPORTED_PYNETDICOM = "3.0.4"
_MAX_IDLE_WAIT_S = 0.05
_REACTORS_LOCK = threading.Lock()
_REACTORS_PATCHED = False


class _Waker:
    """A self-pipe: a byte written to ``w`` makes ``select()`` on ``r`` return."""

    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)

    def wake(self) -> None:
        # Buffer full: a wake-up is already pending; closed: the reactor has ended. Either way, nothing to do.
        with contextlib.suppress(OSError):
            self.w.send(b"\0")

    def drain(self) -> None:
        try:
            while self.r.recv(4096):
                pass
        except OSError:  # BlockingIOError once empty
            pass

    def close(self) -> None:
        self.r.close()
        self.w.close()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that wakes its DUL reactor when another thread puts something in it."""

    def __init__(self, waker: _Waker, owner: threading.Thread) -> None:
        super().__init__()
        self._waker = waker
        self._owner = owner

    def _put(self, item: Any) -> None:
        super()._put(item)
        # The reactor's own puts need no wake-up (it is running, not waiting); skipping them saves a syscall.
        if threading.current_thread() is not self._owner:
            self._waker.wake()


def _notify_assoc(dul: Any) -> None:
    event = getattr(dul.assoc, "_dn_wake", None)
    if event is not None:
        event.set()


def _dul_wait(dul: Any, waker: _Waker) -> None:
    """Block until the peer socket is readable, another thread has queued work, or the cap elapses."""
    rlist: list[Any] = [waker.r]
    asock = dul.socket
    sock = getattr(asock, "socket", None) if asock is not None else None
    if sock is not None and getattr(asock, "_is_connected", False):
        # A TLS socket may hold decrypted bytes that select() cannot see.
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():
            return
        rlist.append(sock)
    try:
        ready, _, _ = select.select(rlist, [], [], _MAX_IDLE_WAIT_S)
    except (OSError, ValueError):  # socket closed under us, or an fd select() cannot take: stock behaviour
        time.sleep(dul._run_loop_delay)
        return
    if waker.r in ready:
        waker.drain()


def _install_reactors() -> None:
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu import A_ABORT_RQ

    original_init = DULServiceProvider.__init__
    original_kill = DULServiceProvider.kill_dul

    def dul_init(self: DULServiceProvider, assoc: Association) -> None:
        original_init(self, assoc)
        waker = _Waker()
        self._dn_waker = waker  # type: ignore[attr-defined]
        # Nothing has been queued yet (the socket is attached after construction), so swapping is safe.
        self.event_queue = _WakingQueue(waker, self)
        self.to_provider_queue = _WakingQueue(waker, self)
        assoc._dn_wake = threading.Event()  # type: ignore[attr-defined]

    def kill_dul(self: DULServiceProvider) -> None:
        original_kill(self)
        self._dn_waker.wake()  # type: ignore[attr-defined]

    def stop_dul(self: DULServiceProvider) -> bool:
        # As pynetdicom's, plus the wake-up so the reactor sees the flag now rather than after its wait.
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._dn_waker.wake()  # type: ignore[attr-defined]
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    def dul_run_reactor(self: DULServiceProvider) -> None:
        # pynetdicom 3.0.4 DULServiceProvider.run_reactor with time.sleep() replaced by _dul_wait().
        waker: _Waker = self._dn_waker  # type: ignore[attr-defined]
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    _dul_wait(self, waker)
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    _DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                    _DUL_LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
                # State-machine actions are where DIMSE messages and ACSE primitives are queued for the
                # association reactor: wake it.
                _notify_assoc(self)
        finally:
            _notify_assoc(self)
            waker.close()

    def assoc_run_reactor(self: Association) -> None:
        # pynetdicom 3.0.4 Association._run_reactor with time.sleep(0.001) replaced by an event wait.
        wake: threading.Event = self._dn_wake  # type: ignore[attr-defined]
        self._is_paused = False
        while not self._kill:
            # Paused while waiting: a thread that wants the reactor paused (send_*(), release()) need not
            # wait for the wait to end; the checkpoint below still holds us before we touch any queue.
            self._is_paused = True
            if self.dimse.msg_queue.empty():
                wake.wait(_MAX_IDLE_WAIT_S)
            wake.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False
            # A thread that paused the reactor (checkpoint cleared) while we were leaving the wait above saw
            # ``_is_paused`` still True and went ahead: it owns the queues now (a send_*() waiting for its
            # response), so go back to waiting instead of taking its message. pynetdicom's own loop has the
            # same window; its 1 ms sleeps made a response arrive too late to hit it, event-driven waits do
            # not.
            if not self._reactor_checkpoint.is_set():
                continue

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    DULServiceProvider.__init__ = dul_init  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = kill_dul  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = stop_dul  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = dul_run_reactor  # type: ignore[method-assign]
    Association._run_reactor = assoc_run_reactor  # type: ignore[method-assign]


def enable_event_driven_reactors() -> bool:
    """Replace pynetdicom's 1 ms polling sleeps by event-driven waits (see the comment above).

    Applies to associations created after the call (acceptor and requestor). Safe to call more than once and
    from several threads. Only pynetdicom 3.0.4 is patched: the code mirrors that version's reactor loops.

    Returns
    -------
    bool
        True when the event-driven reactors are (now) in place, False on another pynetdicom version (the stock
        polling loops stay).
    """
    global _REACTORS_PATCHED
    with _REACTORS_LOCK:
        if _REACTORS_PATCHED:
            return True
        if pynetdicom.__version__ != SUPPORTED_PYNETDICOM:
            log.info("pynetdicom %s: keeping its polling reactors", pynetdicom.__version__)
            return False
        _install_reactors()
        _REACTORS_PATCHED = True
        log.debug("event-driven reactors enabled for pynetdicom %s", pynetdicom.__version__)
        return True


def event_driven_reactors_enabled() -> bool:
    """Whether :func:`enable_event_driven_reactors` has patched pynetdicom in this process."""
    return _REACTORS_PATCHED
