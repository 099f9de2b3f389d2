"""STOW-RS delivery and a DICOMweb probe (dicomweb-client over requests).

dicomweb-client's own HTTP retries are switched off: the delivery retry policy decides, durably, when to try
again. HTTP 5xx / 408 / 429 and connection errors are transient, other 4xx permanent; a 200/202 response is
read instance by instance (FailedSOPSequence FailureReason, ReferencedSOPSequence), and an instance the
response does not confirm is not counted as delivered.

HTTPS: the server certificate is always verified (requests: chain to ``ca_bundle`` or the system's CAs, host
name, dates) unless ``verify`` is False; a certificate that is not accepted is a permanent failure whose
message says why (an admin must fix trust, retrying does not), and a client certificate can be presented.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter

from dicomnode.delivery.dimse import EchoResult
from dicomnode.delivery.result import (
    DeliveryResult,
    FileStatus,
    StatusClass,
    classify_dimse_status,
    classify_http_status,
    combine,
    outcome_of,
)
from dicomnode.domain import DeliveryOutcome
from dicomnode.tls import describe_ssl_error

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomwebPeer:
    """A DICOMweb service root (``{url}/studies``), with optional basic or bearer authentication."""

    url: str
    name: str = ""
    timeout_s: float = 30.0
    username: str | None = None
    password: str | None = None
    token: str | None = None
    #: PEM CA certificates the server certificate must chain to; None = the system's trusted CAs.
    ca_bundle: Path | None = None
    #: False: accept any server certificate (testing only).
    verify: bool = True
    #: Our client certificate and key (PEM files) for servers that require one.
    client_cert: tuple[Path, Path] | None = None


class _TlsAdapter(HTTPAdapter):
    """Sends every request with the destination's certificate settings.

    requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` in the environment replace a session's
    ``verify`` (psf/requests#3829); the configured CA bundle must win, so it is applied here, per request.
    """

    def __init__(self, verify: bool | str, cert: tuple[str, str] | None) -> None:
        super().__init__(max_retries=0)
        self._verify = verify
        self._cert = cert

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self._verify
        if self._cert is not None:
            kwargs["cert"] = self._cert
        return super().send(request, *args, **kwargs)


def _session(peer: DicomwebPeer) -> requests.Session:
    session = requests.Session()
    verify: bool | str = str(peer.ca_bundle) if (peer.verify and peer.ca_bundle is not None) else peer.verify
    cert = (str(peer.client_cert[0]), str(peer.client_cert[1])) if peer.client_cert is not None else None
    session.verify = verify
    if verify is not True or cert is not None:
        session.mount("https://", _TlsAdapter(verify, cert))
    if peer.username is not None:
        session.auth = (peer.username, peer.password or "")
    if peer.token is not None:
        session.headers["Authorization"] = f"Bearer {peer.token}"
    return session


def _client(peer: DicomwebPeer) -> DICOMwebClient:
    client = DICOMwebClient(url=peer.url.rstrip("/"), session=_session(peer), timeout=peer.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _tls_reason(exc: BaseException) -> str:
    """The TLS reason buried in a requests/urllib3 SSLError chain, in one line."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return describe_ssl_error(e)
        todo += [a for a in e.args if isinstance(a, BaseException)]
        for nxt in (getattr(e, "reason", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return str(exc).split("(Caused by")[-1].strip(" ()")[:200] or type(exc).__name__


def _response_dataset(resp: requests.Response | None) -> Dataset | None:
    if resp is None or not resp.content:
        return None
    try:
        return Dataset.from_json(resp.json())
    except Exception:  # not DICOM JSON (an HTML error page, XML): no per-instance detail
        return None


def _by_instance(response: Dataset | None) -> tuple[dict[str, int], dict[str, int]]:
    """(referenced SOP -> warning reason or 0, failed SOP -> failure reason) from a STOW-RS response."""
    ok: dict[str, int] = {}
    failed: dict[str, int] = {}
    if response is None:
        return ok, failed
    for item in response.get("ReferencedSOPSequence", None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid:
            ok[uid] = int(item.get("WarningReason", 0) or 0)
    for item in response.get("FailedSOPSequence", None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid:
            failed[uid] = int(item.get("FailureReason", 0xC000) or 0xC000)
    return ok, failed


def send_stow(peer: DicomwebPeer, files: Sequence[Path]) -> DeliveryResult:
    """STOW-RS ``files`` to ``peer`` in one request; never raises.

    Parameters
    ----------
    peer
        The DICOMweb destination.
    files
        Part 10 files (sent as stored; pixel data is not decoded).

    Returns
    -------
    DeliveryResult
        Per-file statuses and the overall outcome.
    """
    name = peer.name or peer.url
    statuses: list[FileStatus] = []
    datasets: list[Dataset] = []
    sent: list[tuple[Path, str]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            sop = str(ds.SOPInstanceUID)
        except Exception as exc:
            statuses.append(
                FileStatus(path, None, None, DeliveryOutcome.PERMANENT_FAILURE, f"cannot read: {exc}")
            )
            continue
        datasets.append(ds)
        sent.append((path, sop))

    http_code: int | None = None
    response: Dataset | None = None
    transport_error: str | None = None
    tls_failed = False
    if datasets:
        try:
            response = _client(peer).store_instances(datasets=datasets)
            http_code = 200
        except requests.HTTPError as exc:
            http_code = exc.response.status_code if exc.response is not None else 500
            response = _response_dataset(exc.response)
        except requests.exceptions.SSLError as exc:
            transport_error = f"TLS with {peer.url} failed: {_tls_reason(exc)}"
            tls_failed = True
        except (requests.ConnectionError, requests.Timeout) as exc:
            transport_error = f"cannot reach {peer.url}: {type(exc).__name__}"
        except requests.RequestException as exc:  # (an OSError too: caught before the next clause)
            transport_error = f"STOW-RS failed: {type(exc).__name__}: {exc}"
        except OSError as exc:  # requests' own: our client certificate / CA bundle file cannot be read
            transport_error = f"TLS settings: {exc}"
            tls_failed = True
        except Exception as exc:  # malformed response, unexpected media type
            transport_error = f"STOW-RS failed: {type(exc).__name__}: {exc}"

    ok, failed = _by_instance(response)
    for path, sop in sent:
        if transport_error is not None:
            # A certificate that is not accepted needs an admin, not a retry.
            outcome = DeliveryOutcome.PERMANENT_FAILURE if tls_failed else DeliveryOutcome.RETRYING
            statuses.append(FileStatus(path, sop, None, outcome, transport_error))
        elif sop in failed:
            code = failed[sop]
            cls = classify_dimse_status(code)
            if cls in (StatusClass.SUCCESS, StatusClass.WARNING):
                cls = StatusClass.PERMANENT  # listed as failed whatever the code says
            statuses.append(
                FileStatus(path, sop, code, outcome_of(cls), f"STOW-RS FailureReason 0x{code:04X}")
            )
        elif sop in ok and http_code is not None and http_code < 300:
            warn = ok[sop]
            statuses.append(
                FileStatus(path, sop, warn, DeliveryOutcome.SUCCESS, "stored" if not warn else "warning")
            )
        elif http_code is not None and http_code >= 300:
            cls = classify_http_status(http_code)
            statuses.append(FileStatus(path, sop, None, outcome_of(cls), f"HTTP {http_code}"))
        else:
            statuses.append(
                FileStatus(path, sop, None, DeliveryOutcome.RETRYING, "not confirmed in the STOW-RS response")
            )
    result = combine(name, statuses)
    if not result.ok:
        # DEBUG only: the caller (pipeline runner, CLI) reports the failure once, with its context.
        LOGGER.debug("delivery to %s: %s: %s", name, result.outcome.value, result.message)
    return result


def probe_dicomweb(peer: DicomwebPeer) -> EchoResult:
    """Check that ``peer`` answers a minimal QIDO-RS query (``GET {url}/studies?limit=1``); never raises."""
    start = time.monotonic()
    url = peer.url.rstrip("/") + "/studies"
    try:
        resp = _session(peer).get(
            url, params={"limit": "1"}, headers={"Accept": "application/dicom+json"}, timeout=peer.timeout_s
        )
    except requests.exceptions.SSLError as exc:
        return EchoResult(False, f"TLS with {peer.url} failed: {_tls_reason(exc)}", time.monotonic() - start)
    except OSError as exc:  # includes requests' own errors; unreadable certificate files
        if isinstance(exc, requests.RequestException):
            return EchoResult(
                False, f"cannot reach {peer.url}: {type(exc).__name__}", time.monotonic() - start, True
            )
        return EchoResult(False, f"TLS settings: {exc}", time.monotonic() - start)
    elapsed = time.monotonic() - start
    cls = classify_http_status(resp.status_code)
    if cls is StatusClass.SUCCESS:
        return EchoResult(True, f"DICOMweb ok (HTTP {resp.status_code})", elapsed)
    return EchoResult(False, f"DICOMweb probe HTTP {resp.status_code}", elapsed, cls is StatusClass.TRANSIENT)


def tls_fields(tls: Any) -> dict[str, Any]:
    """``DicomwebPeer`` keyword arguments from a config ``tls`` entry (None = defaults: verified)."""
    if tls is None:
        return {}
    out: dict[str, Any] = {"ca_bundle": tls.ca_bundle, "verify": tls.verify}
    if tls.certificate is not None and tls.private_key is not None:
        out["client_cert"] = (tls.certificate, tls.private_key)
    return out


def auth_fields(auth: Any) -> dict[str, str | None]:
    """``DicomwebPeer`` keyword arguments from a config ``auth`` entry (basic / bearer / None)."""
    if auth is None:
        return {}
    kind = getattr(auth, "kind", None)
    if kind == "basic":
        return {"username": auth.username, "password": auth.password.get_secret_value()}
    if kind == "bearer":
        return {"token": auth.token.get_secret_value()}
    return {}
