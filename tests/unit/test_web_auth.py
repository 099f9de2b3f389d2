"""Users, password hashing, the first admin, session cookies and the auth middleware's decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine
from web_testing import FAST_HASHER

from dicomnode.errors import InputError
from dicomnode.web.auth import SessionCodec, _is_api, _is_public, load_or_create_secret
from dicomnode.web.users import UserStore, bootstrap_admin, ensure_users_table


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    engine = create_engine(f"sqlite:///{tmp_path / 'u.sqlite3'}")
    ensure_users_table(engine)
    ensure_users_table(engine)  # idempotent
    return UserStore(engine, FAST_HASHER)


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
