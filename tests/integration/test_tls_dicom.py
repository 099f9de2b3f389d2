"""DICOM TLS against real dcmtk peers, with certificates made by the test (``tests/tls_testing.py``).

* In: dcmtk ``storescu`` / ``echoscu`` with ``+tls`` (dcmtk's default profile: Non-downgrading BCP 195)
  into the node's TLS listener, beside its plain port or with the plain port off; mutual TLS refuses a client
  without a valid certificate (none, expired, issued by an untrusted CA) and plain DICOM sent to the TLS port,
  each with one WARNING line naming the peer and the reason, no traceback, and nothing stored.
* Out: the node's delivery (C-STORE) and echo to dcmtk ``storescp +tls`` (which requires our client
  certificate); an untrusted, expired or wrongly named server certificate stops the delivery before any
  association, as a permanent failure saying why.
* The CLI: ``dicomnode echo`` over TLS, ``check-config`` naming certificate problems, and ``receive`` with the
  plain port off answering on its TLS port only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from dicom_testing import make_instances, sop_of
from tls_testing import Cert, Pki, make_pki, need, refusal_lines, tls_warnings

from dicomnode.delivery import DimsePeer, deliver, echo
from dicomnode.domain import DeliveryOutcome
from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.scp import StorageSCP
from dicomnode.netutil import free_port, wait_port
from dicomnode.tls import ClientTls, server_context

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need(tool, "Debian package dcmtk"), *args],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def tls_args(pki: Pki, cert: Cert | None) -> list[str]:
    """dcmtk options: our certificate (or anonymous TLS) and the test CA to verify the node with."""
    own = ["+tls", str(cert.key), str(cert.cert)] if cert is not None else ["+tla"]
    return [*own, "+cf", str(pki.ca)]


def storescu(
    port: int, pki: Pki, cert: Cert | None, *files: Path, tls: bool = True
) -> subprocess.CompletedProcess[str]:
    opts = tls_args(pki, cert) if tls else []
    return dcmtk(
        STORESCU, *opts, "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)
    )


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text


def test_dcmtk_over_tls_beside_the_plain_port(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = MemorySink()
    ctx = server_context(pki.node.cert, pki.node.key, ca_bundle=pki.ca)  # client certificate optional
    files = make_instances(tmp_path / "in", 3)
    with StorageSCP(Spool(tmp_path / "spool", sink), port=0, tls_port=0, ssl_context=ctx) as scp:
        assert scp.port is not None and scp.tls_port is not None and scp.port != scp.tls_port
        with_cert = storescu(scp.tls_port, pki, pki.client, files[0])
        assert with_cert.returncode == 0, with_cert.stderr
        anonymous = storescu(scp.tls_port, pki, None, files[1])  # TLS without a client certificate
        assert anonymous.returncode == 0, anonymous.stderr
        plain = storescu(scp.port, pki, None, files[2], tls=False)  # the plain port beside it
        assert plain.returncode == 0, plain.stderr
        e = dcmtk(ECHOSCU, *tls_args(pki, pki.client), "-aec", "DICOMNODE", "127.0.0.1", str(scp.tls_port))
        assert e.returncode == 0, e.stderr
        # The node's own SCU (echo) over TLS, verifying the node's certificate and its name.
        ours = echo(
            DimsePeer("DICOMNODE", "127.0.0.1", scp.tls_port, "ME", timeout_s=10, tls=ClientTls(pki.ca))
        )
        assert ours.ok and "(TLS)" in ours.message, ours.message
    assert set(sink.instances) == {sop_of(f) for f in files}
    for f in files:
        stored = sink.instances[sop_of(f)].path
        assert stored is not None and pydicom.dcmread(stored).PixelData == pydicom.dcmread(f).PixelData
    assert tls_warnings(caplog) == []


def test_mutual_tls_refuses_clients_without_a_valid_certificate(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = MemorySink()
    ctx = server_context(pki.node.cert, pki.node.key, ca_bundle=pki.ca, require_client_certificate=True)
    files = make_instances(tmp_path / "in", 1)
    with StorageSCP(Spool(tmp_path / "spool", sink), port=None, tls_port=0, ssl_context=ctx) as scp:
        assert scp.port is None  # plain port off: TLS only
        assert scp.tls_port is not None
        cases: list[tuple[str, Cert | None, str]] = [
            ("no certificate", None, "sent no client certificate"),
            ("expired", pki.expired, "certificate has expired"),
            ("untrusted CA", pki.rogue, "certificate not accepted"),
        ]
        for label, cert, reason in cases:
            caplog.clear()
            r = storescu(scp.tls_port, pki, cert, files[0])
            assert r.returncode != 0, label
            lines = refusal_lines(caplog)
            assert len(lines) == 1, (label, lines)
            assert "refused" in lines[0] and reason in lines[0] and "127.0.0.1:" in lines[0], (
                label,
                lines[0],
            )
            assert_no_traceback(caplog)
        caplog.clear()
        plain = storescu(scp.tls_port, pki, None, files[0], tls=False)
        assert plain.returncode != 0
        (line,) = refusal_lines(caplog)
        assert "does not speak TLS" in line
        assert sink.instances == {}  # no association got as far as a C-STORE
        ok = storescu(scp.tls_port, pki, pki.client, files[0])
        assert ok.returncode == 0, ok.stderr
    assert set(sink.instances) == {sop_of(files[0])}


@pytest.fixture
def storescp_tls(pki: Pki, tmp_path: Path) -> Iterator[tuple[Path, object]]:
    """Start dcmtk ``storescp +tls`` with a chosen server certificate; yields (output folder, starter)."""
    procs: list[subprocess.Popen[bytes]] = []
    out = tmp_path / "storescp-out"
    out.mkdir()

    def start(cert: Cert) -> int:
        port = free_port()
        proc = subprocess.Popen(
            [need(STORESCP, "Debian package dcmtk"), "-aet", "STORESCP",
             "+tls", str(cert.key), str(cert.cert), "+cf", str(pki.ca), "+xa", "-od", str(out), str(port)],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        wait_port(port)
        return port

    try:
        yield out, start
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_delivery_to_dcmtk_storescp_over_tls(
    pki: Pki, tmp_path: Path, storescp_tls: tuple[Path, object], caplog: pytest.LogCaptureFixture
) -> None:
    out, start = storescp_tls
    assert callable(start)
    files = make_instances(tmp_path / "a", 3)
    port = start(pki.peer)  # storescp requires and verifies our client certificate (dcmtk's default)
    mutual = ClientTls(ca_bundle=pki.ca, certificate=pki.client.cert, private_key=pki.client.key)
    peer = DimsePeer("STORESCP", "127.0.0.1", port, "BMDNODE", timeout_s=10, name="storescp", tls=mutual)
    res = deliver(peer, files)
    assert res.ok, res.message
    assert [f.status for f in res.files] == [0, 0, 0]
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()} == {sop_of(f) for f in files}
    e = echo(peer)
    assert e.ok, e.message

    # Without our client certificate storescp refuses the handshake: a permanent failure, nothing stored.
    before = set(out.iterdir())
    caplog.clear()
    no_cert = deliver(
        DimsePeer("STORESCP", "127.0.0.1", port, "BMDNODE", timeout_s=10, tls=ClientTls(pki.ca)), files[:1]
    )
    assert not no_cert.ok and "TLS" in no_cert.message, no_cert.message
    assert set(out.iterdir()) == before
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ("rogue", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("elsewhere", "mismatch, certificate is not valid for"),
    ],
)
def test_untrusted_expired_or_misnamed_destination_is_refused(
    pki: Pki,
    tmp_path: Path,
    storescp_tls: tuple[Path, object],
    caplog: pytest.LogCaptureFixture,
    server: str,
    reason: str,
) -> None:
    out, start = storescp_tls
    assert callable(start)
    port = start(getattr(pki, server))
    tls = ClientTls(ca_bundle=pki.ca, certificate=pki.client.cert, private_key=pki.client.key)
    peer = DimsePeer("STORESCP", "127.0.0.1", port, "BMDNODE", timeout_s=10, name="pacs", tls=tls)
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    res = deliver(peer, make_instances(tmp_path / "a", 1))
    assert res.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert f"TLS handshake with STORESCP@127.0.0.1:{port} (TLS) failed: " in res.message
    assert reason in res.message, res.message
    assert list(out.iterdir()) == []  # no association, nothing sent
    assert_no_traceback(caplog)
    # pynetdicom's own "unable to connect" lines are replaced by the one reason in the result.
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
    e = echo(peer)
    assert not e.ok and not e.transient and reason in e.message


def test_cli_echo_check_config_and_tls_only_receive(
    pki: Pki, tmp_path: Path, storescp_tls: tuple[Path, object]
) -> None:
    _out, start = storescp_tls
    assert callable(start)
    port = start(pki.peer)
    client = {
        "ca_bundle": str(pki.ca),
        "certificate": str(pki.client.cert),
        "private_key": str(pki.client.key),
    }
    cfg: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "dicom": {
            "ae_title": "DICOMNODE",
            "port": None,
            "tls": {
                "port": free_port(),
                "certificate": str(pki.node.cert),
                "private_key": str(pki.node.key),
                "ca_bundle": str(pki.ca),
                "require_client_certificate": True,
            },
            "free_space_floor_mb": 0,
        },
        "http": {"port": free_port()},
        "destinations": [
            {
                "kind": "dimse", "name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                "timeout_seconds": 10,
                "tls": client,
            }
        ],
    }  # fmt: skip
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=120, env=env
        )

    r = cli("echo", "pacs", "--config", str(path))
    assert r.returncode == 0 and "echo pacs: OK" in r.stdout and "(TLS)" in r.stdout, r.stdout + r.stderr
    r = cli("check-config", str(path))
    assert r.returncode == 0, r.stderr
    assert (
        "dicom tls" in r.stdout
        and "client certificate required" in r.stdout
        and "tls to        pacs" in r.stdout
    )

    # Expired node certificate and a key that does not match a destination's certificate: one line each.
    bad = dict(cfg)
    bad["dicom"] = {
        **cfg["dicom"],
        "tls": {
            **cfg["dicom"]["tls"],
            "certificate": str(pki.expired.cert),
            "private_key": str(pki.expired.key),
        },
    }  # type: ignore[dict-item]
    bad["destinations"] = [
        {
            **cfg["destinations"][0],
            "tls": {"certificate": str(pki.client.cert), "private_key": str(pki.peer.key)},
        }
    ]  # type: ignore[index]
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    r = cli("check-config", str(bad_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert "config: dicom.tls: " in lines[0] and "certificate expired on" in lines[0]
    assert "config: destinations[0] (pacs).tls: " in lines[1] and "does not match" in lines[1]
    assert "Traceback" not in r.stderr
    # The node refuses to start on the same problems, with the same lines (exit 2).
    r = cli("receive", "--config", str(bad_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == lines

    # `receive` with the plain port off: the TLS port answers (mutual TLS), nothing listens elsewhere.
    tls_port = cfg["dicom"]["tls"]["port"]  # type: ignore[index]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "receive", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        wait_port(tls_port, timeout=60)
        assert proc.stdout is not None
        first = ""
        while not first.startswith("dicomnode receive:"):
            first = proc.stdout.readline()
            assert first, "receive ended before its start-up line"
        assert f"DICOM TLS DICOMNODE@127.0.0.1:{tls_port}, client certificate required" in first, first
        assert "DICOM DICOMNODE@" not in first  # no plain listener
        files = make_instances(tmp_path / "in", 1)
        ok = storescu(tls_port, pki, pki.client, files[0])
        assert ok.returncode == 0, ok.stderr
        refused = storescu(tls_port, pki, None, files[0])
        assert refused.returncode != 0
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=60)
    refusals = [line for line in rest.splitlines() if "refused" in line]
    assert len(refusals) == 1 and "sent no client certificate" in refusals[0], rest
    assert "Traceback" not in rest
