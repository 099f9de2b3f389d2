"""Issue 14, the HTTP side: each test replays an attack of the probe against the real app (real spool, real
store, real uvicorn where the attack goes through it) and checks that it no longer works.

Findings: 1 client address spoofing, 3 STOW-RS size and free-space floor, 4 third-party lock-out, 5 sessions
after log-out / password / role change, 7 abandoned uploads and log floods, 8 security headers and the login
alert, 9 file meta / dataset mismatch over STOW-RS. docs/security.md lists which test proves what.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicom_testing import make_instances
from node_testing import running_receiver
from pydicom.uid import MRImageStorage, generate_uid
from web_testing import ADMIN_PASSWORD, FAST_HASHER, make_settings, make_store

from dicomnode.config import Settings
from dicomnode.ingest import Spool
from dicomnode.ingest.stow import build_stow_router
from dicomnode.pipeline.sink import StoreSink
from dicomnode.store import Store
from dicomnode.tls import uvicorn_options
from dicomnode.web.admin import install_admin
from dicomnode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette warns about its httpx-based client
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

SENDER = ("pacs", "sender-pass-1")
BOUNDARY = "hardening-boundary"
CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


# -- helpers -------------------------------------------------------------------------------------------------


def stow_node(tmp_path: Path, *, spool_cls: type[Spool] = Spool, **http: Any) -> tuple[Any, Store, Settings]:
    """The admin app with the real STOW-RS router over a real spool and store, as ``dicomnode receive``
    builds it; a ``sender`` account ``pacs``."""
    settings = make_settings(tmp_path / "data", http={"port": 8000, **http})
    store = make_store(settings)
    spool = spool_cls(settings.spool_dir, StoreSink(store), fsync=False)
    app = create_app(settings, store, routers=[build_stow_router(spool)], admin=False)
    install_admin(
        app,
        settings,
        store,
        environ={"DICOMNODE_ADMIN_PASSWORD": ADMIN_PASSWORD},
        password_hasher=FAST_HASHER,
    )
    app.state.web.users.create(*SENDER, "sender")
    return app, store, settings


def multipart(parts: list[bytes]) -> bytes:
    out = b""
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def one_instance(tmp_path: Path, **kw: Any) -> Path:
    return make_instances(tmp_path / f"inst-{generate_uid()[-8:]}", 1, **kw)[0]


def stored_sops(store: Store) -> int:
    """How many instances the database holds."""
    return sum(s.n_instances for s in store.list_studies(limit=1000).items)


def temp_files(settings: Settings) -> list[Path]:
    tmp = settings.spool_dir / ".tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


@contextmanager
def served(app: Any, settings: Settings) -> Iterator[str]:
    """``app`` under a real uvicorn in a thread, with the options ``dicomnode serve`` uses (trusted proxies);
    no log config of uvicorn's own, so its records reach pytest's ``caplog``."""
    import uvicorn

    port = settings.http.port
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="info",
        log_config=None,
        access_log=False,
        lifespan="off",
        **uvicorn_options(settings.http),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- finding 1: client address spoofing ----------------------------------------------------------------------


def test_forwarded_for_is_ignored_unless_the_peer_is_a_configured_proxy(tmp_path: Path) -> None:
    from dicomnode.netutil import free_port

    app, store, settings = stow_node(tmp_path, port=free_port(), stow_allow_addresses=["10.0.0.5"])
    body = multipart([one_instance(tmp_path).read_bytes()])
    with served(app, settings) as url:
        plain = requests.post(
            url + "/dicomweb/studies", data=body, headers={"Content-Type": CTYPE}, timeout=20
        )
        spoofed = requests.post(
            url + "/dicomweb/studies",
            data=body,
            headers={"Content-Type": CTYPE, "X-Forwarded-For": "10.0.0.5", "Forwarded": "for=10.0.0.5"},
            timeout=20,
        )
        # The probe's second attack: 30 wrong log-ins, each claiming another address, reach the per-address
        # lock (20 by default) of the real peer.
        codes = [
            requests.get(
                url + "/api/me",
                auth=("admin", f"wrong-{i}"),
                headers={"X-Forwarded-For": f"10.1.{i}.{i}"},
                timeout=20,
            ).status_code
            for i in range(30)
        ]
    assert spoofed.status_code == 401, spoofed.text
    assert plain.status_code == 401
    assert stored_sops(store) == 0
    assert 429 in codes and codes.index(429) <= 20, codes
    assert settings.http.forwarded_allow_ips == []  # nothing trusted by default


def test_a_configured_proxy_forwards_the_client_address(tmp_path: Path) -> None:
    from dicomnode.netutil import free_port

    app, store, settings = stow_node(
        tmp_path,
        port=free_port(),
        stow_allow_addresses=["10.0.0.5"],
        forwarded_allow_ips=["127.0.0.1"],  # a TLS reverse proxy on this host
    )
    with served(app, settings) as url:

        def post(forwarded: str) -> requests.Response:
            body = multipart([one_instance(tmp_path).read_bytes()])
            headers = {"Content-Type": CTYPE, "X-Forwarded-For": forwarded}
            return requests.post(url + "/dicomweb/studies", data=body, headers=headers, timeout=20)

        allowed = post("10.0.0.5")
        # A client that sends its own header through the proxy: the proxy appends the real peer, which is the
        # address that counts (the right-most one not a trusted proxy).
        smuggled = post("10.0.0.5, 192.0.2.77")
    assert allowed.status_code == 200, allowed.text
    assert smuggled.status_code == 401
    assert stored_sops(store) == 1


def test_wildcard_proxy_trust_is_refused(tmp_path: Path) -> None:
    from dicomnode.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=r"\*"):
        make_settings(tmp_path / "data", http={"forwarded_allow_ips": ["*"]})


# -- finding 3: STOW-RS size limits, streaming, the free-space floor as bytes arrive -------------------------


def _big_part_stream(size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A multipart body with one part of ``size`` bytes (a valid DICOM prefix, then zeros), generated on the
    fly: the client never holds it."""
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    yield b"\0" * 128 + b"DICM"
    left = size - 132
    zeros = b"\0" * chunk
    while left > 0:
        n = min(left, chunk)
        yield zeros[:n]
        left -= n
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_stow_body_and_instance_limits(tmp_path: Path) -> None:
    app, store, settings = stow_node(tmp_path, stow_max_body_mb=3, stow_max_instance_mb=1)
    with TestClient(app) as c:
        headers = {"Content-Type": CTYPE}
        declared = c.post("/dicomweb/studies", content=b"x" * (4 << 20), headers=headers, auth=SENDER)
        streamed = c.post(
            "/dicomweb/studies", content=_big_part_stream(5 << 20), headers=headers, auth=SENDER
        )
        big_part = c.post(
            "/dicomweb/studies",
            content=b"".join(_big_part_stream(2 << 20)),
            headers=headers,
            auth=SENDER,
        )
    assert declared.status_code == 413 and "larger than 3 MB" in declared.json()["detail"]
    assert streamed.status_code == 413, streamed.text
    assert big_part.status_code == 413 and "instance" in big_part.json()["detail"]
    assert temp_files(settings) == []  # nothing over a limit stays on disk
    assert stored_sops(store) == 0


class _FillingSpool(Spool):
    """A spool whose disk fills up while a part arrives: free space is above the floor for the first
    ``free_checks`` checks only (the disk is the hardware mocked here)."""

    free_checks = 1

    def has_free_space(self) -> bool:
        type(self).free_checks -= 1
        return type(self).free_checks >= 0


def test_free_space_floor_is_checked_while_the_bytes_arrive(tmp_path: Path) -> None:
    _FillingSpool.free_checks = 1  # the check when the part starts passes; the disk is full just after
    app, store, settings = stow_node(tmp_path, spool_cls=_FillingSpool)
    with TestClient(app) as c:
        r = c.post(
            "/dicomweb/studies",
            content=_big_part_stream(40 << 20),
            headers={"Content-Type": CTYPE},
            auth=SENDER,
        )
    assert r.status_code == 409, r.text
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xA700]
    assert temp_files(settings) == []
    assert stored_sops(store) == 0


def _rss_after_stow(tmp_path: Path, body: Iterator[bytes]) -> tuple[int, int, int]:
    """(HTTP status, peak RSS before, peak RSS after) of a ``dicomnode receive`` process, in kB."""
    with running_receiver(tmp_path / "node") as node:
        before = node.status_kb("VmHWM")
        r = requests.post(
            node.url + "/dicomweb/studies",
            data=body,
            headers={"Content-Type": CTYPE},
            auth=("admin", ADMIN_PASSWORD),
            timeout=300,
        )
        after = node.status_kb("VmHWM")
        assert requests.get(node.url + "/api/health", timeout=10).ok
    return r.status_code, before, after


#: What one 200 MB request may add to the receiver's peak memory (the probe saw +382 MB).
STOW_RSS_BOUND_KB = 96 * 1024


@pytest.mark.slow
def test_a_200_mb_stow_instance_does_not_grow_memory(tmp_path: Path) -> None:
    status, before, after = _rss_after_stow(tmp_path, _big_part_stream(200 << 20))
    assert status == 413  # over http.stow_max_instance_mb (128 MB): refused while streaming, never read
    assert after - before < STOW_RSS_BOUND_KB, (before, after)


@pytest.mark.slow
def test_a_200_mb_stow_body_of_many_instances_is_streamed(tmp_path: Path) -> None:
    src = make_instances(tmp_path / "src", 1)[0].read_bytes()
    ds = pydicom.dcmread(one_instance(tmp_path))

    def body() -> Iterator[bytes]:
        # 50 instances of 4 MB each: every part goes to disk as it arrives, one at a time through the spool.
        study = generate_uid()
        for i in range(50):
            ds.StudyInstanceUID = study
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Rows, ds.Columns = 1024, 2048
            ds.PixelData = bytes([i % 256]) * (1024 * 2048 * 2)
            path = tmp_path / "part.dcm"
            ds.save_as(path, enforce_file_format=True)
            yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield path.read_bytes()
            yield b"\r\n"
        yield f"--{BOUNDARY}--\r\n".encode()

    assert src  # the template instance exists
    status, before, after = _rss_after_stow(tmp_path, body())
    assert status == 200
    assert after - before < STOW_RSS_BOUND_KB, (before, after)


# -- finding 4: a third party cannot lock a sender out -------------------------------------------------------


def test_wrong_passwords_from_elsewhere_do_not_lock_the_pacs_out(tmp_path: Path) -> None:
    app, store, _ = stow_node(tmp_path)
    attacker = TestClient(app, client=("10.6.6.6", 40000))
    pacs = TestClient(app, client=("10.0.0.5", 40000))
    with attacker, pacs:
        wrong = [
            attacker.post(
                "/dicomweb/studies", content=b"", headers={"Content-Type": CTYPE}, auth=("pacs", "x")
            )
            for _ in range(6)
        ]
        body = multipart([one_instance(tmp_path).read_bytes()])
        ok = pacs.post("/dicomweb/studies", content=body, headers={"Content-Type": CTYPE}, auth=SENDER)
        still_locked = attacker.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": CTYPE}, auth=SENDER
        )
    assert [r.status_code for r in wrong] == [401] * 5 + [429]
    assert ok.status_code == 200, ok.text  # the PACS's own address was never locked
    assert still_locked.status_code == 429  # the guesser stays locked for that name, right password or not
    assert stored_sops(store) == 1


# -- finding 5: sessions end server-side ---------------------------------------------------------------------


def _log_in(c: TestClient, username: str, password: str) -> tuple[str, str]:
    """Log in with the form; ``(cookie, csrf token)``."""
    r = c.post("/login", data={"username": username, "password": password}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
    cookie = c.cookies.get("dicomnode_session")
    assert cookie
    page = c.get("/").text
    m = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert m
    return cookie, m.group(1)


def _me(app: Any, cookie: str) -> int:
    with TestClient(app) as fresh:  # a copy of the cookie replayed elsewhere
        fresh.cookies.set("dicomnode_session", cookie)
        return fresh.get("/api/me").status_code


def test_a_saved_cookie_stops_working_after_log_out(tmp_path: Path) -> None:
    app, store, settings = stow_node(tmp_path)
    with TestClient(app, follow_redirects=False) as c:
        cookie, token = _log_in(c, "admin", ADMIN_PASSWORD)
        assert _me(app, cookie) == 200
        out = c.post("/logout", headers={"X-CSRF-Token": token})
        assert out.status_code == 303
    assert _me(app, cookie) == 401
    # The revocation is kept beside the signing key: a restarted node (a new app on the data) refuses it too.
    restarted = create_app(settings, store, admin=False)
    install_admin(restarted, settings, store, environ={}, password_hasher=FAST_HASHER)
    assert _me(restarted, cookie) == 401


def test_password_and_role_changes_end_sessions(tmp_path: Path) -> None:
    app, _, _ = stow_node(tmp_path)
    users = app.state.web.users
    users.create("carol", "carol-pass-1", "admin")
    users.create("dave", "dave-pass-12", "admin")
    with TestClient(app, follow_redirects=False) as c:
        carol, _ = _log_in(c, "carol", "carol-pass-1")
        c.cookies.clear()
        dave, _ = _log_in(c, "dave", "dave-pass-12")
    assert (_me(app, carol), _me(app, dave)) == (200, 200)
    users.set_password("carol", "carol-pass-2")  # what 'dicomnode user passwd' does
    users.set_role("dave", "viewer")
    assert (_me(app, carol), _me(app, dave)) == (401, 401)


# -- finding 7: abandoned uploads, log floods ----------------------------------------------------------------


def test_an_abandoned_upload_gives_no_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dicomnode.netutil import free_port

    app, _, settings = stow_node(tmp_path, port=free_port())
    auth = base64.b64encode(b"pacs:sender-pass-1").decode()
    head = multipart([one_instance(tmp_path).read_bytes()])[:-8]  # the last part never ends
    caplog.set_level(logging.INFO)
    with served(app, settings) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                (
                    "POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Basic {auth}\r\nContent-Type: {CTYPE}\r\n"
                    f"Content-Length: {len(head) + 1_000_000}\r\n\r\n"
                ).encode()
                + head
            )
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while not re.search("client went away|ASGI", caplog.text) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests.get(url + "/api/health", timeout=10).ok
    assert "Exception in ASGI application" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "client went away" in caplog.text  # one INFO line instead
    assert temp_files(settings) == []


def test_a_body_of_5000_bad_parts_gives_a_few_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app, _, settings = stow_node(tmp_path)
    caplog.set_level(logging.INFO)
    with TestClient(app) as c:
        r = c.post(
            "/dicomweb/studies",
            content=multipart([b"not dicom %d" % i for i in range(5000)]),
            headers={"Content-Type": CTYPE},
            auth=SENDER,
        )
    assert r.status_code == 409
    assert len(r.json()["00081198"]["Value"]) == 5000  # every part is still answered
    warnings_ = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warnings_) <= 20, len(warnings_)
    assert any("0xC210 x 5000" in rec.getMessage() for rec in caplog.records)  # one line counts them all
    assert temp_files(settings) == []


# -- finding 8: security headers, the login alert ------------------------------------------------------------


def test_every_response_has_the_security_headers(tmp_path: Path) -> None:
    app, _, _ = stow_node(tmp_path)
    with TestClient(app, follow_redirects=False) as c:
        responses = {
            "health": c.get("/api/health"),
            "login page": c.get("/login"),
            "api 401": c.get("/api/me"),
            "api": c.get("/api/me", auth=("admin", ADMIN_PASSWORD)),
            "page redirect": c.get("/jobs"),
            "stow 401": c.post("/dicomweb/studies", content=b"", headers={"Content-Type": CTYPE}),
            "404": c.get("/api/nothing-here", auth=("admin", ADMIN_PASSWORD)),
            "docs": c.get("/api/docs", auth=("admin", ADMIN_PASSWORD)),
            "login post": c.post("/login", data={"username": "admin", "password": "wrong"}),
        }
    for name, r in responses.items():
        h = r.headers
        assert "default-src 'self'" in h.get("content-security-policy", ""), name
        assert "frame-ancestors 'none'" in h["content-security-policy"], name
        assert h.get("x-content-type-options") == "nosniff", name
        assert h.get("referrer-policy") == "no-referrer", name
        assert h.get("x-frame-options") == "DENY", name
        assert h.get("cache-control") == "no-store", name


def test_login_alert_shows_only_fixed_messages(tmp_path: Path) -> None:
    app, _, _ = stow_node(tmp_path)
    with TestClient(app) as c:
        crafted = c.get("/login", params={"error": "Your account is compromised: call +1 555 0100 now"})
        known = c.get("/login", params={"error": "credentials"})
    assert crafted.status_code == 200
    assert "compromised" not in crafted.text and "alert-bad" not in crafted.text
    assert '<div class="alert alert-bad">Wrong user name or password.</div>' in known.text


# -- finding 9: STOW-RS applies the DIMSE consistency rule to the file meta ----------------------------------


def _with_meta(path: Path, **meta: str) -> bytes:
    """The file's bytes with file meta elements replaced (the dataset untouched)."""
    ds = pydicom.dcmread(path)
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    ds.save_as(path, enforce_file_format=False)
    return path.read_bytes()


def test_stow_refuses_file_meta_that_disagrees_with_the_dataset(tmp_path: Path) -> None:
    app, store, _ = stow_node(tmp_path)
    other_sop = _with_meta(one_instance(tmp_path), MediaStorageSOPInstanceUID=generate_uid())
    mr_meta = _with_meta(one_instance(tmp_path), MediaStorageSOPClassUID=MRImageStorage)
    good = one_instance(tmp_path).read_bytes()
    with TestClient(app) as c:
        r = c.post(
            "/dicomweb/studies",
            content=multipart([other_sop, mr_meta, good]),
            headers={"Content-Type": CTYPE},
            auth=SENDER,
        )
    assert r.status_code == 202, r.text
    reasons = sorted(f["00081197"]["Value"][0] for f in r.json()["00081198"]["Value"])
    assert reasons == [0xA900, 0xC212]  # the statuses DIMSE answers for the same mismatches
    assert len(r.json()["00081199"]["Value"]) == 1
    assert stored_sops(store) == 1


# -- the two small mechanisms, on their own ------------------------------------------------------------------


def test_claim_mismatch_is_the_one_consistency_rule() -> None:
    from dicomnode.ingest.consistency import claim_mismatch

    ct, mr = "1.2.840.10008.5.1.4.1.1.2", MRImageStorage
    assert claim_mismatch(ct, "1.2.3", None, None) is None  # nothing claimed
    assert claim_mismatch(ct, "1.2.3", ct + "\0", " 1.2.3 ") is None  # padding is not a difference
    by_class = claim_mismatch(ct, "1.2.3", mr, "1.2.4", claimed_by="the file meta")
    assert by_class is not None and by_class.status == 0xA900 and "file meta" in by_class.comment
    by_instance = claim_mismatch(ct, "1.2.3", ct, "1.2.4")
    assert by_instance is not None and by_instance.status == 0xC212


def test_repeat_filter_lets_a_burst_through_and_counts_the_rest() -> None:
    from dicomnode.ingest.lograte import RepeatFilter

    now = [0.0]
    f = RepeatFilter(burst=3, window_s=60, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)

    passed = [f.filter(record("refused %s", i)) for i in range(100)]
    assert passed.count(True) == 3
    assert f.filter(record("another template")), "other messages are not crowded out"
    now[0] = 61.0
    later = record("refused %s", 100)
    assert f.filter(later)
    assert later.getMessage() == "refused 100 (97 similar lines left out in the previous window)"


def test_an_oversized_fhir_body_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    import anyio

    from dicomnode.web.fhir import MAX_BODY
    from dicomnode.web.fhir import router as fhir_router

    app, _, _ = stow_node(tmp_path)
    app.include_router(fhir_router)  # as create_app mounts it
    chunk = b"[" * (1 << 20)
    total = 64  # a 64 MB body, sent as 1 MB chunks without Content-Length
    read = [0]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        read[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": read[0] < total}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    auth = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode())
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/fhir/Observation",
        "raw_path": b"/fhir/Observation",
        "query_string": b"",
        "headers": [(b"content-type", b"application/fhir+json"), (b"authorization", b"Basic " + auth)],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 413
    assert read[0] <= MAX_BODY // len(chunk) + 2  # stopped reading just past the limit, not at 64 MB
