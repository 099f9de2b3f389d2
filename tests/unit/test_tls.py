"""dicomnode.tls: contexts (protocol floor, BCP 195 suites, client-certificate policy), real handshakes over
loopback sockets, certificate dates read from DER, and the certificate-file checks of ``check-config``.

Certificates are made by the test with the ``openssl`` command line (``tests/tls_testing.py``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tls_testing import Pki, make_pki

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError
from dicomnode.tls import (
    BCP195_CIPHERS,
    ClientTls,
    TlsError,
    certificate_info,
    check_ca_bundle,
    check_server_files,
    check_settings,
    client_context,
    describe_ssl_error,
    https_context,
    server_context,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _openssl_dates(path: Path) -> tuple[datetime, datetime]:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-startdate", "-enddate"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split("=", 1) for line in out.strip().splitlines())

    def parse(text: str) -> datetime:
        return datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)

    return parse(values["notBefore"]), parse(values["notAfter"])


def test_certificate_dates_match_openssl(pki: Pki) -> None:
    for path in (pki.ca, pki.node.cert, pki.expired.cert, pki.rogue.cert):
        (info,) = certificate_info(path)
        assert (info.not_before, info.not_after) == _openssl_dates(path)
    now = datetime.now(UTC)
    assert certificate_info(pki.node.cert)[0].problem(now) is None
    expired = certificate_info(pki.expired.cert)[0].problem(now)
    assert expired is not None and expired.startswith("expired on ")
    future = certificate_info(pki.node.cert)[0].problem(now - timedelta(days=30))
    assert future is not None and future.startswith("not valid before ")


def test_a_chain_file_lists_every_certificate(pki: Pki, tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.node.cert.read_bytes() + pki.ca.read_bytes())
    assert [i.not_after for i in certificate_info(chain)] == [
        certificate_info(pki.node.cert)[0].not_after,
        certificate_info(pki.ca)[0].not_after,
    ]


def test_check_server_files_one_line_per_problem(pki: Pki, tmp_path: Path) -> None:
    assert check_server_files(pki.node.cert, pki.node.key) == []
    (mismatch,) = check_server_files(pki.node.cert, pki.peer.key)
    assert "private key does not match the certificate" in mismatch and str(pki.peer.key) in mismatch
    (expired,) = check_server_files(pki.expired.cert, pki.expired.key)
    assert "certificate expired on" in expired
    missing = tmp_path / "nope.pem"
    (unreadable,) = check_server_files(missing, pki.node.key)
    assert unreadable.startswith(f"{missing}: cannot read")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    (not_pem,) = check_server_files(garbage, pki.node.key)
    assert not_pem == f"{garbage}: no PEM certificate in the file"
    # An expired certificate with a wrong key: both problems, each on its own line.
    assert len(check_server_files(pki.expired.cert, pki.node.key)) == 2


def test_encrypted_key_needs_its_password(pki: Pki, tmp_path: Path) -> None:
    enc = tmp_path / "enc.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.node.key), "-aes256", "-passout", "pass:s3cret", "-out", str(enc)],
        check=True,
        capture_output=True,
    )
    assert check_server_files(pki.node.cert, enc, key_password="s3cret") == []
    (no_pw,) = check_server_files(pki.node.cert, enc)
    assert "encrypted" in no_pw and "key_password" in no_pw
    (wrong,) = check_server_files(pki.node.cert, enc, key_password="wrong")
    assert "cannot decrypt" in wrong


def test_check_ca_bundle(pki: Pki, tmp_path: Path) -> None:
    assert check_ca_bundle(pki.ca) == []
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    (line,) = check_ca_bundle(bad)
    assert str(bad) in line and "CA bundle" in line
    later = datetime.now(UTC) + timedelta(days=30)
    (old,) = check_ca_bundle(pki.ca, now=later)
    assert "CA certificate 1 expired on" in old
    # A bundle with a valid CA beside the expired one still trusts something: not a problem.
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(pki.ca.read_bytes() + pki.expired.cert.read_bytes())
    assert check_ca_bundle(mixed) == []
    assert len(check_ca_bundle(mixed, now=later)) == 2


def test_contexts_enforce_tls12_and_bcp195_suites(pki: Pki) -> None:
    srv = server_context(pki.node.cert, pki.node.key)
    cli = client_context(ClientTls(ca_bundle=pki.ca))
    https = https_context(pki.node.cert, pki.node.key)
    allowed = set(BCP195_CIPHERS.split(":"))
    for ctx in (srv, cli, https):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and tls12 <= allowed
    assert srv.verify_mode is ssl.CERT_NONE
    assert cli.verify_mode is ssl.CERT_REQUIRED and cli.check_hostname
    mutual = server_context(pki.node.cert, pki.node.key, ca_bundle=pki.ca, require_client_certificate=True)
    assert mutual.verify_mode is ssl.CERT_REQUIRED
    optional = server_context(pki.node.cert, pki.node.key, ca_bundle=pki.ca)
    assert optional.verify_mode is ssl.CERT_OPTIONAL
    with pytest.raises(TlsError, match="needs a ca_bundle"):
        server_context(pki.node.cert, pki.node.key, require_client_certificate=True)
    with pytest.raises(TlsError, match="does not match"):
        server_context(pki.node.cert, pki.peer.key)
    with pytest.raises(TlsError, match="both certificate and private_key"):
        client_context(ClientTls(ca_bundle=pki.ca, certificate=pki.client.cert))
    assert issubclass(TlsError, ConfigError)  # start-up turns it into exit 2 with one line


class _Server:
    """A loopback TLS server thread running one handshake through ``ctx.wrap_socket``."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ctx = ctx
        self.result: str | BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        try:
            ssock = self.ctx.wrap_socket(conn, server_side=True)
            self.result = str(ssock.version())
            ssock.sendall(b"ok")
            ssock.close()
        except (OSError, ValueError) as exc:
            self.result = exc

    def join(self) -> str | BaseException | None:
        self.thread.join(timeout=20)
        self.listener.close()
        return self.result


@pytest.fixture
def tls_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="dicomnode.tls")
    yield caplog


def _client(port: int, ctx: ssl.SSLContext, name: str = "localhost") -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as s,
    ):
        return s.recv(2)


def test_real_handshake_and_refusals_log_one_line(pki: Pki, tls_logs: pytest.LogCaptureFixture) -> None:
    mutual = server_context(pki.node.cert, pki.node.key, ca_bundle=pki.ca, require_client_certificate=True)
    good = ssl.create_default_context(cafile=str(pki.ca))
    good.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    srv = _Server(mutual)
    assert _client(srv.port, good) == b"ok"
    assert srv.join() in ("TLSv1.2", "TLSv1.3")

    cases = {
        "no client certificate": (
            ssl.create_default_context(cafile=str(pki.ca)),
            "sent no client certificate",
        ),
        "expired": (pki.expired, "certificate has expired"),
        "untrusted": (pki.rogue, "certificate not accepted"),
    }
    for label, (what, expected) in cases.items():
        tls_logs.clear()
        if isinstance(what, ssl.SSLContext):
            ctx = what
        else:
            ctx = ssl.create_default_context(cafile=str(pki.ca))
            ctx.load_cert_chain(str(what.cert), str(what.key))
        srv = _Server(mutual)
        with pytest.raises((OSError, ssl.SSLError)):
            _client(srv.port, ctx)
        result = srv.join()
        assert isinstance(result, OSError), label
        warnings = [r for r in tls_logs.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, (label, [r.getMessage() for r in warnings])
        line = warnings[0].getMessage()
        assert "refused" in line and expected in line and "127.0.0.1:" in line, (label, line)
        assert warnings[0].exc_info is None and "\n" not in line


def test_old_protocols_and_weak_suites_are_refused(pki: Pki, tls_logs: pytest.LogCaptureFixture) -> None:
    srv_ctx = server_context(pki.node.cert, pki.node.key)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(pki.ca))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("AES128-SHA:AES256-SHA")  # no forward secrecy, CBC: not BCP 195
    srv = _Server(srv_ctx)
    with pytest.raises(ssl.SSLError):
        _client(srv.port, old)
    assert isinstance(srv.join(), ssl.SSLError)
    assert any("cipher" in r.getMessage() or "handshake" in r.getMessage() for r in tls_logs.records)

    plain = _Server(srv_ctx)  # a plain client on the TLS port
    with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as raw:
        raw.sendall(b"\x01\x00\x00\x00\x00\xcd" + b"\x00" * 205)  # an A-ASSOCIATE-RQ header, unencrypted
        with contextlib.suppress(OSError):
            raw.recv(10)
    assert isinstance(plain.join(), ssl.SSLError)
    assert "does not speak TLS" in tls_logs.records[-1].getMessage()


def test_server_handshake_times_out(pki: Pki, tls_logs: pytest.LogCaptureFixture) -> None:
    ctx = server_context(pki.node.cert, pki.node.key, handshake_timeout_s=0.3)
    srv = _Server(ctx)
    with socket.create_connection(("127.0.0.1", srv.port)):  # connects and never speaks
        result = srv.join()
    assert isinstance(result, TimeoutError)
    assert "no TLS handshake in time" in tls_logs.records[-1].getMessage()


def test_client_reports_untrusted_and_wrong_name(pki: Pki) -> None:
    cases = [
        (pki.rogue, ClientTls(ca_bundle=pki.ca), "localhost", "unable to get local issuer certificate"),
        (pki.expired, ClientTls(ca_bundle=pki.ca), "localhost", "certificate has expired"),
        (pki.elsewhere, ClientTls(ca_bundle=pki.ca), "localhost", "Hostname mismatch"),
    ]
    for cert, tls, name, expected in cases:
        srv = _Server(server_context(cert.cert, cert.key))
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            _client(srv.port, client_context(tls), name)
        srv.join()
        assert expected in describe_ssl_error(err.value)
    # The same wrongly named certificate is accepted when the host name check is off (the chain still is).
    srv = _Server(server_context(pki.elsewhere.cert, pki.elsewhere.key))
    assert _client(srv.port, client_context(ClientTls(ca_bundle=pki.ca, check_hostname=False))) == b"ok"
    srv.join()


def test_check_settings_names_the_section(pki: Pki, tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        "dicom:\n"
        "  port: null\n"
        f"  tls: {{port: 2762, certificate: {pki.expired.cert}, private_key: {pki.node.key},"
        f" ca_bundle: {tmp_path / 'missing-ca.pem'}, require_client_certificate: true}}\n"
        f"http: {{tls: {{certificate: {pki.node.cert}, private_key: {pki.node.key}}}}}\n"
        "destinations:\n"
        "  - {kind: dimse, name: pacs, ae_title: PACS, host: 127.0.0.1, port: 2762,\n"
        f"     tls: {{ca_bundle: {pki.ca}, certificate: {pki.client.cert}, private_key: {pki.peer.key}}}}}\n"
    )
    problems = check_settings(load_settings(cfg, environ={}))
    assert len(problems) == 4, problems
    assert problems[0].startswith("config: dicom.tls: ") and "expired on" in problems[0]
    assert problems[1].startswith("config: dicom.tls: ") and "does not match" in problems[1]
    assert problems[2].startswith("config: dicom.tls.ca_bundle: ") and "cannot read" in problems[2]
    assert problems[3].startswith("config: destinations[0] (pacs).tls: ") and "does not match" in problems[3]


def test_hsts_only_on_https_responses(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicomnode.web.app import create_app

    for seconds, expected in ((600, "max-age=600"), (0, None)):
        settings = load_settings(None, environ={"DICOMNODE_HTTP__HSTS_SECONDS": str(seconds)})
        app = create_app(settings, None, admin=False)
        secure = TestClient(app, base_url="https://testserver").get("/api/health")
        assert secure.status_code == 200
        assert secure.headers.get("strict-transport-security") == expected
        plain = TestClient(app, base_url="http://testserver").get("/api/health")
        assert "strict-transport-security" not in plain.headers  # never over plain HTTP (RFC 6797 7.2)
