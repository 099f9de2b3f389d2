"""Delivering results: C-STORE and STOW-RS destinations, status classification, retry policy.

Public API::

    deliver(destination, files, *, calling_ae_title="DICOMNODE") -> DeliveryResult
    echo(destination, *, calling_ae_title="DICOMNODE") -> EchoResult
    RetryPolicy.from_settings(settings.delivery).decide(result, attempt) -> (DeliveryOutcome, delay_s | None)
    deliver_with_retry(destination, files, policy, ...) -> DeliveryResult      # blocking loop (CLI, tests)

``destination`` is a config entry (:class:`dicomnode.config.DimseDestination` /
:class:`~dicomnode.config.DicomwebDestination`) or a :class:`DimsePeer` / :class:`DicomwebPeer`.
A delivery is done only when the destination confirmed every file; ``DeliveryResult.error()`` gives the
matching :class:`~dicomnode.errors.RetryableError` or :class:`~dicomnode.errors.PermanentError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.delivery.dicomweb import DicomwebPeer, auth_fields, probe_dicomweb, send_stow, tls_fields
from dicomnode.delivery.dimse import DimsePeer, EchoResult, echo_dimse, send_dimse
from dicomnode.delivery.result import (
    DeliveryResult,
    FileStatus,
    StatusClass,
    classify_dimse_status,
    classify_http_status,
)
from dicomnode.delivery.retry import RetryPolicy
from dicomnode.domain import DeliveryOutcome
from dicomnode.errors import ConfigError
from dicomnode.tls import ClientTls

if TYPE_CHECKING:
    from dicomnode.config import DicomwebDestination, DimseDestination

    AnyDestination = DimseDestination | DicomwebDestination | DimsePeer | DicomwebPeer

__all__ = [
    "DeliveryResult",
    "DicomwebPeer",
    "DimsePeer",
    "EchoResult",
    "FileStatus",
    "RetryPolicy",
    "StatusClass",
    "classify_dimse_status",
    "classify_http_status",
    "client_tls",
    "deliver",
    "deliver_with_retry",
    "echo",
    "to_peer",
]

LOGGER = logging.getLogger(__name__)


def to_peer(destination: Any, *, calling_ae_title: str = "DICOMNODE") -> DimsePeer | DicomwebPeer:
    """The peer to talk to for a config destination entry (or a peer, returned as is).

    Parameters
    ----------
    destination
        A ``DimseDestination`` / ``DicomwebDestination`` from the settings, or a peer.
    calling_ae_title
        Our AE title when the destination does not set ``calling_ae`` (``settings.dicom.ae_title``).
    """
    if isinstance(destination, DimsePeer | DicomwebPeer):
        return destination
    kind = getattr(destination, "kind", None)
    if kind == "dimse":
        return DimsePeer(
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            calling_ae_title=destination.calling_ae or calling_ae_title,
            timeout_s=destination.timeout_seconds,
            name=destination.name,
            tls=client_tls(getattr(destination, "tls", None)),
        )
    if kind == "dicomweb":
        fields: dict[str, Any] = {
            **auth_fields(destination.auth),
            **tls_fields(getattr(destination, "tls", None)),
        }
        return DicomwebPeer(
            url=destination.url, name=destination.name, timeout_s=destination.timeout_seconds, **fields
        )
    raise ConfigError(f"destination: unknown kind {kind!r}")


def client_tls(tls: Any) -> ClientTls | None:
    """The :class:`~dicomnode.tls.ClientTls` of a config ``tls`` entry; None = plain DICOM."""
    if tls is None:
        return None
    return ClientTls(
        ca_bundle=tls.ca_bundle,
        certificate=tls.certificate,
        private_key=tls.private_key,
        key_password=tls.key_password.get_secret_value() if tls.key_password is not None else None,
        verify=tls.verify,
        check_hostname=tls.check_hostname,
        server_name=tls.server_name,
    )


def deliver(
    destination: Any, files: Sequence[Path], *, calling_ae_title: str = "DICOMNODE"
) -> DeliveryResult:
    """Send ``files`` to ``destination`` once; never raises for network or peer problems.

    Parameters
    ----------
    destination
        A config destination entry or a peer.
    files
        Part 10 files to send.
    calling_ae_title
        Default calling AE title for DIMSE destinations.

    Returns
    -------
    DeliveryResult
        ``outcome`` SUCCESS / RETRYING (transient) / PERMANENT_FAILURE, a one-line message and
        per-file statuses.
    """
    peer = to_peer(destination, calling_ae_title=calling_ae_title)
    paths = [Path(f) for f in files]
    if not paths:
        return DeliveryResult(peer.name or "destination", DeliveryOutcome.SUCCESS, "nothing to send")
    if isinstance(peer, DimsePeer):
        return send_dimse(peer, paths)
    return send_stow(peer, paths)


def echo(destination: Any, *, calling_ae_title: str = "DICOMNODE") -> EchoResult:
    """C-ECHO a DIMSE destination or probe a DICOMweb one (``dicomnode echo DEST``, the UI's test button)."""
    peer = to_peer(destination, calling_ae_title=calling_ae_title)
    if isinstance(peer, DimsePeer):
        return echo_dimse(peer)
    return probe_dicomweb(peer)


def deliver_with_retry(
    destination: Any,
    files: Sequence[Path],
    policy: RetryPolicy,
    *,
    calling_ae_title: str = "DICOMNODE",
    sleep: Callable[[float], None] = time.sleep,
    on_attempt: Callable[[int, DeliveryResult, DeliveryOutcome, float | None], None] | None = None,
) -> DeliveryResult:
    """Deliver with retries in the calling thread, resending only the files not yet confirmed.

    The pipeline schedules retries durably through the store instead; this loop serves the CLI and tests.

    Parameters
    ----------
    destination, files, calling_ae_title
        As for :func:`deliver`.
    policy
        Backoff and maximum attempts.
    sleep
        Called with each wait (injected so tests do not wait).
    on_attempt
        Called after each attempt with ``(attempt, result, decided outcome, delay)``.

    Returns
    -------
    DeliveryResult
        The last attempt's result, its outcome replaced by the policy's decision (RETRYING becomes
        PERMANENT_FAILURE once attempts are exhausted).
    """
    pending = [Path(f) for f in files]
    confirmed: dict[Path, FileStatus] = {}
    attempt = 0
    while True:
        attempt += 1
        result = deliver(destination, pending, calling_ae_title=calling_ae_title)
        for fs in result.files:
            if fs.outcome is DeliveryOutcome.SUCCESS:
                confirmed[fs.path] = fs
        decided, delay = policy.decide(result, attempt)
        if on_attempt is not None:
            on_attempt(attempt, result, decided, delay)
        if decided is not DeliveryOutcome.RETRYING or delay is None:
            merged = tuple(confirmed.get(Path(f)) or _status_in(result, Path(f)) for f in files)
            return DeliveryResult(
                result.destination,
                decided,
                result.message
                if decided is DeliveryOutcome.SUCCESS or attempt == 1
                else f"after {attempt} attempts: {result.message}",
                merged,
                result.warnings,
            )
        pending = result.failed_files()
        sleep(delay)


def _status_in(result: DeliveryResult, path: Path) -> FileStatus:
    for fs in result.files:
        if fs.path == path:
            return fs
    return FileStatus(path, None, None, result.outcome, result.message)
