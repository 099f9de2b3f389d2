"""C-STORE SCU and C-ECHO towards a DIMSE destination (pynetdicom, TCP_NODELAY).

Every result is checked (habit 2): association established, rejected (permanent or transient) or aborted;
response status dataset present; status range. Files are sent as stored: compressed files are proposed in
their own transfer syntax (pynetdicom cannot transcode them), uncompressed ones in explicit and implicit
little endian.

DICOM TLS (``DimsePeer.tls``): the association is requested over TLS 1.2+ with the BCP 195 suites
(:func:`dicomnode.tls.client_context`); the peer certificate is verified first, and a refused handshake
(untrusted, expired or wrongly named certificate; our client certificate refused) is a permanent failure whose
message says why, a handshake timeout a transient one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicomnode.delivery.result import (
    DeliveryResult,
    FileStatus,
    classify_dimse_status,
    combine,
    outcome_of,
)
from dicomnode.domain import DeliveryOutcome
from dicomnode.netutil import enable_tcp_nodelay
from dicomnode.tls import ClientTls, DicomTlsContext, TlsError, client_context

LOGGER = logging.getLogger(__name__)

#: Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"
#: pynetdicom proposes at most 128 presentation contexts per association.
_MAX_CONTEXTS = 128

_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class EchoResult:
    """Result of a verification (C-ECHO or DICOMweb probe)."""

    ok: bool
    message: str
    elapsed_s: float
    #: For failures: whether trying later might help.
    transient: bool = False


@dataclass(frozen=True)
class DimsePeer:
    """Where to send: the peer's AE title and address, our calling AE title, and the timeout."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "DICOMNODE"
    timeout_s: float = 30.0
    name: str = ""
    #: DICOM TLS settings; None = plain DICOM.
    tls: ClientTls | None = None

    @property
    def where(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls is not None else "")


def _make_ae(peer: DimsePeer) -> AE:
    enable_tcp_nodelay()
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.connection_timeout = peer.timeout_s
    return ae


@dataclass
class _Attempt:
    """What happened below the association: TCP connection made, the TLS context (and its refusal)."""

    connected: threading.Event
    tls: DicomTlsContext | None = None

    def is_set(self) -> bool:
        return self.connected.is_set()


def _associate(ae: AE, peer: DimsePeer) -> tuple[Association, _Attempt]:
    """Request an association (over TLS when the peer says so).

    Raises
    ------
    TlsError
        Our TLS files (CA bundle, client certificate) cannot be used.
    """
    attempt = _Attempt(threading.Event())
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, lambda event: attempt.connected.set())]
    kwargs: dict[str, Any] = {}
    if peer.tls is not None:
        attempt.tls = client_context(peer.tls)
        kwargs["tls_args"] = (attempt.tls, peer.tls.server_name or peer.host)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=handlers, **kwargs)
    return assoc, attempt


def _not_established(assoc: Association, peer: DimsePeer, attempt: _Attempt) -> tuple[DeliveryOutcome, str]:
    """Why an association was not established, and whether that is permanent."""
    where = peer.where
    tls = attempt.tls
    if tls is not None and tls.last_error:
        outcome = DeliveryOutcome.PERMANENT_FAILURE if tls.last_error_permanent else DeliveryOutcome.RETRYING
        return outcome, f"TLS handshake with {where} failed: {tls.last_error}"
    if not attempt.is_set():
        return DeliveryOutcome.RETRYING, f"cannot connect to {where} (refused or timed out)"
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = int(getattr(prim, "result", 0) or 0)
        source = int(getattr(prim, "result_source", 0) or 0)
        diag = int(getattr(prim, "diagnostic", 0) or 0)
        reason = _REJECT_REASONS.get((source, diag), f"source {source}, reason {diag}")
        if result == 0x01:
            return DeliveryOutcome.PERMANENT_FAILURE, f"association rejected (permanent) by {where}: {reason}"
        return DeliveryOutcome.RETRYING, f"association rejected (transient) by {where}: {reason}"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered, but refused every SOP class / transfer syntax we proposed (pynetdicom aborts).
        return DeliveryOutcome.PERMANENT_FAILURE, f"{where} accepted none of the proposed SOP classes"
    if assoc.is_aborted:
        return DeliveryOutcome.RETRYING, f"association aborted by {where}"
    return DeliveryOutcome.RETRYING, f"association with {where} not established (timeout)"


def echo_dimse(peer: DimsePeer) -> EchoResult:
    """C-ECHO ``peer``; never raises.

    Parameters
    ----------
    peer
        The destination.

    Returns
    -------
    EchoResult
        ok when the association was accepted and the echo answered 0x0000.
    """
    start = time.monotonic()
    try:
        ae = _make_ae(peer)
        ae.add_requested_context(VERIFICATION)
        try:
            assoc, attempt = _associate(ae, peer)
        except TlsError as exc:
            return EchoResult(False, f"TLS settings: {exc}", time.monotonic() - start, False)
        if not assoc.is_established:
            outcome, msg = _not_established(assoc, peer, attempt)
            return EchoResult(False, msg, time.monotonic() - start, outcome is DeliveryOutcome.RETRYING)
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if not status or "Status" not in status:
            return EchoResult(False, "no C-ECHO response (timeout or abort)", time.monotonic() - start, True)
        code = int(status.Status)
        if code != 0:
            return EchoResult(False, f"C-ECHO status 0x{code:04X}", time.monotonic() - start, False)
        return EchoResult(True, f"C-ECHO ok ({peer.where})", time.monotonic() - start)
    except Exception as exc:
        return EchoResult(
            False, f"C-ECHO failed: {type(exc).__name__}: {exc}", time.monotonic() - start, True
        )


def _file_contexts(files: Sequence[Path]) -> tuple[list[tuple[Path, UID, UID, str]], list[FileStatus]]:
    """(path, sop class, transfer syntax, sop instance) of readable files; unreadable ones as failures."""
    ok: list[tuple[Path, UID, UID, str]] = []
    bad: list[FileStatus] = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            sop_class = UID(str(meta.MediaStorageSOPClassUID))
            ts = UID(str(meta.TransferSyntaxUID))
            sop = str(meta.get("MediaStorageSOPInstanceUID", ""))
        except Exception as exc:
            bad.append(
                FileStatus(
                    path, None, None, DeliveryOutcome.PERMANENT_FAILURE, f"cannot read file meta: {exc}"
                )
            )
            continue
        ok.append((path, sop_class, ts, sop))
    return ok, bad


def _batches(
    items: list[tuple[Path, UID, UID, str]],
) -> list[tuple[list[tuple[Path, UID, UID, str]], list[tuple[UID, list[UID]]]]]:
    """Split files into associations of at most 128 presentation contexts each."""
    batches: list[tuple[list[tuple[Path, UID, UID, str]], list[tuple[UID, list[UID]]]]] = []
    files: list[tuple[Path, UID, UID, str]] = []
    contexts: dict[tuple[UID, tuple[UID, ...]], None] = {}
    for item in items:
        _, sop_class, ts, _ = item
        tss = (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if not ts.is_compressed else (ts,)
        key = (sop_class, tss)
        if key not in contexts and len(contexts) >= _MAX_CONTEXTS:
            batches.append((files, [(k[0], list(k[1])) for k in contexts]))
            files, contexts = [], {}
        contexts.setdefault(key, None)
        files.append(item)
    if files:
        batches.append((files, [(k[0], list(k[1])) for k in contexts]))
    return batches


def send_dimse(peer: DimsePeer, files: Sequence[Path]) -> DeliveryResult:
    """C-STORE ``files`` to ``peer`` on one association (more when over 128 contexts); never raises.

    Parameters
    ----------
    peer
        The destination.
    files
        Part 10 files.

    Returns
    -------
    DeliveryResult
        Per-file statuses and the overall outcome (see :class:`DeliveryResult`).
    """
    name = peer.name or peer.ae_title
    items, statuses = _file_contexts(files)
    for batch, contexts in _batches(items):
        statuses.extend(_send_batch(peer, batch, contexts))
    result = combine(name, statuses)
    if not result.ok:
        # DEBUG only: the caller (pipeline runner, CLI) reports the failure once, with its context.
        LOGGER.debug("delivery to %s: %s: %s", name, result.outcome.value, result.message)
    return result


def _send_batch(
    peer: DimsePeer, batch: list[tuple[Path, UID, UID, str]], contexts: list[tuple[UID, list[UID]]]
) -> list[FileStatus]:
    out: list[FileStatus] = []
    try:
        ae = _make_ae(peer)
        for sop_class, tss in contexts:
            ae.add_requested_context(sop_class, tss)
        assoc, attempt = _associate(ae, peer)
    except TlsError as exc:
        # Our own CA bundle or client certificate is unusable: no retry fixes that, an admin must.
        msg = f"TLS settings: {exc}"
        return [FileStatus(p, sop, None, DeliveryOutcome.PERMANENT_FAILURE, msg) for p, _, _, sop in batch]
    except Exception as exc:
        msg = f"association failed: {type(exc).__name__}: {exc}"
        return [FileStatus(p, sop, None, DeliveryOutcome.RETRYING, msg) for p, _, _, sop in batch]
    if not assoc.is_established:
        outcome, msg = _not_established(assoc, peer, attempt)
        return [FileStatus(p, sop, None, outcome, msg) for p, _, _, sop in batch]
    try:
        for path, sop_class, _ts, sop in batch:
            if not assoc.is_established:
                out.append(
                    FileStatus(path, sop, None, DeliveryOutcome.RETRYING, "association lost before sending")
                )
                continue
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:
                # No accepted presentation context for this SOP class / transfer syntax: the peer refused it.
                msg = f"SOP class {sop_class} not accepted by the destination ({exc})"
                out.append(FileStatus(path, sop, None, DeliveryOutcome.PERMANENT_FAILURE, msg[:300]))
                continue
            except (AttributeError, OSError) as exc:
                out.append(
                    FileStatus(path, sop, None, DeliveryOutcome.PERMANENT_FAILURE, f"cannot send: {exc}")
                )
                continue
            except Exception as exc:  # e.g. RuntimeError when the association dropped meanwhile
                msg = f"C-STORE failed: {type(exc).__name__}: {exc}"
                out.append(FileStatus(path, sop, None, DeliveryOutcome.RETRYING, msg[:300]))
                continue
            if not status or "Status" not in status:
                out.append(
                    FileStatus(
                        path, sop, None, DeliveryOutcome.RETRYING, "no C-STORE response (timeout or abort)"
                    )
                )
                continue
            code = int(status.Status)
            cls = classify_dimse_status(code)
            comment = str(status.get("ErrorComment", "") or "").strip()
            msg = f"C-STORE status 0x{code:04X} ({cls.value})" + (f": {comment}" if comment else "")
            out.append(FileStatus(path, sop, code, outcome_of(cls), msg))
    finally:
        if assoc.is_established:
            assoc.release()
    return out
