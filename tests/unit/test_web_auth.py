"""Users, password hashing, the first admin, session cookies and the auth middleware's decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from web_testing import FAST_HASHER

from dicomnode.errors import ConfigError, InputError
from dicomnode.store import make_engine, upgrade
from dicomnode.store.models import UserRow
from dicomnode.web.auth import (
    SessionCodec,
    _is_api,
    _is_public,
    is_stow_request,
    load_or_create_secret,
    parse_networks,
)
from dicomnode.web.users import UserStore, bootstrap_admin, ensure_users_table, users_table


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'u.sqlite3'}")
    upgrade(engine)  # the store's migration 0002 creates the users table
    ensure_users_table(engine)  # a check only, idempotent
    return UserStore(engine, FAST_HASHER)


def test_users_table_comes_from_the_store_migrations(tmp_path: Path) -> None:
    bare = create_engine(f"sqlite:///{tmp_path / 'bare.sqlite3'}")
    # The web module creates no table of its own any more: an unmigrated database is a clear error.
    with pytest.raises(ConfigError, match="db upgrade"):
        ensure_users_table(bare)
    assert not inspect(bare).has_table("users")
    assert users_table is UserRow.__table__


def test_passwords_are_hashed_with_argon2_and_verified(users: UserStore) -> None:
    users.create("alice", "correct horse", "admin")
    with users.engine.connect() as conn:
        stored = str(conn.exec_driver_sql("SELECT password_hash FROM users").scalar())
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    u = users.verify_password("alice", "correct horse")
    assert u is not None and u.is_admin
    assert users.verify_password("alice", "wrong horse") is None
    assert users.verify_password("bob", "correct horse") is None
    users.set_password("alice", "new battery staple")
    assert users.verify_password("alice", "correct horse") is None
    assert users.verify_password("alice", "new battery staple") is not None


def test_user_input_is_checked(users: UserStore) -> None:
    users.create("viewer1", "longenough", "viewer")
    with pytest.raises(InputError, match="exists"):
        users.create("viewer1", "longenough", "viewer")
    with pytest.raises(InputError, match="8 characters"):
        users.create("x", "short", "viewer")
    with pytest.raises(InputError, match="role"):
        users.create("y", "longenough", "root")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="user name"):
        users.create("a b", "longenough", "viewer")


def test_tokens_are_stored_hashed(users: UserStore) -> None:
    users.create("script", "longenough", "viewer")
    token = users.new_token("script")
    with users.engine.connect() as conn:
        stored = str(conn.exec_driver_sql("SELECT token_sha256 FROM users").scalar())
    assert token not in stored and len(stored) == 64
    assert users.verify_token(token) is not None
    assert users.verify_token(token + "x") is None
    users.new_token("script")  # a new token replaces the old one
    assert users.verify_token(token) is None


def test_first_admin_from_environment(users: UserStore) -> None:
    printed: list[str] = []
    assert (
        bootstrap_admin(users, {"DICOMNODE_ADMIN_PASSWORD": "from-the-env"}, print_fn=printed.append) is None
    )
    assert printed == []
    assert users.verify_password("admin", "from-the-env") is not None
    # Already there: nothing happens, whatever the environment says now.
    assert bootstrap_admin(users, {"DICOMNODE_ADMIN_PASSWORD": "another-one"}) is None
    assert users.verify_password("admin", "another-one") is None


def test_first_admin_generated_password_printed_once(users: UserStore) -> None:
    printed: list[str] = []
    pw = bootstrap_admin(users, {}, print_fn=printed.append)
    assert pw and len(printed) == 1 and pw in printed[0]
    assert users.verify_password("admin", pw) is not None
    assert bootstrap_admin(users, {}, print_fn=printed.append) is None
    assert len(printed) == 1


def test_session_codec_signs_and_expires(tmp_path: Path) -> None:
    key = load_or_create_secret(tmp_path / "k")
    assert load_or_create_secret(tmp_path / "k") == key  # kept: sessions survive a restart
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    codec = SessionCodec(key)
    cookie, sess = codec.issue("alice")
    back = codec.read(cookie)
    assert back == sess and len(sess.csrf) >= 24
    assert codec.read(cookie[:-2] + "xx") is None
    assert SessionCodec(b"another-key-of-at-least-32-bytes!!").read(cookie) is None
    assert SessionCodec(key, max_age_s=-1).read(cookie) is None


def test_public_and_api_paths() -> None:
    assert _is_public("/api/health") and _is_public("/static/app.css") and _is_public("/login")
    assert not _is_public("/api/health/x") and not _is_public("/api/ready") and not _is_public("/loginx")
    assert _is_api("/api/jobs") and _is_api("/metrics") and not _is_api("/jobs")


# -- STOW-RS senders ---------------------------------------------------------------------------------------


def _stow_node(tmp_path: Path, allow: list[str]) -> tuple[Any, Any]:
    """An admin app with the real STOW-RS router on a real spool and store; ``(app, settings)``."""
    from web_testing import ADMIN_PASSWORD, make_settings, make_store

    from dicomnode.ingest import Spool
    from dicomnode.ingest.stow import build_stow_router
    from dicomnode.pipeline.sink import StoreSink
    from dicomnode.web.admin import install_admin
    from dicomnode.web.app import create_app

    settings = make_settings(tmp_path / "data", http={"port": 8000, "stow_allow_addresses": allow})
    store = make_store(settings)
    spool = Spool(settings.spool_dir, StoreSink(store), fsync=False)
    app = create_app(settings, store, routers=[build_stow_router(spool)], admin=False)
    install_admin(
        app,
        settings,
        store,
        environ={"DICOMNODE_ADMIN_PASSWORD": ADMIN_PASSWORD},
        password_hasher=FAST_HASHER,
    )
    app.state.web.users.create("pacs", "sender-pass-1", "sender")
    app.state.web.users.create("viewer", "viewer-pass-1", "viewer")
    return app, store


def _stow_body(tmp_path: Path, seed: int) -> tuple[bytes, dict[str, str]]:
    import pydicom
    from pydicom.uid import generate_uid
    from web_testing import write_sc

    path = write_sc(tmp_path / f"sc{seed}.dcm", seed=seed)
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()  # one study per part
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    boundary = "dicomnode-test-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def test_sender_role_may_only_store_instances(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    app, store = _stow_node(tmp_path, allow=[])
    sender = ("pacs", "sender-pass-1")
    with TestClient(app, follow_redirects=False) as c:
        body, headers = _stow_body(tmp_path, 1)
        r = c.post("/dicomweb/studies", content=body, headers=headers, auth=sender)
        assert r.status_code == 200, r.text
        assert store.list_studies().total == 1
        # The sender's bearer token works the same way.
        token = app.state.web.users.new_token("pacs")
        body2, headers2 = _stow_body(tmp_path, 2)
        r = c.post(
            "/dicomweb/studies", content=body2, headers={**headers2, "Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 200
        # Everything else is forbidden to a sender, reads included.
        for method, path in [
            ("GET", "/api/jobs"),
            ("GET", "/api/studies"),
            ("GET", "/"),
            ("GET", "/metrics"),
            ("GET", "/api/docs"),
            ("PUT", "/api/rules"),
            ("POST", "/api/users"),
            ("GET", "/dicomweb/studies"),
            ("POST", "/dicomweb/studies/1.2.3/series"),
        ]:
            assert c.request(method, path, auth=sender).status_code == 403, (method, path)
        assert c.get("/api/health", auth=sender).status_code == 200  # public stays public
        # A viewer is read-only: no STOW-RS. An admin may.
        body3, headers3 = _stow_body(tmp_path, 3)
        assert (
            c.post(
                "/dicomweb/studies", content=body3, headers=headers3, auth=("viewer", "viewer-pass-1")
            ).status_code
            == 403
        )
        from web_testing import ADMIN_PASSWORD

        assert (
            c.post(
                "/dicomweb/studies", content=body3, headers=headers3, auth=("admin", ADMIN_PASSWORD)
            ).status_code
            == 200
        )
        # Anonymous STOW-RS needs credentials by default.
        body4, headers4 = _stow_body(tmp_path, 4)
        r = c.post("/dicomweb/studies", content=body4, headers=headers4)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert store.list_studies().total == 3


def test_stow_without_credentials_only_from_listed_addresses(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    app, store = _stow_node(tmp_path, allow=["10.1.2.3", "192.168.7.0/24"])
    for address in ("10.1.2.3", "192.168.7.200"):
        with TestClient(app, follow_redirects=False, client=(address, 40000)) as c:
            body, headers = _stow_body(tmp_path, len(address))
            assert c.post("/dicomweb/studies", content=body, headers=headers).status_code == 200, address
            # Only STOW-RS: the rest of the node still needs credentials from that address.
            assert c.get("/api/jobs").status_code == 401
            assert c.get("/api/studies").status_code == 401
            # Wrong credentials are not silently ignored.
            assert (
                c.post(
                    "/dicomweb/studies", content=body, headers=headers, auth=("x", "wrong-pass")
                ).status_code
                == 401
            )
    for address in ("10.1.2.4", "192.168.8.1", "testclient"):
        with TestClient(app, follow_redirects=False, client=(address, 40000)) as c:
            body, headers = _stow_body(tmp_path, 9)
            assert c.post("/dicomweb/studies", content=body, headers=headers).status_code == 401, address
    assert store.list_studies().total == 2


def test_stow_paths_and_address_lists() -> None:
    assert is_stow_request("POST", "/dicomweb/studies")
    assert is_stow_request("POST", "/dicomweb/studies/1.2.3")
    assert not is_stow_request("GET", "/dicomweb/studies")
    assert not is_stow_request("POST", "/dicomweb/studies/1.2.3/series")
    assert not is_stow_request("POST", "/dicomweb/studiesX")
    assert [str(n) for n in parse_networks(["10.0.0.5", "10.0.1.0/24", "::1"])] == [
        "10.0.0.5/32",
        "10.0.1.0/24",
        "::1/128",
    ]
    with pytest.raises(ValueError, match="not an IP"):
        parse_networks(["pacs.example"])
