"""TLS for DICOM (PS3.15 Annex B, BCP 195 profiles) and HTTPS: SSL contexts built from settings, and the
certificate-file checks of ``dicomnode check-config``.

Only the standard library's :mod:`ssl` is used (no third-party crypto package, no torch/highdicom: ``ingest``
imports this module).

* :func:`server_context` builds the context of the DICOM TLS listener: our certificate and key, TLS 1.2 or
  newer with the cipher suites of the BCP 195 profiles (:data:`BCP195_CIPHERS`), and, for mutual TLS, the CA
  bundle that client certificates must chain to. Its ``wrap_socket`` bounds the handshake in time and turns a
  refused handshake (untrusted, expired or missing client certificate, plain DICOM sent to the TLS port) into
  one WARNING line naming the peer and the reason; pynetdicom then drops the connection without a traceback.
* :func:`client_context` builds the context of an SCU (delivery C-STORE, ``dicomnode echo``) from a
  :class:`ClientTls`: the peer certificate is verified (chain, validity dates, host name) unless switched off;
  a refused handshake is recorded on the context (:attr:`DicomTlsContext.last_error`, a one-line reason) so
  the caller reports it, and pynetdicom's own error lines and traceback for it are filtered out.
* :func:`harden` applies the same protocol floor and cipher suites to another context (uvicorn's HTTPS one).
* :func:`check_server_files` / :func:`check_ca_bundle` return one line per problem with certificate files
  (unreadable, not PEM, expired or not yet valid, key not matching the certificate, CA bundle unparsable).

BCP 195 (RFC 7525 / RFC 9325) as profiled by PS3.15 B.9 ("BCP 195 TLS Secure Transport Connection Profile")
and B.10 ("Non-Downgrading BCP 195 TLS Secure Transport Connection Profile", dcmtk's default): TLS 1.2 or
later, forward-secret AEAD suites only (ECDHE/DHE with AES-GCM); TLS 1.3 suites are all AEAD and are left as
OpenSSL offers them.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import ConfigError

if TYPE_CHECKING:
    from dicomnode.config import HttpSettings, Settings

__all__ = [
    "BCP195_CIPHERS",
    "CertificateInfo",
    "ClientTls",
    "DicomTlsContext",
    "TlsError",
    "certificate_info",
    "check_ca_bundle",
    "check_server_files",
    "check_settings",
    "client_context",
    "describe_ssl_error",
    "harden",
    "https_context",
    "listeners_line",
    "server_context",
    "summary_lines",
    "uvicorn_options",
]

LOGGER = logging.getLogger(__name__)

#: TLS 1.2 cipher suites of the BCP 195 profiles (PS3.15 B.9-B.11, RFC 7525 section 4.2): ECDHE/DHE key
#: exchange with AES-GCM, for RSA and ECDSA certificates. OpenSSL names.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)

#: Default time a peer has to complete the TLS handshake on the DICOM TLS port.
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


class TlsError(ConfigError):
    """A certificate, key or CA bundle cannot be used; the message is one line naming the file."""


# -- reasons in words ------------------------------------------------------------------------------------

_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate (mutual TLS is required)",
    "CERTIFICATE_REQUIRED": "the peer requires a client certificate and none was sent",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and none was sent",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate (expired)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer refused our certificate (decrypt error)",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (plain DICOM on a TLS port?)",
    "HTTP_REQUEST": "the peer sent plain HTTP to a TLS port",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (TLS 1.2 or later is required)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (TLS 1.2 or later is required)",
    "NO_SHARED_CIPHER": "no cipher suite in common (BCP 195 suites are required)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake failure (no common cipher suite or certificate refused)",
}


def describe_ssl_error(exc: BaseException) -> str:
    """A one-line, human reason for a failed TLS handshake (no traceback, no OpenSSL file/line noise)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = str(exc.verify_message or "").strip() or "verification failed"
        return f"certificate not accepted: {detail}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if reason in _REASONS:
            return _REASONS[reason]
        if reason:
            return reason.lower().replace("_", " ")
        return str(exc.args[1] if len(exc.args) > 1 else exc).split(" (_ssl")[0]
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no TLS handshake in time"
    if isinstance(exc, ConnectionError):
        return "connection closed by the peer during the TLS handshake"
    return f"{type(exc).__name__}: {exc}"


def _permanent(exc: BaseException) -> bool:
    # Trust and protocol problems do not go away by retrying; timeouts and resets may.
    return isinstance(exc, ssl.SSLError)


# -- contexts --------------------------------------------------------------------------------------------


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 or later with the BCP 195 cipher suites (TLS 1.3 suites as OpenSSL offers them)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _password(path: Path, key_password: str | None) -> Callable[[], str]:
    def get() -> str:
        if key_password is None:
            # Without this callback OpenSSL would prompt on the terminal (and hang a service).
            raise TlsError(f"{path}: the private key is encrypted; set key_password")
        return key_password

    return get


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path, key_password: str | None) -> None:
    for p in (certificate, private_key):
        _readable(p)
    try:
        ctx.load_cert_chain(str(certificate), str(private_key), password=_password(private_key, key_password))
    except TlsError:
        raise
    except ssl.SSLError as exc:
        reason = str(exc.reason or "")
        if reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"{private_key}: private key does not match the certificate {certificate}"
            ) from None
        key_text = _head(private_key)
        if reason in ("BAD_DECRYPT", "BAD_PASSWORD_READ") or (key_password and b"ENCRYPTED" in key_text):
            raise TlsError(f"{private_key}: cannot decrypt the private key (wrong key_password?)") from None
        if not _PEM_CERT.search(_head(certificate)):
            raise TlsError(f"{certificate}: no PEM certificate in the file") from None
        if b"PRIVATE KEY-----" not in key_text:
            raise TlsError(f"{private_key}: no PEM private key in the file") from None
        detail = reason.lower().replace("_", " ") or str(exc.args[-1]).split(" (_ssl")[0]
        raise TlsError(
            f"{certificate} / {private_key}: cannot load the certificate and key ({detail})"
        ) from None


def _head(path: Path, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


def _load_cas(ctx: ssl.SSLContext, ca_bundle: Path) -> None:
    _readable(ca_bundle)
    try:
        ctx.load_verify_locations(cafile=str(ca_bundle))
    except ssl.SSLError as exc:
        raise TlsError(
            f"{ca_bundle}: not a PEM CA bundle ({str(exc.reason or exc).lower().replace('_', ' ')})"
        ) from None


def _readable(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise TlsError(f"{path}: cannot read ({exc.strerror or exc})") from None


class DicomTlsContext(ssl.SSLContext):
    """An :class:`ssl.SSLContext` for pynetdicom that reports refused handshakes in one line.

    Server side (``wrap_socket(server_side=True)``, called by pynetdicom in its accept loop): the handshake
    gets :attr:`handshake_timeout_s` (a peer that connects and says nothing cannot hold the listener), and a
    failure is logged once at WARNING with the peer address and the reason, then re-raised (pynetdicom drops
    the connection; no association is created). Client side: a failed handshake is kept in
    :attr:`last_error` / :attr:`last_error_permanent` and raised as a plain :class:`OSError` carrying that
    reason, so pynetdicom reports an ordinary connection failure (no traceback).
    """

    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    last_error: str | None = None
    last_error_permanent: bool = False
    #: "listener name" used in the server-side log line.
    label: str = "DICOM TLS"

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        if not server_side:
            ssock = super().wrap_socket(
                sock,
                server_side=False,
                do_handshake_on_connect=do_handshake_on_connect,
                suppress_ragged_eofs=suppress_ragged_eofs,
                server_hostname=server_hostname,
                session=session,
            )
            if isinstance(ssock, _ClientSocket):
                ssock._dn_context = self
            return ssock
        try:
            host, port = sock.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "unknown peer"
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout_s)
        try:
            ssock = super().wrap_socket(
                sock,
                server_side=True,
                do_handshake_on_connect=True,
                suppress_ragged_eofs=suppress_ragged_eofs,
            )
        except (OSError, ValueError) as exc:
            LOGGER.warning("%s: connection from %s refused: %s", self.label, peer, describe_ssl_error(exc))
            with contextlib.suppress(OSError):
                sock.close()
            raise
        ssock.settimeout(previous)
        LOGGER.debug("%s: %s connected with %s (%s)", self.label, peer, ssock.version(), ssock.cipher())
        return ssock


class TlsHandshakeError(ConnectionError):
    """A client-side handshake that failed; the message is the one-line reason."""


class _ClientSocket(ssl.SSLSocket):
    _dn_context: DicomTlsContext | None = None

    def connect(self, address: Any) -> None:
        _PYNETDICOM_FILTER.disarm()  # a stale arm from an earlier attempt in this thread must hide nothing
        try:
            super().connect(address)
        except (ssl.SSLError, TimeoutError, ConnectionError) as exc:
            if isinstance(exc, TlsHandshakeError):
                raise
            reason = describe_ssl_error(exc)
            ctx = self._dn_context
            if ctx is not None and isinstance(exc, ssl.SSLError | TimeoutError):
                ctx.last_error = reason
                ctx.last_error_permanent = _permanent(exc)
            if isinstance(exc, ssl.SSLError):
                _PYNETDICOM_FILTER.arm()
                LOGGER.debug("TLS handshake with %s failed: %s", address, reason)
                raise TlsHandshakeError(reason) from None
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3: a server that refuses our client certificate says so after our side of the handshake
        # has completed, in an alert that arrives with the first read. Report it like a closed connection
        # (pynetdicom then ends the association quietly) and keep the reason for the caller.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError):
                raise
            reason = describe_ssl_error(exc)
            ctx = self._dn_context
            if ctx is not None and ctx.last_error is None:
                ctx.last_error = reason
                ctx.last_error_permanent = True
            LOGGER.debug("TLS connection ended by an alert: %s", reason)
            return b""


DicomTlsContext.sslsocket_class = _ClientSocket


class _SuppressConnectNoise(logging.Filter):
    """Drops pynetdicom's two ERROR lines and traceback for a TLS handshake we already explained.

    Armed (per thread) by the client socket just before it raises; pynetdicom logs from the same thread right
    after, in its ``AssociationSocket.connect``; the reason then reaches the user once, through the
    delivery result or the ``echo`` output.
    """

    _PREFIXES = ("Association request failed: unable to connect", "TCP Initialisation Error")

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def arm(self) -> None:
        self._local.armed = 2

    def disarm(self) -> None:
        self._local.armed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        armed = getattr(self._local, "armed", 0)
        if armed and str(record.msg).startswith(self._PREFIXES):
            self._local.armed = armed - 1
            return False
        return True


_PYNETDICOM_FILTER = _SuppressConnectNoise()
_FILTER_LOCK = threading.Lock()
_FILTER_INSTALLED = False


def _install_filter() -> None:
    global _FILTER_INSTALLED
    with _FILTER_LOCK:
        if not _FILTER_INSTALLED:
            logging.getLogger("pynetdicom.transport").addFilter(_PYNETDICOM_FILTER)
            _FILTER_INSTALLED = True


def server_context(
    certificate: Path,
    private_key: Path,
    *,
    key_password: str | None = None,
    ca_bundle: Path | None = None,
    require_client_certificate: bool = False,
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
) -> DicomTlsContext:
    """The context of a DICOM TLS listener (pass it to ``AE.start_server(..., ssl_context=...)``).

    Parameters
    ----------
    certificate, private_key
        PEM files: our certificate (optionally followed by its chain) and its private key.
    key_password
        Password of an encrypted private key.
    ca_bundle
        PEM CA certificates that client certificates must chain to (mutual TLS). With it and without
        ``require_client_certificate``, a client certificate is asked for and verified if sent.
    require_client_certificate
        Refuse clients without a valid certificate (mutual TLS); needs ``ca_bundle``.
    handshake_timeout_s
        Time a client has to complete the handshake.

    Raises
    ------
    TlsError
        A file is unreadable or unusable; one line naming it.
    """
    ctx = DicomTlsContext(ssl.PROTOCOL_TLS_SERVER)
    harden(ctx)
    _load_chain(ctx, Path(certificate), Path(private_key), key_password)
    if require_client_certificate and ca_bundle is None:
        raise TlsError("mutual TLS (require_client_certificate) needs a ca_bundle")
    if ca_bundle is not None:
        _load_cas(ctx, Path(ca_bundle))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.handshake_timeout_s = handshake_timeout_s
    return ctx


def https_context(certificate: Path, private_key: Path, *, key_password: str | None = None) -> ssl.SSLContext:
    """The context of the HTTPS listener (uvicorn): our certificate, TLS 1.2+, BCP 195 suites, HTTP/1.1.

    Raises
    ------
    TlsError
        A file is unreadable or unusable; one line naming it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    harden(ctx)
    _load_chain(ctx, Path(certificate), Path(private_key), key_password)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def uvicorn_options(http: HttpSettings) -> dict[str, Any]:
    """``uvicorn.Config`` keywords for ``http``: the HTTPS context (when ``http.tls``) and trusted proxies.

    Raises
    ------
    TlsError
        ``http.tls`` names a certificate or key that cannot be used (one line naming it).
    """
    out: dict[str, Any] = {
        "proxy_headers": bool(http.forwarded_allow_ips),
        "forwarded_allow_ips": list(http.forwarded_allow_ips) or None,
    }
    if http.tls is not None:
        password = http.tls.key_password.get_secret_value() if http.tls.key_password is not None else None
        ctx = https_context(http.tls.certificate, http.tls.private_key, key_password=password)
        out["ssl_context_factory"] = lambda _config, _default: ctx
    return out


def listeners_line(settings: Settings, *, dicom: bool = True) -> str:
    """``HTTP https://host:port, DICOM AE@host:port, DICOM TLS AE@host:port`` for the start-up line."""
    http = settings.http
    parts = [f"HTTP {'https' if http.tls is not None else 'http'}://{http.host}:{http.port}"]
    d = settings.dicom
    if dicom and d.port is not None:
        parts.append(f"DICOM {d.ae_title}@{d.host}:{d.port}")
    if dicom and d.tls is not None:
        mutual = ", client certificate required" if d.tls.require_client_certificate else ""
        parts.append(f"DICOM TLS {d.ae_title}@{d.host}:{d.tls.port}{mutual}")
    return ", ".join(parts)


@dataclass(frozen=True)
class ClientTls:
    """TLS settings of one outgoing connection (a destination, an echo).

    ``ca_bundle`` None = the system's trusted CAs. ``certificate`` / ``private_key`` are our client
    certificate for peers that require mutual TLS. ``verify`` False accepts any peer certificate (testing
    only); ``check_hostname`` False accepts a valid certificate issued for another name (many DICOM peers
    have certificates naming the AE, not the host). ``server_name`` is the name expected in the peer's
    certificate (default: the host we connect to).
    """

    ca_bundle: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    key_password: str | None = None
    verify: bool = True
    check_hostname: bool = True
    server_name: str | None = None


def client_context(tls: ClientTls) -> DicomTlsContext:
    """The context of an SCU association (``ae.associate(..., tls_args=(ctx, server_name))``).

    Raises
    ------
    TlsError
        A file is unreadable or unusable; one line naming it.
    """
    _install_filter()
    ctx = DicomTlsContext(ssl.PROTOCOL_TLS_CLIENT)
    harden(ctx)
    if tls.verify:
        if tls.ca_bundle is not None:
            _load_cas(ctx, Path(tls.ca_bundle))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = tls.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.certificate is not None or tls.private_key is not None:
        if tls.certificate is None or tls.private_key is None:
            raise TlsError("a client certificate needs both certificate and private_key")
        _load_chain(ctx, Path(tls.certificate), Path(tls.private_key), tls.key_password)
    return ctx


# -- certificate files: dates and checks -----------------------------------------------------------------

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class CertificateInfo:
    """Validity period of one certificate (UTC)."""

    not_before: datetime
    not_after: datetime

    def problem(self, now: datetime) -> str | None:
        """Why the certificate is not valid at ``now`` ("expired on ...", "not valid before ..."), or None."""
        if now > self.not_after:
            return f"expired on {self.not_after:%Y-%m-%d %H:%M} UTC"
        if now < self.not_before:
            return f"not valid before {self.not_before:%Y-%m-%d %H:%M} UTC"
        return None


def _der_item(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at ``pos``."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag = buf[pos]
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(buf):
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, end


def _der_time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ (RFC 5280: 50-99 -> 19xx)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    return datetime.strptime(text.rstrip("Z")[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def _validity(der: bytes) -> CertificateInfo:
    # Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
    # issuer, validity SEQUENCE { notBefore, notAfter }, ... }, ... }  (RFC 5280 section 4.1)
    _, cert, _ = _der_item(der, 0)
    _, pos, _ = _der_item(der, cert)  # tbsCertificate content
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _der_item(der, pos)
    tag, vpos, _ = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("no validity")
    t1, s1, e1 = _der_item(der, vpos)
    t2, s2, e2 = _der_item(der, e1)
    return CertificateInfo(_der_time(t1, der[s1:e1]), _der_time(t2, der[s2:e2]))


def certificate_info(path: Path) -> list[CertificateInfo]:
    """Validity of each certificate in a PEM file (a certificate, a chain or a CA bundle), in file order.

    Raises
    ------
    TlsError
        Unreadable file, no PEM certificate in it, or one that cannot be decoded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise TlsError(f"{path}: no PEM certificate in the file")
    out = []
    for i, block in enumerate(blocks, 1):
        try:
            out.append(_validity(base64.b64decode(b"".join(block.split()), validate=True)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TlsError(f"{path}: certificate {i} cannot be decoded ({exc})") from None
    return out


def _date_problems(path: Path, now: datetime, what: str) -> list[str]:
    try:
        infos = certificate_info(path)
    except TlsError as exc:
        return [str(exc)]
    out = []
    for i, info in enumerate(infos):
        problem = info.problem(now)
        if problem:
            which = what if i == 0 and what == "certificate" else f"{what} {i + 1}"
            out.append(f"{path}: {which} {problem}")
    return out


def check_server_files(
    certificate: Path,
    private_key: Path,
    *,
    key_password: str | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Problems with a certificate and its key, one line each (empty = usable).

    Checks: both readable, the certificate is PEM and within its validity dates (each certificate of a
    chain), the key is PEM, decrypts with ``key_password`` and matches the certificate.
    """
    now = now or datetime.now(UTC)
    problems = []
    for p in (certificate, private_key):
        try:
            _readable(Path(p))
        except TlsError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    try:
        certificate_info(Path(certificate))
    except TlsError as exc:
        return [str(exc)]  # not a certificate at all: the key cannot be matched against it either
    problems += _date_problems(Path(certificate), now, "certificate")
    try:
        _load_chain(
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), Path(certificate), Path(private_key), key_password
        )
    except TlsError as exc:
        problems.append(str(exc))
    return problems


def check_ca_bundle(ca_bundle: Path, *, now: datetime | None = None) -> list[str]:
    """Problems with a CA bundle, one line each: unreadable, not PEM, or no CA certificate valid now.

    A bundle of one CA whose certificate expired trusts nothing any more: a problem. A large bundle (a copy of
    the system's) holding some expired CA certificates beside valid ones is normal and not reported.
    """
    now = now or datetime.now(UTC)
    try:
        _load_cas(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), Path(ca_bundle))
    except TlsError as exc:
        return [str(exc)]
    problems = _date_problems(Path(ca_bundle), now, "CA certificate")
    try:
        count = len(certificate_info(Path(ca_bundle)))
    except TlsError as exc:
        return [str(exc)]
    return problems if len(problems) == count else []


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def check_settings(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Every problem with the certificate files the settings name, one line each (``check-config``).

    Lines read ``config: dicom.tls: /etc/dicomnode/node.pem: certificate expired on 2026-01-01 00:00 UTC``.
    Checked: the DICOM TLS and HTTPS certificate/key pairs (readable, PEM, within their dates, key matches,
    encrypted key opens), every CA bundle (parses, CA certificates within their dates) and every
    destination's client certificate.
    """
    now = now or datetime.now(UTC)
    items: list[tuple[str, list[str]]] = []
    d = settings.dicom.tls
    if d is not None:
        pw = _secret(d.key_password)
        items.append(
            ("dicom.tls", check_server_files(d.certificate, d.private_key, key_password=pw, now=now))
        )
        if d.ca_bundle is not None:
            items.append(("dicom.tls.ca_bundle", check_ca_bundle(d.ca_bundle, now=now)))
    h = settings.http.tls
    if h is not None:
        pw = _secret(h.key_password)
        items.append(("http.tls", check_server_files(h.certificate, h.private_key, key_password=pw, now=now)))
    for i, dest in enumerate(settings.destinations):
        t = dest.tls
        if t is None:
            continue
        where = f"destinations[{i}] ({dest.name}).tls"
        if t.ca_bundle is not None:
            items.append((f"{where}.ca_bundle", check_ca_bundle(t.ca_bundle, now=now)))
        if t.certificate is not None and t.private_key is not None:
            pw = _secret(t.key_password)
            items.append((where, check_server_files(t.certificate, t.private_key, key_password=pw, now=now)))
    return [f"config: {where}: {p}" for where, problems in items for p in problems]


def summary_lines(settings: Settings) -> list[str]:
    """The TLS lines of the ``check-config`` summary (empty when nothing uses TLS)."""
    lines = []
    d = settings.dicom.tls
    if d is not None:
        who = "client certificate required" if d.require_client_certificate else "client certificate optional"
        plain = f"plain port {settings.dicom.port}" if settings.dicom.port is not None else "no plain port"
        lines.append(f"  dicom tls     port {d.port} ({plain}); {who if d.ca_bundle else 'no client check'}")
    if settings.http.tls is not None:
        lines.append(
            f"  http tls      HTTPS on port {settings.http.port}; HSTS max-age {settings.http.hsts_seconds}"
        )
    for dest in settings.destinations:
        if dest.tls is not None:
            t = dest.tls
            trust = str(t.ca_bundle) if t.ca_bundle else "system CAs"
            verify = f"verified against {trust}" if t.verify else "NOT VERIFIED"
            client = ", client certificate" if t.certificate else ""
            lines.append(f"  tls to        {dest.name}: {verify}{client}")
    return lines
