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
import io
import logging
import queue
import re
import select
import socket
import struct
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


def _wake_dul(dul: Any) -> None:
    # A DUL built before the patch was installed (an association already open then) has no waker and runs
    # pynetdicom's polling loop, which needs none; the patched kill/stop methods still reach it.
    waker = getattr(dul, "_dn_waker", None)
    if waker is not None:
        waker.wake()


def _dul_wait(dul: Any, waker: _Waker) -> None:
    """Block until the peer socket is readable, another thread has queued work, or the cap elapses."""
    if _buffered(dul):
        return  # the next PDU (or its start) is already read: no need to wait for the socket
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


# -- reading a PDU: bounded, in large reads, quiet about garbage --------------------------------------------
#
# pynetdicom 3.0.4's ``DULServiceProvider._read_pdu_data`` trusts the 4-byte length of whatever arrives: it
# reads that many bytes 4 KiB at a time into a growing bytearray (a 200 MB A-ASSOCIATE-RQ from anyone grows
# the process by hundreds of MB; a 512 KB image costs 128 Python-level reads, the receive path's largest CPU
# cost), blocks without a deadline on a peer that stops half-way, and logs every broken PDU at ERROR with a
# traceback. The copy below keeps its events (Evt17 closed, Evt19 invalid) and changes only that:
#
# * a PDU longer than the limit for its type is refused before anything is read: A-ASSOCIATE-RQ/AC at most
#   ``MAX_ACSE_PDU`` bytes, P-DATA-TF at most the maximum PDU length we announced (``MAX_PDATA_PDU`` when we
#   announced none), the short PDUs (release, abort, reject) at most ``MAX_SMALL_PDU``;
# * the body is read with ``recv_into`` into one buffer of the announced size (at most the limit), in reads
#   of up to 1 MiB, with a deadline of the association's network timeout (ACSE timeout before the
#   association is established) for the whole PDU;
# * protocol garbage (unknown PDU type, over-long or undecodable PDU, connection lost mid-PDU) is one WARNING
#   line without traceback, rate-limited process-wide (:class:`_GarbageLog`);
# * on a plain (non-TLS) socket, reads go through a per-association read-ahead buffer (:class:`_ReadAhead`):
#   each read takes whatever the socket holds (up to 1 MiB, several PDUs of a sender that streams its
#   P-DATA-TF), without the blocking-mode switches and the poll() that Python puts before every read of a
#   socket with a timeout. A 512 KB image in 128 KB PDUs cost about 35 system calls in the reactor (each
#   one a hand-over of the interpreter lock between the association's threads), now about 10. The reactor
#   does not wait on the socket while a PDU is buffered (:func:`_buffered`).

#: Largest A-ASSOCIATE-RQ/AC accepted: 128 presentation contexts with many transfer syntaxes fit in a tenth.
MAX_ACSE_PDU = 1 << 20
#: Largest P-DATA-TF accepted when we announced no maximum PDU length (0 = "unlimited" in PS3.8).
MAX_PDATA_PDU = 64 << 20
#: A-RELEASE, A-ABORT and A-ASSOCIATE-RJ are 4-byte PDUs; allow some slack.
MAX_SMALL_PDU = 1024
_READ_CHUNK = 1 << 20
_PDU_HEADER = struct.Struct(">BBL")


class _GarbageLog:
    """At most ``burst`` WARNING lines per ``period_s`` about protocol garbage; the rest are counted and
    reported in the next line that is let through."""

    def __init__(
        self,
        burst: int = 5,
        period_s: float = 60.0,
        template: str = "DICOM protocol error from %s: %s; connection dropped",
    ) -> None:
        self.burst = burst
        self.period_s = period_s
        self.template = template
        self._lock = threading.Lock()
        self._window_start = -1e18
        self._in_window = 0
        self._suppressed = 0

    def __call__(self, peer: str, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.period_s:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self.burst:
                self._suppressed += 1
                return
            self._in_window += 1
            suppressed, self._suppressed = self._suppressed, 0
        more = f" ({suppressed} similar lines suppressed)" if suppressed else ""
        log.warning(self.template + "%s", peer, what, more)


#: The process-wide limiter for protocol-garbage lines.
garbage_log = _GarbageLog()
#: The process-wide limiter for lines about connections and associations refused for a limit.
refusal_log = _GarbageLog(template="DICOM connection from %s refused: %s")


def _peer(dul: Any) -> str:
    try:
        return f"{dul.assoc.requestor.address}:{dul.assoc.requestor.port}"
    except Exception:  # the peer may not be known yet
        return "?"


def _pdu_limit(dul: Any, pdu_type: int) -> int:
    if pdu_type in (0x01, 0x02):
        return MAX_ACSE_PDU
    if pdu_type == 0x04:
        # What we announced as our Maximum Length Received: as acceptor (the SCP) or as requestor (an SCU).
        assoc = dul.assoc
        ours = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        announced = getattr(ours, "maximum_length", 0)
        return int(announced) if announced else MAX_PDATA_PDU
    return MAX_SMALL_PDU


class _ReadAhead:
    """Bytes read from a plain socket beyond the PDU being decoded: ``buf[start:end]``."""

    __slots__ = ("buf", "end", "start")

    def __init__(self) -> None:
        self.buf = bytearray(_READ_CHUNK)
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def fill(self, sock: socket.socket, need: int, deadline: float) -> bool:
        """Read until ``need`` bytes are buffered (reading whatever else has arrived too); False when the
        peer closed, stalled past ``deadline`` or the connection broke."""
        while self.end - self.start < need:
            if len(self.buf) - self.start < need:
                # Move what is buffered to the front, and grow for a PDU larger than the buffer.
                size = max(len(self.buf), need)
                kept = self.buf[self.start : self.end]
                if size > len(self.buf):
                    self.buf = bytearray(size)
                self.buf[: len(kept)] = kept
                self.start, self.end = 0, len(kept)
            try:
                k = sock.recv_into(memoryview(self.buf)[self.end :], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    ready, _, _ = select.select([sock], [], [], left)
                except (OSError, ValueError):
                    return False
                if not ready:
                    return False
                continue
            except OSError:
                return False
            if not k:
                return False
            self.end += k
        return True

    def take(self, n: int) -> bytearray:
        """The next ``n`` buffered bytes (``fill(n)`` succeeded)."""
        out = self.buf[self.start : self.start + n]
        self.skip(n)
        return out

    def skip(self, n: int) -> None:
        """Consume the next ``n`` buffered bytes (``fill(n)`` succeeded); they stay in place until the
        next :meth:`fill`."""
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0


def _buffered(dul: Any) -> bool:
    """Whether read-ahead bytes wait in ``dul``'s buffer (a PDU, or the start of one, already read)."""
    ahead = getattr(dul, "_dn_ahead", None)
    return ahead is not None and ahead.end > ahead.start


def _recv_into(sock: Any, view: memoryview, deadline: float) -> bool:
    """Fill ``view`` from ``sock`` (whose timeout the caller set) before ``deadline``; False when the peer
    closed, stalled or the connection broke."""
    got, n = 0, len(view)
    while got < n:
        if time.monotonic() > deadline:
            return False
        try:
            k = sock.recv_into(view[got:], min(n - got, _READ_CHUNK))
        except (TimeoutError, OSError):
            return False
        if not k:
            return False
        got += k
    return True


def _read_pdu_data(self: Any) -> None:
    # pynetdicom 3.0.4 DULServiceProvider._read_pdu_data, bounded (see the comment above).
    asock = self.socket
    sock = getattr(asock, "socket", None)
    if sock is None:
        self._dn_ahead = None
        self.event_queue.put("Evt17")
        return
    if getattr(self, "_dn_garbage", False):
        self._dn_ahead = None
        # The peer sent garbage and was answered with an A-ABORT: whatever it sends now is dropped with the
        # connection (the state machine sees Evt17), not read and reported PDU by PDU.
        asock.close()
        _release_acceptor(self)
        return
    assoc = self.assoc
    timeout = assoc.network_timeout if assoc.is_established else assoc.acse_timeout
    timeout = float(timeout) if timeout else 3600.0
    deadline = time.monotonic() + timeout
    if type(sock) is socket.socket:  # plain TCP (not TLS): through the read-ahead buffer
        ahead = getattr(self, "_dn_ahead", None)
        if ahead is None:
            ahead = self._dn_ahead = _ReadAhead()
        _read_pdu(self, sock, deadline, ahead)
        return
    try:
        sock.settimeout(timeout)
    except OSError:
        self.event_queue.put("Evt17")
        return
    try:
        _read_pdu(self, sock, deadline)
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


def _garbage(dul: Any, what: str, event: str = "Evt19") -> None:
    dul._dn_garbage = True
    garbage_log(_peer(dul), what)
    dul.event_queue.put(event)
    _release_acceptor(dul)


def _release_acceptor(dul: Any) -> None:
    """End an acceptor that is still waiting for the A-ASSOCIATE-RQ of a peer that is gone or broken.

    pynetdicom's acceptor thread waits for the request for the whole ACSE timeout even when the connection
    has already closed; the ``None`` it receives here is what it gets on that timeout, so it ends now and
    its thread (and the peer's pending-connection slot) is freed.
    """
    assoc = dul.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        dul.to_user_queue.put(None)


def _nul_padding_to_spaces(buf: bytearray) -> None:
    """Trailing NULs of the AE title fields of an A-ASSOCIATE-RQ read as the spaces PS3.8 asks for.

    Some devices pad AE titles with NUL bytes; pynetdicom refuses them with an ERROR line and a traceback.
    Read tolerantly: the title is what precedes the padding (then checked like any other).
    """
    for start in (10, 26):  # called, calling AE title: 16 bytes each after the 6-byte header and 4 bytes
        field = bytes(buf[start : start + 16])
        if field.endswith(b"\x00"):
            buf[start : start + 16] = field.rstrip(b"\x00").ljust(16, b" ")


def _read_pdu(self: Any, sock: Any, deadline: float, ahead: _ReadAhead | None = None) -> None:
    header = bytearray(6)
    if ahead is not None:
        got = ahead.fill(sock, 6, deadline)
        if got:
            header = ahead.buf[ahead.start : ahead.start + 6]  # taken with the body below
        else:
            self._dn_ahead = None
    else:
        got = _recv_into(sock, memoryview(header), deadline)
    if not got:
        # A peer that connects and closes (a port scan, a load balancer's probe) is not an event.
        _DUL_LOGGER.debug("connection closed before a PDU header was received")
        self.event_queue.put("Evt17")
        _release_acceptor(self)
        return
    pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        _garbage(self, f"unknown PDU type 0x{pdu_type:02X}")
        return
    limit = _pdu_limit(self, pdu_type)
    if pdu_length > limit:
        _garbage(self, f"PDU type 0x{pdu_type:02X} of {pdu_length} bytes (limit {limit})")
        return
    if ahead is not None:
        if not ahead.fill(sock, 6 + pdu_length, deadline):
            self._dn_ahead = None
            buf = None
        elif _pdata_here(self, pdu_type):
            # Read where it lies: every PDV is copied or decoded before the buffer is read into again.
            start = ahead.start
            ahead.skip(6 + pdu_length)
            _receive_pdata(self, memoryview(ahead.buf)[start : start + 6 + pdu_length])
            return
        else:
            buf = ahead.take(6 + pdu_length)
    else:
        buf = bytearray(6 + pdu_length)
        buf[:6] = header
        if not _recv_into(sock, memoryview(buf)[6:], deadline):
            buf = None
        elif _pdata_here(self, pdu_type):
            _receive_pdata(self, buf)
            return
    if buf is None:
        _garbage(self, f"PDU type 0x{pdu_type:02X} cut short or too slow ({pdu_length} bytes)", "Evt17")
        return
    if pdu_type == 0x01 and pdu_length >= 36:
        _nul_padding_to_spaces(buf)
    try:
        pdu, event = self._decode_pdu(buf)
    except Exception as exc:  # pynetdicom raises many types on a malformed PDU; one line, no traceback
        text = str(exc).splitlines()[0][:120] if str(exc) else ""
        _garbage(self, f"undecodable PDU type 0x{pdu_type:02X}: {type(exc).__name__}: {text}")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


# -- a P-DATA-TF of an established association: straight to the DIMSE provider ----------------------------
#
# pynetdicom 3.0.4 takes every P-DATA-TF through its whole PDU machinery: ``_decode_pdu`` copies the PDU into
# ``bytes``, builds a ``P_DATA_TF`` with one item object per PDV (each value sliced out: another copy), queues
# it and the event Evt10, and the state machine's DT-2 (Sta6 + Evt10 -> Sta6, the only transition for it in
# an established association) turns the PDU into a ``P_DATA`` primitive for
# ``DIMSEServiceProvider.receive_primitive``. A 512 KB image in 128 KB PDUs went through that four or five
# times, with four copies of its bytes. In Sta6, with nothing queued before it and no handler bound to the
# events that step reports (EVT_DATA_RECV, EVT_PDU_RECV, EVT_FSM_TRANSITION), the PDU's PDVs go to
# ``receive_primitive`` directly, as views of the PDU read; what DT-2 does, without the steps in between.
# Anything else (another state, an event pending, a handler bound) takes pynetdicom's path, except the rest of
# a C-STORE data set begun here (below), which follows its request. A PDV shorter than its two-byte header,
# or one that runs past its PDU, is protocol garbage (Evt19: A-ABORT), as an undecodable PDU is on
# pynetdicom's path.

_PDV_LENGTH = struct.Struct(">L")


def _pdata_here(dul: Any, pdu_type: int) -> bool:
    """Whether the PDU just read is a P-DATA-TF for :func:`_receive_pdata`: the rest of a C-STORE data set
    begun there, or one that may skip the state machine (:func:`_pdata_direct`)."""
    return pdu_type == 0x04 and (getattr(dul, "_dn_store", None) is not None or _pdata_direct(dul))


def _pdata_direct(dul: Any) -> bool:
    """Whether a P-DATA-TF just read may skip the state machine (see above)."""
    if dul.state_machine.current_state != "Sta6":
        return False
    if dul.event_queue.qsize() or dul._recv_pdu.qsize():
        return False
    handlers = dul.assoc.get_handlers
    return not (handlers(evt.EVT_DATA_RECV) or handlers(evt.EVT_PDU_RECV) or handlers(evt.EVT_FSM_TRANSITION))


def _receive_pdata(dul: Any, buf: bytearray | memoryview) -> None:
    """DT-2 for the P-DATA-TF ``buf`` (header included): its PDVs to the DIMSE provider."""
    from pynetdicom.pdu_primitives import P_DATA

    view = memoryview(buf)
    end = len(buf)
    pdvs: list[tuple[int, memoryview]] = []
    pos = 6
    while pos < end:
        if end - pos < 6:
            _garbage(dul, f"P-DATA-TF with a PDV item cut short at byte {pos}")
            return
        (length,) = _PDV_LENGTH.unpack_from(buf, pos)
        if length < 2 or pos + 4 + length > end:
            _garbage(dul, f"P-DATA-TF with a PDV item of {length} bytes at byte {pos} of {end}")
            return
        pdvs.append((buf[pos + 4], view[pos + 5 : pos + 4 + length]))
        pos += 4 + length
    dimse = dul.assoc.dimse
    store: _StoreRequest | None = getattr(dul, "_dn_store", None)
    done = False
    for context_id, data in pdvs:
        control = data[0]
        if store is None and control & 3 == 3 and dimse.message is None and _lean_store_allowed(dul):
            store = _StoreRequest.decode(data[1:], context_id, getattr(dul, "_dn_buffer", None))
            if store is not None:
                dul._dn_store = store
                continue
        if store is not None:
            if control & 1:
                dul._dn_store = None
                _garbage(dul, "P-DATA-TF with a command fragment inside a C-STORE data set")
                return
            store.data.write(data[1:])
            if control & 2:  # the last fragment
                dul._dn_store = None
                if not _serve_store(dul, store):
                    # queued where pynetdicom's receive_primitive queues it, for the association reactor
                    store.primitive.DataSet = store.to_bytesio()
                    dimse.msg_queue.put((store.primitive._context_id, store.primitive))
                    done = True
                # the buffer serves the association's next request, unless a large data set grew it
                keep = len(store.data.buf) <= _KEEP_BUFFER_BYTES
                dul._dn_buffer = store.data if keep else None
                store = None
            continue
        # pynetdicom's own assembly (anything but a plain C-STORE request), one PDV at a time
        primitive = P_DATA()
        # The setter insists on bytes; DIMSEMessage.decode_msg only indexes, slices and writes the values.
        primitive._presentation_data_value_list = [(context_id, data)]  # type: ignore[list-item]
        dimse.receive_primitive(primitive)
        done = done or dimse.message is None  # a message completed (queued for the association reactor)
    if done:
        _notify_assoc(dul)


# -- a C-STORE request: its command set read directly ----------------------------------------------------
#
# pynetdicom decodes each command set with pydicom (a Dataset, each element converted) and copies it into the
# request primitive through setters that validate every UID again (pydicom's regex, then its own): about a
# tenth of a millisecond per instance. The command set of a plain C-STORE-RQ is seven fixed elements in
# Implicit VR Little Endian; :class:`_StoreRequest` reads exactly those and builds the same primitive. Any
# other command set (other elements, a Move Originator, a value of the wrong length, a UID that is not digits
# and dots, a priority out of range) goes to pynetdicom as before, so its checks and its answers to a broken
# request are unchanged; the data set is collected as pynetdicom would (into a BytesIO) and the request is
# queued for the association reactor where pynetdicom queues it. Not used when a handler is bound to
# EVT_DIMSE_RECV (it expects pynetdicom's message) or when pynetdicom is set to spool data sets to files.

_CMD_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
#: The elements of a plain C-STORE-RQ command set: group length, Affected SOP Class UID, Command Field,
#: Message ID, Priority, Command Data Set Type, Affected SOP Instance UID.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_UID_CHARS = re.compile(rb"[0-9.]{1,64}")


def _lean_store_allowed(dul: Any) -> bool:
    from pynetdicom import _config

    return not _config.STORE_RECV_CHUNKED_DATASET and not dul.assoc.get_handlers(evt.EVT_DIMSE_RECV)


def _command_uid(raw: memoryview) -> Any:
    from pydicom import config
    from pydicom.uid import UID

    value = bytes(raw).rstrip(b"\x00 ")
    if _UID_CHARS.fullmatch(value) is None:
        return None
    return UID(value.decode("ascii"), validation_mode=config.IGNORE)


#: A data set buffer larger than this is not kept for the association's next request.
_KEEP_BUFFER_BYTES = 8 << 20


class _DataSetBuffer:
    """The bytes of a data set being received: ``buf[:size]``, in one buffer an association reuses.

    The fragments of a C-STORE data set are copied in once; the handler gets a view of them (no copy). The
    buffer grows by replacement, never in place, so a view handed out earlier stays valid.
    """

    __slots__ = ("buf", "size")

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.buf = bytearray(capacity)
        self.size = 0

    def write(self, data: memoryview) -> None:
        end = self.size + len(data)
        if end > len(self.buf):
            grown = bytearray(max(end, 2 * len(self.buf)))
            memoryview(grown)[: self.size] = memoryview(self.buf)[: self.size]
            self.buf = grown
        # through a memoryview: a bytearray's own slice assignment copies a non-bytearray source twice
        memoryview(self.buf)[self.size : end] = data
        self.size = end

    def view(self) -> memoryview:
        return memoryview(self.buf)[: self.size]


class _StoreRequest:
    """A C-STORE request whose data set is being received (see above)."""

    __slots__ = ("data", "primitive")

    def __init__(self, primitive: Any, data: _DataSetBuffer | None = None) -> None:
        self.primitive = primitive
        if data is None:
            data = _DataSetBuffer()
        data.size = 0
        self.data = data

    def to_bytesio(self) -> io.BytesIO:
        """The data set as pynetdicom's own assembly leaves it (a copy: the buffer is reused)."""
        return io.BytesIO(self.data.view())

    @classmethod
    def decode(
        cls, command: memoryview, context_id: int, data: _DataSetBuffer | None = None
    ) -> _StoreRequest | None:
        """The request for this command set when it is a plain C-STORE-RQ with a data set, else None; its data
        set goes into ``data`` (emptied) when given, else into a new buffer."""
        from pynetdicom.dimse_primitives import C_STORE

        values: dict[int, memoryview] = {}
        pos, n = 0, len(command)
        while pos < n:
            if n - pos < 8:
                return None
            group, elem, length = _CMD_ELEMENT.unpack_from(command, pos)
            pos += 8
            if group != 0 or elem in values or pos + length > n:
                return None
            values[elem] = command[pos : pos + length]
            pos += length
        if values.keys() != _STORE_RQ_ELEMENTS:
            return None
        shorts = (0x0100, 0x0110, 0x0700, 0x0800)
        if any(len(values[e]) != 2 for e in shorts) or len(values[0x0000]) != 4:
            return None
        field, msg_id, priority, has_data = (_US.unpack(values[e])[0] for e in shorts)
        if field != 0x0001 or has_data == 0x0101 or priority not in (0, 1, 2):
            return None
        sop_class, sop = _command_uid(values[0x0002]), _command_uid(values[0x1000])
        if sop_class is None or sop is None:
            return None
        primitive = C_STORE()
        primitive.MessageID = msg_id
        primitive.Priority = priority
        primitive._affected_sop_class_uid = sop_class
        primitive._affected_sop_instance_uid = sop
        primitive._context_id = context_id
        return cls(primitive, data)


# -- a C-STORE request: served in the network thread -------------------------------------------------------
#
# pynetdicom serves a request in the association's own thread: the DUL thread queues the message and wakes
# the association reactor, which runs the service class (a response primitive, the EVT_C_STORE event, the
# handler), queues the response for the DUL thread and wakes it to send. Two thread hand-offs per instance,
# each a wake-up and a pass of the interpreter lock (with four associations, eight threads passing it
# around), and the queue, primitive and state-machine steps between them. When the handler bound to
# EVT_C_STORE offers a ``direct`` form (:class:`dicomnode.ingest.scp.StorageSCP` does) and nothing would
# observe the difference, the DUL thread that read the last fragment calls it and sends the response itself:
# what pynetdicom's ``_serve_request``, ``StorageServiceClass.SCP`` and the state machine's DT-1 (Sta6 +
# Evt9 -> Sta6: send the P-DATA-TF) do, in that order. "Nothing would observe" means: the association is
# established and has not sent a release, no message is queued for the association reactor before this one,
# nothing is queued for the DUL (a release or abort requested by another thread goes first, through
# pynetdicom), the context ID is one of the accepted ones, the SOP class maps to the Storage Service Class
# (no SOP Class Common Extended Negotiation), the handler is bound without extra arguments, and no handler is
# bound to the events the steps skipped would report (EVT_DIMSE_RECV/SENT, EVT_PDU_SENT, EVT_DATA_SENT,
# EVT_FSM_TRANSITION). Anything else takes pynetdicom's path. A response that is not plain (a Dataset with an
# ErrorComment) is built and sent by pynetdicom's own code, from this thread.

#: Events whose handlers would miss what the direct path skips.
_DIRECT_STORE_WATCHED = (
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_PDU_SENT,
    evt.EVT_DATA_SENT,
    evt.EVT_FSM_TRANSITION,
)
_PDATA_HEADER = struct.Struct(">BBLLB")


def _direct_store_handler(dul: Any, context_id: int, sop_class: str) -> tuple[Any, Any] | None:
    """``(direct handler, accepted context)`` when this request may be served in the DUL thread, else None."""
    from pynetdicom import _config
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    assoc = dul.assoc
    if not assoc.is_established or assoc._sent_release or not dul.to_provider_queue.empty():
        return None
    if not assoc.dimse.msg_queue.empty() or not dul.event_queue.empty():
        return None
    bound = assoc.get_handlers(evt.EVT_C_STORE)
    if not isinstance(bound, tuple) or len(bound) != 2 or bound[1]:
        return None
    direct = getattr(bound[0], "direct", None)
    if direct is None or any(assoc.get_handlers(e) for e in _DIRECT_STORE_WATCHED):
        return None
    context = assoc._accepted_cx.get(context_id)
    if context is None or sop_class in assoc.acceptor.accepted_common_extended:
        return None
    storage = _config.UNRESTRICTED_STORAGE_SERVICE or uid_to_service_class(sop_class) is StorageServiceClass
    if not storage:
        return None
    return direct, context


def _serve_store(dul: Any, store: _StoreRequest) -> bool:
    """Serve a complete plain C-STORE request in the DUL thread (see above); False: not served here (the
    caller queues it for pynetdicom)."""
    req = store.primitive
    context_id = int(req._context_id)
    chosen = _direct_store_handler(dul, context_id, str(req._affected_sop_class_uid))
    if chosen is None:
        return False
    direct, context = chosen
    assoc = dul.assoc
    # The network idle timer stands still while the instance is stored: the association reactor, free now,
    # checks it, and on pynetdicom's path it was busy serving (it checks the timer only between requests).
    idle = dul._idle_timer
    idle.restart()
    idle.stop()
    try:
        status = direct(assoc, context, req, store.data.view())
    except Exception as exc:  # what pynetdicom's attempt() answers for a handler that raises
        _ASSOC_LOGGER.error("Exception in handler bound to 'evt.EVT_C_STORE'")
        _ASSOC_LOGGER.exception(exc)
        status = 0xC211
    finally:
        idle.restart()
    if not assoc.is_established or dul._kill_thread:
        return True  # aborted or released while storing: pynetdicom sends no response either
    command = store_response(
        req.MessageID, req._affected_sop_class_uid, req._affected_sop_instance_uid, status
    )
    peer_max = int(getattr(assoc.requestor, "maximum_length", 0) or 0)
    if command is None or (peer_max and len(command) + 6 > peer_max) or not dul.to_provider_queue.empty():
        _send_stock_store_response(assoc, context, req, status)
        return True
    # pynetdicom's AssociationSocket.send: Evt17 queued if the connection broke
    dul.socket.send(command_pdu(command, context_id))
    return True


def command_pdu(command: bytes, context_id: int) -> bytes:
    """A P-DATA-TF with one PDV: the whole command set ``command`` (message control header 0x03)."""
    return _PDATA_HEADER.pack(0x04, 0, len(command) + 6, len(command) + 2, context_id) + b"\x03" + command


def _send_stock_store_response(assoc: Any, context: Any, req: Any, status: Any) -> None:
    # As StorageServiceClass.SCP does after its handler returns; send_msg queues the P-DATA for this thread.
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.service_class import StorageServiceClass

    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPInstanceUID = req.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    rsp = StorageServiceClass(assoc).validate_status(status, rsp)
    assoc.dimse.send_msg(rsp, int(context.context_id))


# -- the C-STORE response: encoded directly --------------------------------------------------------------
#
# pynetdicom builds every DIMSE response as a pydicom Dataset (constructed with all its elements, each value
# validated), fills it from the primitive, encodes it once to compute the group length and once more to send
# it: about a fifth of the receiver's CPU per instance at four associations. The plain C-STORE response
# (Status without ErrorComment or OffendingElement) is seven fixed elements in Implicit VR Little Endian; it
# is written here directly, byte for byte what pynetdicom would send (pinned by a test). Anything else, or an
# association with an EVT_DIMSE_SENT handler bound (it expects pynetdicom's message object), takes the
# stock path.


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(group_elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, group_elem, len(value)) + value


def store_response_bytes(primitive: Any) -> bytes | None:
    """The encoded command set of a plain C-STORE response primitive, or None when it is not plain."""
    try:
        if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
            return None
        status = primitive.Status
    except AttributeError:
        return None
    return store_response(
        primitive.MessageIDBeingRespondedTo,
        primitive.AffectedSOPClassUID,
        primitive.AffectedSOPInstanceUID,
        status,
    )


def store_response(msg_id: Any, sop_class: Any, sop: Any, status: Any) -> bytes | None:
    """The encoded command set of a C-STORE response with only a status (an int in 0..0xFFFF), or None when
    that is not what ``status`` is (a Dataset, another type) or an identifier is missing."""
    if not isinstance(status, int) or not 0 <= status <= 0xFFFF:
        return None
    try:
        if msg_id is None or not sop_class or not sop:
            return None
        body = b"".join(
            (
                _element(0x0002, _ui(str(sop_class))),
                _element(0x0100, struct.pack("<H", 0x8001)),
                _element(0x0120, struct.pack("<H", int(msg_id))),
                _element(0x0800, struct.pack("<H", 0x0101)),
                _element(0x0900, struct.pack("<H", int(status))),
                _element(0x1000, _ui(str(sop))),
            )
        )
    except (AttributeError, TypeError, ValueError, UnicodeError, struct.error):
        return None
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _install_reactors() -> None:
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu import A_ABORT_RQ
    from pynetdicom.pdu_primitives import P_DATA

    original_init = DULServiceProvider.__init__
    original_kill = DULServiceProvider.kill_dul
    original_transport_event = DULServiceProvider._is_transport_event

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
        _wake_dul(self)

    def is_transport_event(self: DULServiceProvider) -> bool:
        # As pynetdicom's, but a PDU already in the read-ahead buffer is an event without asking the socket.
        if _buffered(self):
            self._read_pdu_data()
            return True
        return bool(original_transport_event(self))

    def stop_dul(self: DULServiceProvider) -> bool:
        # As pynetdicom's, plus the wake-up so the reactor sees the flag now rather than after its wait.
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            _wake_dul(self)
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

    original_send_msg = DIMSEServiceProvider.send_msg

    def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        # pynetdicom 3.0.4 DIMSEServiceProvider.send_msg, with the plain C-STORE response encoded directly.
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            encoded = store_response_bytes(primitive)
            max_pdu = self.maximum_pdu_size
            if (
                encoded is not None
                and (not max_pdu or len(encoded) + 6 <= max_pdu)
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
            ):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
                self.dul.send_pdu(pdata)
                return
        original_send_msg(self, primitive, context_id)

    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
    DULServiceProvider.__init__ = dul_init  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = kill_dul  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = stop_dul  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    DULServiceProvider._is_transport_event = is_transport_event  # type: ignore[method-assign]
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
