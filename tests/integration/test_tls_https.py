"""HTTPS for the admin UI, REST API and STOW-RS, served by uvicorn exactly as the node serves it
(``dicomnode.tls.uvicorn_options``), with certificates made by the test.

* The REST API and STOW-RS answer over HTTPS with ``Strict-Transport-Security``; the port speaks no plain
  HTTP; TLS 1.1 is refused; a client that does not trust the test CA is refused.
* DICOMweb delivery verifies the server certificate: STOW-RS to the node with the test CA as ``ca_bundle``
  succeeds, without it (system CAs only) it is a permanent failure saying why, and nothing is stored.
* Behind a TLS reverse proxy (plain HTTP from a trusted proxy address with ``X-Forwarded-Proto: https``) the
  session cookie is Secure and HSTS is sent; the same request without the header gets neither.
* In a real browser (Playwright + Debian's Chromium, trusting only the node's certificate through its
  public-key pin): log in over HTTPS, the session cookie is Secure and HttpOnly, and the page carries HSTS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicom_testing import make_instances, sop_of
from tls_testing import Pki, make_pki
from web_testing import ADMIN_PASSWORD, make_settings, make_store

from dicomnode.delivery import DicomwebPeer, deliver, echo
from dicomnode.domain import DeliveryOutcome
from dicomnode.netutil import free_port
from dicomnode.tls import uvicorn_options

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


@dataclass
class Served:
    url: str
    settings: Any
    store: Any


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(tmp: Path, http: dict[str, Any]) -> Iterator[Served]:
    import uvicorn

    from dicomnode.ingest import Spool
    from dicomnode.ingest.stow import build_stow_router
    from dicomnode.pipeline.sink import StoreSink
    from dicomnode.web.app import create_app

    settings = make_settings(tmp / "data", http={"port": free_port(), **http})
    store = make_store(settings)
    spool = Spool(settings.spool_dir, StoreSink(store), free_space_floor_mb=0)
    mp = pytest.MonkeyPatch()
    mp.setenv("DICOMNODE_ADMIN_PASSWORD", ADMIN_PASSWORD)  # read by create_app at start, not at import
    try:
        app = create_app(settings, store, role="serve", routers=[build_stow_router(spool)])
    finally:
        mp.undo()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.http.port,
        log_level="warning",
        lifespan="off",
        **uvicorn_options(settings.http),  # as dicomnode.cli.node serves it
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    scheme = "https" if settings.http.tls is not None else "http"
    try:
        yield Served(f"{scheme}://127.0.0.1:{settings.http.port}", settings, store)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


@pytest.fixture(scope="module")
def https(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tls = {"certificate": str(pki.node.cert), "private_key": str(pki.node.key)}
    yield from _serve(tmp_path_factory.mktemp("https"), {"tls": tls})


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # Plain HTTP behind a TLS reverse proxy on this host (the default trusted proxy address).
    yield from _serve(tmp_path_factory.mktemp("proxied"), {"forwarded_allow_ips": ["127.0.0.1"]})


def test_api_over_https_with_hsts(https: Served, pki: Pki) -> None:
    r = requests.get(https.url + "/api/health", verify=str(pki.ca), timeout=10)
    assert r.ok and r.json()["status"] == "ok"
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    api = requests.get(https.url + "/api/me", auth=("admin", ADMIN_PASSWORD), verify=str(pki.ca), timeout=10)
    assert api.ok, api.text
    assert api.headers["strict-transport-security"] == "max-age=31536000"
    with pytest.raises(requests.exceptions.SSLError):  # the test CA is not among the system's CAs
        requests.get(https.url + "/api/health", timeout=10)
    with pytest.raises(requests.ConnectionError):  # no plain HTTP on the HTTPS port
        requests.get(https.url.replace("https://", "http://") + "/api/health", timeout=10)


def test_https_refuses_tls11(https: Served, pki: Pki) -> None:
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca))
    with warnings.catch_warnings():  # the old versions are deprecated in ssl: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    port = int(https.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_stow_delivery_verifies_the_certificate(https: Served, pki: Pki, tmp_path: Path) -> None:
    url = https.url + "/dicomweb"
    files = make_instances(tmp_path / "a", 2)
    auth = {"username": "admin", "password": ADMIN_PASSWORD}
    res = deliver(DicomwebPeer(url, name="node", ca_bundle=pki.ca, **auth), files)
    assert res.ok, res.message
    assert _stored(https, files[0]) == {sop_of(f) for f in files}

    more = make_instances(tmp_path / "b", 1)
    untrusted = deliver(DicomwebPeer(url, name="node", **auth), more)  # system CAs only
    assert untrusted.outcome is DeliveryOutcome.PERMANENT_FAILURE
    assert f"TLS with {url} failed: certificate not accepted" in untrusted.message, untrusted.message
    probe = echo(DicomwebPeer(url, **auth))
    assert not probe.ok and not probe.transient and "certificate not accepted" in probe.message
    wrong_ca = deliver(DicomwebPeer(url, ca_bundle=pki.rogue_ca, **auth), more)
    assert (
        wrong_ca.outcome is DeliveryOutcome.PERMANENT_FAILURE
        and "unable to get local issuer" in wrong_ca.message
    )
    missing = deliver(DicomwebPeer(url, ca_bundle=tmp_path / "no-such-ca.pem", **auth), more)
    assert missing.outcome is DeliveryOutcome.PERMANENT_FAILURE and "TLS settings" in missing.message
    assert _stored(https, more[0]) == set()  # refused before anything was sent


def _stored(served: Served, file: Path) -> set[str]:
    """SOP Instance UIDs the node's store holds for the series of ``file``."""
    series = str(pydicom.dcmread(file, stop_before_pixels=True).SeriesInstanceUID)
    return {sop_of(p) for p in served.store.instance_paths(series)}


def test_reverse_proxy_gets_secure_cookie_and_hsts(proxied: Served) -> None:
    form = {"username": "admin", "password": ADMIN_PASSWORD, "next": "/"}
    behind = requests.post(
        proxied.url + "/login",
        data=form,
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
        timeout=10,
    )
    assert behind.status_code == 303
    cookie = behind.headers["set-cookie"]
    assert "dicomnode_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
    assert behind.headers["strict-transport-security"] == "max-age=31536000"
    direct = requests.post(proxied.url + "/login", data=form, allow_redirects=False, timeout=10)
    assert direct.status_code == 303
    assert "Secure" not in direct.headers["set-cookie"]
    assert "strict-transport-security" not in direct.headers


def _spki_pin(cert: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a certificate: what Chromium's SPKI allow-list takes."""
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"], capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True, check=True
    ).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.mark.slow
def test_https_login_in_a_browser(https: Served, pki: Pki) -> None:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                # Trust exactly the node's test certificate (its public key), nothing else.
                f"--ignore-certificate-errors-spki-list={_spki_pin(pki.node.cert)}",
            ],
        )
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            first = page.goto(https.url + "/login")
            assert first is not None and first.ok
            assert first.headers.get("strict-transport-security") == "max-age=31536000"
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", ADMIN_PASSWORD)
            with page.expect_response(
                lambda r: r.url.endswith("/login") and r.request.method == "POST"
            ) as login:
                page.click("button[type=submit]")
            assert login.value.status == 303
            assert login.value.headers.get("strict-transport-security") == "max-age=31536000"
            page.wait_for_url(https.url + "/")
            assert page.inner_text(".username") == "admin"
            (session,) = [c for c in context.cookies() if c["name"] == "dicomnode_session"]
            assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Lax"
            assert page.evaluate("location.protocol") == "https:"
        finally:
            context.close()
            browser.close()
        # Without the pin the same page is refused: the browser trusts nothing else of the test PKI.
        strict = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            with pytest.raises(PlaywrightError, match="ERR_CERT"):
                strict.new_page().goto(https.url + "/login")
        finally:
            strict.close()
