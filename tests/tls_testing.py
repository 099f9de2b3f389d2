"""Certificates made by the tests (``openssl`` command line), for the TLS tests (``tests/*/test_tls_*``).

:func:`make_pki` writes, in a folder: a test CA, a certificate for the node (server and client use, named
``localhost`` and ``127.0.0.1``), one for a peer, a client certificate, an expired one and one issued by a
second CA that nobody trusts. RSA keys: dcmtk's default BCP 195 profile negotiates RSA suites in TLS 1.2.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path
    node: Cert
    peer: Cert
    client: Cert
    expired: Cert
    #: Issued by another CA (``rogue_ca``), untrusted by everyone else.
    rogue: Cert
    rogue_ca: Path
    #: A valid certificate naming only another host (for the host-name check).
    elsewhere: Cert


def _openssl() -> str:
    exe = OPENSSL if Path(OPENSSL).exists() else shutil.which("openssl")
    if exe is None:
        msg = "openssl is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)
    return exe


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([_openssl(), *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3",
        "-subj", f"/CN=dicomnode {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def _leaf(
    folder: Path, name: str, ca: tuple[Path, Path], *, days: int = 3, san: str = "DNS:localhost,IP:127.0.0.1"
) -> Cert:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _run(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    # days -1: notAfter is a day before now (an expired certificate, otherwise well formed).
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", str(cert), "-days", str(days), "-extfile", str(ext),
        cwd=folder,
    )  # fmt: skip
    return Cert(cert, key)


def make_pki(folder: Path) -> Pki:
    """Write the test CA and certificates into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    rogue_ca = _ca(folder, "rogue-ca")
    return Pki(
        folder=folder,
        ca=ca[0],
        node=_leaf(folder, "node", ca),
        peer=_leaf(folder, "peer", ca),
        client=_leaf(folder, "client", ca),
        expired=_leaf(folder, "expired", ca, days=-1),
        rogue=_leaf(folder, "rogue", rogue_ca),
        rogue_ca=rogue_ca[0],
        elsewhere=_leaf(folder, "elsewhere", ca, san="DNS:pacs.example.org"),
    )


def need(path: str, what: str) -> str:
    """``path`` if it exists; else skip (fail under CI) naming the Debian package."""
    if not os.path.exists(path):
        msg = f"{path} not installed ({what})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required under CI")
        pytest.skip(msg)
    return path


def tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The node's TLS log lines at WARNING or above (``dicomnode.tls``)."""
    return [
        r.getMessage() for r in caplog.records if r.name == "dicomnode.tls" and r.levelno >= logging.WARNING
    ]


def refusal_lines(caplog: pytest.LogCaptureFixture, timeout_s: float = 10.0) -> list[str]:
    """The node's TLS warnings once the refusal has been logged.

    The client can exit before the node's handshake gives up: under TLS 1.3 the client's side of the handshake
    completes first, and the node's refusal (and its log line) follows in the listener's thread. Wait for it,
    then a moment more so that a second line would be seen too.
    """
    deadline = time.monotonic() + timeout_s
    while not tls_warnings(caplog) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    return tls_warnings(caplog)
