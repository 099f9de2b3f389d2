"""DICOM TLS with Orthanc (the reference PACS) in both directions, mutual TLS on both sides.

Orthanc runs with ``DicomTlsEnabled`` (its DICOM port then speaks TLS only), its own certificate and key, the
test CA as ``DicomTlsTrustedCertificates`` and ``DicomTlsRemoteCertificateRequired``. The node delivers to it
over TLS with its client certificate (refused without one), and Orthanc C-STOREs and C-ECHOes to the node's
TLS listener (``UseDicomTls`` on the modality), where the node requires and verifies Orthanc's certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicom_testing import make_instances, running_orthanc, sop_of
from pydicom.uid import generate_uid
from tls_testing import Pki, make_pki, need, refusal_lines

from dicomnode.delivery import DimsePeer, RetryPolicy, deliver, deliver_with_retry, echo
from dicomnode.domain import DeliveryOutcome
from dicomnode.ingest import MemorySink, Spool
from dicomnode.ingest.scp import AllowedCaller, StorageSCP
from dicomnode.netutil import free_port
from dicomnode.tls import ClientTls, server_context

pytestmark = pytest.mark.integration

ORTHANC = "/usr/sbin/Orthanc"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def orthanc(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    exe = need(ORTHANC, "Debian package orthanc")
    work = tmp_path_factory.mktemp("orthanc-tls")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "TLS-PACS",
        "StorageDirectory": "db",
        "IndexDirectory": "db",
        "HttpServerEnabled": True,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.peer.cert),
        "DicomTlsPrivateKey": str(pki.peer.key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {
            "node": {"AET": "BMDNODE", "Host": "127.0.0.1", "Port": 11112, "UseDicomTls": True}
        },
    }
    with running_orthanc(exe, work, config):
        yield {"http": http, "dicom": dicom}


def test_node_delivers_to_orthanc_over_tls(orthanc: dict[str, int], pki: Pki, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{orthanc['http']}"
    files = make_instances(tmp_path / "a", 3)
    tls = ClientTls(ca_bundle=pki.ca, certificate=pki.client.cert, private_key=pki.client.key)
    peer = DimsePeer("ORTHANC", "127.0.0.1", orthanc["dicom"], "BMDNODE", timeout_s=15, name="pacs", tls=tls)
    # Orthanc may answer a transient status while its index is busy; production applies the retry policy too.
    res = deliver_with_retry(peer, files, RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=2))
    assert res.ok, res.message
    for f in files:
        found = requests.post(f"{base}/tools/lookup", data=sop_of(f), timeout=5).json()
        assert found and found[0]["Type"] == "Instance"
    e = echo(peer)
    assert e.ok and "(TLS)" in e.message, e.message

    # Orthanc requires a client certificate: without one, the delivery fails before anything is sent.
    more = make_instances(tmp_path / "b", 1)
    refused = deliver(
        DimsePeer("ORTHANC", "127.0.0.1", orthanc["dicom"], "BMDNODE", timeout_s=15, tls=ClientTls(pki.ca)),
        more,
    )
    assert not refused.ok
    # Under TLS 1.2 (and when the server's alert arrives in time) the handshake itself fails: a permanent
    # failure that names the missing client certificate. Under TLS 1.3 the client may finish its side of the
    # handshake before the server's "certificate required" alert arrives; the alert then ends the association
    # on its first read, which the delivery cannot tell from an abort. Either way no association is made.
    if refused.outcome is DeliveryOutcome.PERMANENT_FAILURE:
        assert "TLS handshake with ORTHANC@" in refused.message and "client certificate" in refused.message
    else:
        assert "aborted" in refused.message and "(TLS)" in refused.message, refused.message
    assert requests.post(f"{base}/tools/lookup", data=sop_of(more[0]), timeout=5).json() == []
    # Plain DICOM to Orthanc's TLS port does not get an association either.
    plain = deliver(DimsePeer("ORTHANC", "127.0.0.1", orthanc["dicom"], "BMDNODE", timeout_s=5), more)
    assert not plain.ok
    assert requests.post(f"{base}/tools/lookup", data=sop_of(more[0]), timeout=5).json() == []


def test_orthanc_pushes_to_the_node_over_tls(
    orthanc: dict[str, int], pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"http://127.0.0.1:{orthanc['http']}"
    sink = MemorySink()
    ctx = server_context(pki.node.cert, pki.node.key, ca_bundle=pki.ca, require_client_certificate=True)
    with StorageSCP(
        Spool(tmp_path / "spool", sink),
        ae_title="DICOMNODE",
        port=None,
        tls_port=0,
        ssl_context=ctx,
        allowed_callers=[AllowedCaller("ORTHANC")],
    ) as scp:
        modality = {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": scp.tls_port, "UseDicomTls": True}
        r = requests.put(f"{base}/modalities/dicomnode", json=modality, timeout=5)
        assert r.ok, r.text
        assert requests.post(f"{base}/modalities/dicomnode/echo", json={}, timeout=30).ok
        study = generate_uid()
        files = make_instances(tmp_path / "a", 3, study=study)
        ids = []
        for f in files:
            up = requests.post(f"{base}/instances", data=f.read_bytes(), timeout=10)
            assert up.ok, up.text
            ids.append(up.json()["ID"])
        sent = requests.post(
            f"{base}/modalities/dicomnode/store", json={"Resources": ids, "Synchronous": True}, timeout=60
        )
        assert sent.ok, sent.text
        assert sent.json()["FailedInstancesCount"] == 0

        # The same modality without TLS cannot reach the node (no plain port) and gets no association.
        caplog.set_level(logging.WARNING, logger="dicomnode.tls")
        caplog.clear()
        modality["UseDicomTls"] = False
        assert requests.put(f"{base}/modalities/plain", json=modality, timeout=5).ok
        assert not requests.post(f"{base}/modalities/plain/echo", json={}, timeout=30).ok
        # The node's acceptor thread logs the refused handshake; Orthanc may report its failed echo first.
        lines = refusal_lines(caplog)
        assert len(lines) == 1 and "does not speak TLS" in lines[0], lines
    for f in files:
        rec = sink.instances[sop_of(f)]
        assert rec.calling_ae_title == "ORTHANC" and rec.path is not None
        assert pydicom.dcmread(rec.path).PixelData == pydicom.dcmread(f).PixelData
