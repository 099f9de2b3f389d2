"""Network helpers shared by the DICOM server and the DICOM clients.

pynetdicom never sets ``TCP_NODELAY``; with Nagle's algorithm on, every small DIMSE message waits for the
peer's delayed ACK (about 40 ms), so one C-STORE costs ~50 ms instead of ~8 ms (stack.md G1).
:func:`enable_tcp_nodelay` patches pynetdicom so that both the sockets it connects (SCU) and the sockets it
accepts (SCP) get the option. It is applied explicitly at start-up by the code that creates the AEs, never at
import, and it is idempotent.

The event-driven reactor patch of the receiver lives with the receiver (:mod:`dicomnode.ingest.reactors`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from pynetdicom.transport import AddressInformation, AssociationServer, AssociationSocket

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_PATCHED = False


def _set_nodelay(sock: socket.socket) -> None:
    # Only TCP sockets know the option; a TLS-wrapped socket forwards setsockopt to the TCP socket.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # e.g. a socket that is already closed by the peer
        log.debug("could not set TCP_NODELAY: %s", exc)


def enable_tcp_nodelay() -> None:
    """Make every pynetdicom socket (requested and accepted) use ``TCP_NODELAY``.

    Safe to call more than once and from several threads; the patch is installed only once per process.
    """
    global _PATCHED
    with _LOCK:
        if _PATCHED:
            return
        original_create = AssociationSocket._create_socket
        original_get_request = AssociationServer.get_request

        def _create_socket(self: AssociationSocket, address: AddressInformation) -> socket.socket:
            sock = original_create(self, address)
            _set_nodelay(sock)
            return sock

        def _get_request(self: AssociationServer) -> tuple[socket.socket, Any]:
            client_socket, address = original_get_request(self)
            _set_nodelay(client_socket)
            return client_socket, address

        AssociationSocket._create_socket = _create_socket  # type: ignore[method-assign]
        AssociationServer.get_request = _get_request  # type: ignore[method-assign]
        _PATCHED = True
        log.debug("TCP_NODELAY enabled for pynetdicom sockets")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for tests, benchmarks and scripts starting peers).

    The port is released before returning, so another process could take it first; callers that start a
    server on it should expect, and report, a bind error.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port``.

    Raises
    ------
    TimeoutError
        When nothing listens there after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s")
