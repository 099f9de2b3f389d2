"""The C-STORE / C-ECHO SCP (pynetdicom 3): thin, total handlers over the shared spool.

Every handler validates, persists through :class:`~dicomnode.ingest.spool.Spool`, and returns a DICOM status;
nothing escapes a handler (pynetdicom would otherwise answer 0xC001 and log a traceback). Association
policy: the called AE title must be ours; calling AE titles (optionally pinned to a peer address) may be
restricted, and others are rejected at association with "calling AE title not recognised" (permanent).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.ingest import prometheus as metrics
from dicomnode.ingest import reactors
from dicomnode.ingest.reactors import enable_event_driven_reactors
from dicomnode.ingest.spool import PROCESSING_FAILURE, OtherClassPolicy, Spool
from dicomnode.netutil import enable_tcp_nodelay

if TYPE_CHECKING:
    from dicomnode.config import DicomSettings
    from dicomnode.ingest.processes import SharedReceivers

LOGGER = logging.getLogger(__name__)

#: Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"

#: Transfer syntaxes accepted, in the order we prefer them. pynetdicom picks, for each proposed context, the
#: first of *our* syntaxes that the requestor offers: lossless compressed syntaxes come first so that a sender
#: holding compressed images sends them as they are (the node stores what it receives and decodes later)
#: instead of transcoding; lossy syntaxes come last, accepted only when nothing else was offered.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title allowed to associate, optionally only from ``address`` (IP or host name)."""

    ae_title: str
    address: str | None = None


def _resolve(address: str | None) -> frozenset[str] | None:
    # Compare peer IPs, so host names in the configuration are resolved once, at start-up.
    if address is None:
        return None
    out = {address}
    try:
        for info in socket.getaddrinfo(address, None):
            out.add(str(info[4][0]))
    except OSError:
        LOGGER.warning("allowed caller address %s does not resolve; matching it literally", address)
    return frozenset(out)


class _NodeAE(AE):
    """An AE whose calling-AE whitelist depends on the peer address of the association being negotiated.

    pynetdicom checks ``require_calling_aet`` from the association's own thread during negotiation, and
    rejects with (rejected-permanent, service-user, calling-AE-not-recognised) when the title is not listed.
    Answering per peer address there gives address pinning with the standard rejection.
    """

    def __init__(
        self,
        ae_title: str,
        callers: Sequence[AllowedCaller],
        *,
        max_associations: int = 10,
        max_per_address: int | None = None,
    ) -> None:
        super().__init__(ae_title=ae_title)
        self._callers = [(c.ae_title.strip(), _resolve(c.address)) for c in callers]
        self._max_total = max_associations
        self._max_per_address = max_per_address  # None: the total limit applies per address too
        #: The associations of the other receiving processes (None: this process receives alone).
        self.shared: SharedReceivers | None = None

    @property
    def maximum_associations(self) -> int:
        """The association limit pynetdicom compares with its count of acceptor threads.

        pynetdicom counts every accepted TCP connection, including peers that never send an A-ASSOCIATE-RQ,
        so ten silent connections used to take every slot until the ACSE timeout. Asked from an association
        being negotiated (pynetdicom asks there), this answers from our own count instead: associations whose
        peer has identified itself, in total and from the negotiating peer's address; -1 (so pynetdicom
        rejects with "local limit exceeded", transient) when a limit is reached, a number no count reaches
        otherwise.
        """
        thread = threading.current_thread()
        if not isinstance(thread, Association) or not hasattr(self, "_max_total"):
            return int(getattr(self, "_max_total", 10))
        peer = str(thread.requestor.address)
        others = [a for a in _acceptors() if a is not thread and _has_identified(a)]
        identified = [str(a.requestor.address) for a in others]
        per_address = self._max_per_address or self._max_total
        shared = getattr(self, "shared", None)
        if shared is not None:
            # Several receiving processes: count the associations of all of them (dicomnode.ingest.processes).
            total, same = shared.admit(peer, identified, self._max_total, per_address)
        else:
            total, same = len(identified), sum(1 for a in identified if a == peer)
        if total >= self._max_total or same >= per_address:
            reactors.refusal_log(peer, f"{total} associations open ({same} from that address)")
            return -1
        return 1 << 30

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._max_total = int(value)

    @property
    def require_calling_aet(self) -> list[str]:
        if not getattr(self, "_callers", None):
            return []
        thread = threading.current_thread()
        peer = thread.requestor.address if isinstance(thread, Association) else None
        titles = [
            title for title, hosts in self._callers if hosts is None or (peer is not None and peer in hosts)
        ]
        # An empty list would mean "anyone": a title no peer can send keeps the rejection.
        return titles or ["\\NO-CALLER\\"]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        # pynetdicom's __init__ assigns [] here; the whitelist comes from the constructor instead.
        return None


class _ContextList(list):  # type: ignore[type-arg]
    """The server's presentation contexts, copied cheaply for each new connection.

    pynetdicom deep-copies the server's contexts for every accepted connection (so that negotiation can
    change the copies); with every storage SOP class and 16 transfer syntaxes that deepcopy costs tens of ms
    of CPU per connection, before the peer has said anything. A copy of each context object with its own
    lists is all negotiation needs.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for cx in self:
            c = copy.copy(cx)
            for key, value in vars(cx).items():
                if isinstance(value, list):
                    setattr(c, key, list(value))
            out.append(c)
        return out


def _limit_pending(server: ThreadedAssociationServer, per_address: int) -> None:
    """Close, at accept, a connection from an address that already has ``per_address`` connections whose
    peer has not sent an A-ASSOCIATE-RQ yet (each costs a thread until the ACSE timeout)."""

    def verify_request(request: Any, client_address: Any) -> bool:
        try:
            host = client_address[0]
            waiting = [
                a
                for a in _acceptors()
                if not _has_identified(a) and a.requestor.address == host and a.is_alive()
            ]
        except Exception:  # never let the check break the accept loop
            return True
        if len(waiting) >= per_address:
            _pending_log(host, len(waiting))
            return False
        return True

    # socketserver calls self.verify_request(request, client_address) for every accepted connection.
    server.verify_request = verify_request  # type: ignore[method-assign]


def _pending_log(host: str, n: int) -> None:
    reactors.refusal_log(host, f"{n} connections without an A-ASSOCIATE-RQ already open")


def _lighten(server: ThreadedAssociationServer) -> None:
    """Cheaper per-connection and per-message work for a started server (nothing that changes behaviour)."""
    server.contexts = _ContextList(server.contexts)
    # pynetdicom's standard handlers format a description of every PDU and DIMSE message for its logger, at
    # INFO and DEBUG; the node keeps that logger at WARNING (cli), so the formatting is pure cost.
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        from pynetdicom import _handlers

        for event, handler in (
            (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
            (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
            (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
            (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
        ):
            with contextlib.suppress(Exception):
                server.unbind(event, handler)


def _quiet_standard_handlers() -> None:
    """Stop pynetdicom binding its standard logging handlers to every new association (process-wide).

    Each association binds them itself at construction (``pynetdicom._config.LOG_HANDLER_LEVEL``), whatever
    the server has, and they describe every PDU and DIMSE message for a logger the node keeps at WARNING:
    about a third of the receiver's CPU per instance, for nothing. Only when that logger would not show them.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        from pynetdicom import _config

        _config.LOG_HANDLER_LEVEL = "none"


class _SharedSocketServer(ThreadedAssociationServer):
    """A pynetdicom server on a socket that is already bound and listening, shared by several processes.

    The parent of the receiving processes (:mod:`dicomnode.ingest.processes`) binds the port once; every
    receiving process accepts on that socket. The socket is non-blocking: when several processes are woken for
    one connection, one accepts it and the others get EAGAIN (socketserver ignores that and waits again).
    Before each accept, ``shared`` lets a process with fewer open connections take it first.
    """

    def __init__(
        self,
        *args: Any,
        listen_socket: socket.socket,
        shared: SharedReceivers | None = None,
        **kwargs: Any,
    ) -> None:
        self._listen_socket = listen_socket
        self._shared = shared
        super().__init__(*args, **kwargs)
        self.request_queue_size = 128

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the one socketserver made; ours is already bound
        self.socket = self._listen_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        return None  # listening already (the parent called listen())

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._shared is not None:
            self._shared.wait_turn()
        listening = cast(socket.socket, self.socket)
        client, address = listening.accept()  # BlockingIOError when another process took it: ignored
        if self._shared is not None:
            self._shared.opened()
        client.setblocking(True)
        # As dicomnode.netutil.enable_tcp_nodelay does for the stock server.
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address

    def server_close(self) -> None:
        # Never shutdown() a listening socket other processes accept on: that would stop it for all of them.
        if self.socket is not None:
            self.socket.close()


def _acceptors() -> list[Association]:
    return [t for t in threading.enumerate() if isinstance(t, Association) and t.is_acceptor]


def _has_identified(assoc: Association) -> bool:
    # The A-ASSOCIATE-RQ has arrived (negotiating or established) and the association is not over (a
    # rejected one holds no slot while its thread ends).
    return assoc.requestor.primitive is not None and not (
        assoc.is_released or assoc.is_aborted or assoc.is_rejected
    )


class StorageSCP:
    """C-STORE and C-ECHO service provider writing into a :class:`Spool`.

    Parameters
    ----------
    spool
        Where received instances go (and the SOP class policy).
    ae_title
        Our AE title; associations addressed to another called AE title are rejected.
    host, port
        Bind address; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    allowed_callers
        Calling AE titles allowed to associate; empty = anyone.
    max_associations
        Concurrent associations accepted; more are rejected (transient, local limit exceeded). Only peers
        that have sent their A-ASSOCIATE-RQ count: a connection that never identifies holds no slot.
    max_associations_per_address
        Concurrent associations accepted from one peer address (None = ``max_associations``).
    max_pending_per_address
        Connections from one address not yet identified (no A-ASSOCIATE-RQ yet); more are closed at once.
    max_pdu
        Maximum PDU length we receive (0 = unlimited, then 64 MiB is the hard limit); an A-ASSOCIATE-RQ is
        limited to 1 MiB whatever this says (:mod:`dicomnode.ingest.reactors`).
    network_timeout, acse_timeout, dimse_timeout
        Seconds before an idle or stuck peer is dropped: ``acse_timeout`` for the A-ASSOCIATE-RQ (and any
        PDU before the association is established), ``network_timeout`` for an idle association or one
        PDU, ``dimse_timeout`` for a DIMSE message.
    poll_interval_s
        How long pynetdicom's network reactor sleeps between polls of an idle socket (its default is 1 ms),
        where it still polls: only when ``event_driven`` is off or not available for the installed
        pynetdicom. None keeps pynetdicom's default.
    tls_port
        Port of the DICOM TLS listener (0 = a free port, see :attr:`tls_port`); used with ``ssl_context``.
        ``port`` None with a TLS listener = TLS only.
    ssl_context
        The TLS listener's context (:func:`dicomnode.tls.server_context`: our certificate, BCP 195 suites,
        client-certificate checks); None = no TLS listener. Both listeners share the AE and its policies.
    event_driven
        Replace pynetdicom's 1 ms polling sleeps by event-driven waits at :meth:`start`
        (:func:`dicomnode.ingest.reactors.enable_event_driven_reactors`; process-wide, pynetdicom 3.0.4
        only). Each synchronous C-STORE then no longer waits for two polling periods. Off only to measure
        the difference.
    listen_socket, tls_listen_socket
        Sockets already bound and listening (plain, TLS) to accept on instead of binding ``port`` /
        ``tls_port``: several receiving processes share them (:mod:`dicomnode.ingest.processes`).
    shared
        The state shared with the other receiving processes (association counts for the limits, open
        connections for balancing); None = this process receives alone.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        ae_title: str = "DICOMNODE",
        host: str = "127.0.0.1",
        port: int | None = 11112,
        allowed_callers: Iterable[AllowedCaller] = (),
        max_associations: int = 10,
        max_associations_per_address: int | None = None,
        max_pending_per_address: int = 32,
        max_pdu: int = 1 << 20,
        network_timeout: float = 30.0,
        acse_timeout: float = 10.0,
        dimse_timeout: float = 60.0,
        poll_interval_s: float | None = None,
        event_driven: bool = True,
        tls_port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
        tls_listen_socket: socket.socket | None = None,
        shared: SharedReceivers | None = None,
    ) -> None:
        if port is None and ssl_context is None:
            raise ValueError("StorageSCP needs a plain port or a TLS listener (ssl_context)")
        self.spool = spool
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.allowed_callers = tuple(allowed_callers)
        self.max_associations = max_associations
        self.max_associations_per_address = max_associations_per_address
        self.max_pending_per_address = max_pending_per_address
        self.max_pdu = max_pdu
        self.network_timeout = network_timeout
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.poll_interval_s = poll_interval_s
        self.event_driven = event_driven
        self._server: ThreadedAssociationServer | None = None
        self._tls_port = tls_port
        self.ssl_context = ssl_context
        self._tls_server: ThreadedAssociationServer | None = None
        self._stopped = threading.Event()
        self.ae: AE | None = None
        self.listen_socket = listen_socket
        self.tls_listen_socket = tls_listen_socket
        self.shared = shared

    @classmethod
    def from_settings(cls, dicom: DicomSettings, spool: Spool, **kwargs: Any) -> StorageSCP:
        """Build the SCP from the ``dicom`` section of the settings (extra keyword arguments override).

        Raises
        ------
        dicomnode.tls.TlsError
            ``dicom.tls`` names a certificate, key or CA bundle that cannot be used (one line naming it).
        """
        params: dict[str, Any] = {
            "ae_title": dicom.ae_title,
            "host": dicom.host,
            "port": dicom.port,
            "allowed_callers": [AllowedCaller(a.ae_title, a.address) for a in dicom.allowed_calling_aets],
            "max_associations": dicom.max_associations,
            "max_associations_per_address": dicom.max_associations_per_address,
            "max_pending_per_address": dicom.max_pending_connections_per_address,
            "max_pdu": dicom.max_pdu_bytes,
            "acse_timeout": dicom.acse_timeout_seconds,
            "network_timeout": dicom.network_timeout_seconds,
            "dimse_timeout": dicom.dimse_timeout_seconds,
        }
        if dicom.tls is not None:
            from dicomnode.tls import server_context

            tls = dicom.tls
            params["tls_port"] = tls.port
            params["ssl_context"] = server_context(
                tls.certificate,
                tls.private_key,
                key_password=tls.key_password.get_secret_value() if tls.key_password else None,
                ca_bundle=tls.ca_bundle,
                require_client_certificate=tls.require_client_certificate,
                handshake_timeout_s=tls.handshake_timeout_seconds,
            )
        params.update(kwargs)
        return cls(spool, **params)

    # -- lifecycle ----------------------------------------------------------------------------------
    def _build_ae(self) -> AE:
        ae = _NodeAE(
            self.ae_title,
            self.allowed_callers,
            max_associations=self.max_associations,
            max_per_address=self.max_associations_per_address,
        )
        ae.shared = self.shared
        ae.require_called_aet = True
        ae.maximum_pdu_size = self.max_pdu
        ae.network_timeout = self.network_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.add_supported_context(VERIFICATION)
        ts = list(TRANSFER_SYNTAXES)
        analysed = sorted(self.spool.analysed_sop_classes)
        for sop_class in analysed:
            ae.add_supported_context(sop_class, ts)
        if self.spool.other_classes is not OtherClassPolicy.REFUSE:
            for cx in StoragePresentationContexts:
                uid = cx.abstract_syntax
                if uid is not None and uid not in self.spool.analysed_sop_classes:
                    ae.add_supported_context(uid, ts)
        return ae

    def start(self) -> None:
        """Start listening in background threads (TCP_NODELAY and event-driven reactors enabled first)."""
        if self.is_listening:
            return
        enable_tcp_nodelay()
        if self.event_driven:
            enable_event_driven_reactors()
        _quiet_standard_handlers()
        self.ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, _StoreHandler(self.spool)),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        if self.poll_interval_s is not None:
            handlers.append((evt.EVT_CONN_OPEN, self._on_conn_open))
        if self.shared is not None:
            for event in (evt.EVT_CONN_OPEN, evt.EVT_CONN_CLOSE, evt.EVT_RELEASED, evt.EVT_ABORTED):
                handlers.append((event, self._on_assoc_change))
        if self._port is not None or self.listen_socket is not None:
            server = self._start_server(handlers, self.listen_socket, self._port, None)
            self._server = server
            _lighten(server)
            _limit_pending(server, self.max_pending_per_address)
            LOGGER.info("DICOM SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        if self.ssl_context is not None:
            try:
                tls_server = self._start_server(
                    handlers, self.tls_listen_socket, self._tls_port or 0, self.ssl_context
                )
            except BaseException:
                self.stop()
                raise
            assert tls_server is not None
            self._tls_server = tls_server
            _lighten(tls_server)
            _limit_pending(tls_server, self.max_pending_per_address)
            assert self.tls_port is not None
            LOGGER.info("DICOM SCP %s listening with TLS on %s:%d", self.ae_title, self.host, self.tls_port)

    def _start_server(
        self,
        handlers: list[Any],
        listen: socket.socket | None,
        port: int | None,
        ssl_context: ssl.SSLContext | None,
    ) -> ThreadedAssociationServer:
        assert self.ae is not None
        if listen is None:
            server = self.ae.start_server(
                (self.host, port or 0), block=False, evt_handlers=handlers, ssl_context=ssl_context
            )
            assert server is not None  # block=False returns the server
            return server
        # A socket shared with the other receiving processes: as AE.start_server(block=False) does, on it.
        address = listen.getsockname()
        shared_server = cast(
            ThreadedAssociationServer,
            self.ae.make_server(
                (str(address[0]), int(address[1])),
                ssl_context=ssl_context,
                evt_handlers=handlers,
                server_class=_SharedSocketServer,
                listen_socket=listen,
                shared=self.shared,
            ),
        )
        thread = threading.Thread(target=shared_server.serve_forever, name="DicomAcceptor", daemon=True)
        thread.start()
        self.ae._servers.append(shared_server)
        return shared_server

    def serve_forever(self) -> None:
        """Start and block until :meth:`stop` is called from another thread (or KeyboardInterrupt)."""
        self._stopped.clear()
        self.start()
        try:
            self._stopped.wait()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop accepting, abort associations in progress and release the port."""
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        self._stopped.set()

    @property
    def port(self) -> int | None:
        """The bound plain port (useful when constructed with port 0); None = no plain listener."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port (useful when constructed with tls_port 0); None = no TLS listener."""
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        return self._tls_port if self.ssl_context is not None else None

    @property
    def is_listening(self) -> bool:
        """Whether :meth:`start` has opened the listeners (and :meth:`stop` has not closed them)."""
        return self._server is not None or self._tls_server is not None

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers (total: never raise) ---------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        # pynetdicom exposes the reactor delay only as an attribute of each association's DUL.
        delay = self.poll_interval_s
        if delay is None:
            return
        try:
            event.assoc.dul._run_loop_delay = delay
        except Exception:
            LOGGER.debug("could not set the poll interval", exc_info=True)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_assoc_change(self, event: evt.Event) -> None:
        # Several receiving processes: publish this process's open connections and associations.
        shared = self.shared
        if shared is None:
            return
        try:
            ending = event.event in (evt.EVT_CONN_CLOSE, evt.EVT_RELEASED, evt.EVT_ABORTED)
            acceptors = [a for a in _acceptors() if a.is_alive() and not (ending and a is event.assoc)]
            open_now = [a for a in acceptors if not (a.is_released or a.is_aborted)]
            shared.publish([str(a.requestor.address) for a in open_now if _has_identified(a)], len(open_now))
        except Exception:  # notification handlers must not raise
            LOGGER.debug("could not publish the association count", exc_info=True)

    def _on_rejected(self, event: evt.Event) -> None:
        try:
            metrics.count_rejection()
            rq = event.assoc.requestor
            LOGGER.info("association rejected: calling AE %r from %s", str(rq.ae_title).strip(), rq.address)
        except Exception:  # notification handlers must not raise either
            LOGGER.debug("rejection logging failed", exc_info=True)


class _StoreHandler:
    """The EVT_C_STORE handler: called with pynetdicom's event, or in its ``direct`` form by the network
    thread that read the request (:func:`dicomnode.ingest.reactors._serve_store`), with the data set's bytes
    as a view of the buffer they were received into (no copy).

    A plain status is answered as an int (pynetdicom sets it on the response as it is); a Dataset, whose
    construction costs more than the rest of the answer, only to carry an ErrorComment.
    """

    __slots__ = ("spool",)

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def __call__(self, event: evt.Event) -> Dataset | int:
        try:
            req = cast(C_STORE, event.request)
            data = req.DataSet.getvalue() if req.DataSet is not None else b""
            return self._store(
                data,
                str(event.context.transfer_syntax),
                req.AffectedSOPClassUID,
                req.AffectedSOPInstanceUID,
                event.assoc.requestor.ae_title,
            )
        except Exception as exc:  # belt and braces: Spool never raises, but the event plumbing might
            return _failure(exc)

    def direct(self, assoc: Association, context: Any, req: C_STORE, data: memoryview) -> Dataset | int:
        """The handler without the event: ``context`` is the accepted presentation context."""
        try:
            return self._store(
                data,
                str(context.transfer_syntax[0]),
                req.AffectedSOPClassUID,
                req.AffectedSOPInstanceUID,
                assoc.requestor.ae_title,
            )
        except Exception as exc:
            return _failure(exc)

    def _store(
        self, data: bytes | memoryview, ts: str, sop_class: Any, sop: Any, calling_ae: Any
    ) -> Dataset | int:
        result = self.spool.ingest_dataset(
            data,
            ts,
            sop_class_uid=str(sop_class) if sop_class else None,
            sop_instance_uid=str(sop) if sop else None,
            calling_ae_title=str(calling_ae).strip() or None,
            source="dimse",
        )
        if result.ok or not result.comment:
            return result.status
        status = Dataset()
        status.Status = result.status
        status.ErrorComment = _lo(result.comment)
        return status


def _failure(exc: Exception) -> Dataset:
    LOGGER.error("C-STORE handler failed: %s: %s", type(exc).__name__, exc)
    status = Dataset()
    status.Status = PROCESSING_FAILURE
    status.ErrorComment = _lo(f"processing failure: {type(exc).__name__}")
    return status


def _lo(text: str) -> str:
    # ErrorComment is LO: 64 characters, no backslash, no control characters.
    clean = "".join(ch if 32 <= ord(ch) < 127 and ch != "\\" else " " for ch in text)
    return clean[:64]
