"""``dicomnode user add|passwd|list|disable|enable`` on a real (SQLite) node database, through ``main``.

An account made by the CLI logs in through the real admin app (TestClient); every change is audited; every
error is one line on stderr with exit code 2.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_testing import build_admin_app, make_settings, make_store

from dicomnode.cli import main
from dicomnode.config import Settings
from dicomnode.store import Store
from dicomnode.web.users import UserStore

PASSWORD = "alice-pass-123"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Store, Path]:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    settings = make_settings(tmp_path / "data")
    store = make_store(settings)  # migrated, as 'dicomnode db upgrade' or a node start leaves it
    return settings, store, tmp_path / "data-config.yaml"


def run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config: Path,
    *argv: str,
    stdin: str = "",
    typed: tuple[str, ...] = (),
) -> tuple[int, str, str]:
    """``dicomnode user ARGV --config CONFIG``; ``stdin`` and ``typed`` answers to the password prompts."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    answers = list(typed)

    def fake_getpass(prompt: str = "") -> str:
        if not answers:
            raise EOFError
        return answers.pop(0)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    rc = main(["user", *argv, "--config", str(config)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, expected: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


def _audit(store: Store) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, e.target) for e in reversed(store.list_audit(limit=100).items)]


def test_add_list_passwd_disable_enable(
    node: tuple[Settings, Store, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _settings, store, cfg = node
    users = UserStore(store.engine)
    rc, out, _ = run(
        monkeypatch, capsys, cfg, "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert rc == 0 and "alice" in out
    u = users.verify_password("alice", PASSWORD)
    assert u is not None and u.role == "admin"
    # Prompted twice at the terminal.
    rc, _, _ = run(monkeypatch, capsys, cfg, "add", "bob", "--role", "viewer", typed=("bob-pass-123",) * 2)
    assert rc == 0 and users.verify_password("bob", "bob-pass-123") is not None

    rc, out, _ = run(monkeypatch, capsys, cfg, "list")
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.strip().splitlines()[1:]}
    assert rows["alice"][:4] == ["alice", "admin", "yes", "never"]
    assert rows["bob"][:4] == ["bob", "viewer", "yes", "never"]

    rc, _, _ = run(monkeypatch, capsys, cfg, "passwd", "alice", typed=("new-alice-pass", "new-alice-pass"))
    assert rc == 0
    assert users.verify_password("alice", PASSWORD) is None
    assert users.verify_password("alice", "new-alice-pass") is not None

    rc, _, _ = run(monkeypatch, capsys, cfg, "disable", "bob")
    assert rc == 0 and users.verify_password("bob", "bob-pass-123") is None
    rc, out, _ = run(monkeypatch, capsys, cfg, "disable", "bob")
    assert rc == 0 and "already disabled" in out
    _, out, _ = run(monkeypatch, capsys, cfg, "list")
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("bob")] == [
        ["bob", "viewer", "no"]
    ]
    rc, _, _ = run(monkeypatch, capsys, cfg, "enable", "bob")
    assert rc == 0 and users.verify_password("bob", "bob-pass-123") is not None

    # Every change is in the audit log, by the CLI, without a password anywhere in it.
    trail = _audit(store)
    assert [(a, t) for _, a, t in trail] == [
        ("user.create", "user:alice"),
        ("user.create", "user:bob"),
        ("user.password", "user:alice"),
        ("user.disable", "user:bob"),
        ("user.enable", "user:bob"),
    ]
    assert all(actor.startswith("cli") for actor, _, _ in trail)
    dumped = repr(store.list_audit(limit=100).items)
    assert PASSWORD not in dumped and "new-alice-pass" not in dumped and "bob-pass-123" not in dumped


def test_a_user_created_by_the_cli_logs_in_to_the_web_app(
    node: tuple[Settings, Store, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, store, cfg = node
    rc, _, _ = run(
        monkeypatch, capsys, cfg, "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert rc == 0
    app = build_admin_app(settings, store)
    with TestClient(app, follow_redirects=False) as c:
        r = c.post("/login", data={"username": "alice", "password": PASSWORD, "next": "/"})
        assert r.status_code == 303 and r.headers["location"] == "/" and "dicomnode_session" in r.cookies
        assert c.get("/api/me").json()["username"] == "alice"
        c.cookies.clear()
        me = c.get("/api/me", auth=("alice", PASSWORD))
        assert me.status_code == 200 and me.json()["role"] == "admin"
    # The form log-in shows up as the last log-in.
    _, out, _ = run(monkeypatch, capsys, cfg, "list")
    alice = next(line.split() for line in out.splitlines() if line.startswith("alice"))
    assert alice[3] != "never" and alice[3][:2] == "20"
    # A password reset and a disabled account apply at once in the running app (no stale cached login).
    with TestClient(app, follow_redirects=False) as c:
        assert c.get("/api/me", auth=("alice", PASSWORD)).status_code == 200
        assert run(monkeypatch, capsys, cfg, "passwd", "alice", typed=("alice-new-pass",) * 2)[0] == 0
        assert c.get("/api/me", auth=("alice", PASSWORD)).status_code == 401
        assert c.get("/api/me", auth=("alice", "alice-new-pass")).status_code == 200
        assert run(monkeypatch, capsys, cfg, "disable", "alice")[0] == 0
        assert c.get("/api/me", auth=("alice", "alice-new-pass")).status_code == 401
        r = c.post("/login", data={"username": "alice", "password": "alice-new-pass", "next": "/"})
        assert r.status_code == 303 and r.headers["location"].startswith("/login?")


def test_errors_are_one_line_with_exit_code_2(
    node: tuple[Settings, Store, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _settings, store, cfg = node
    add = ("add", "carol", "--role", "viewer", "--password-stdin")
    rc, _, err = run(monkeypatch, capsys, cfg, *add, stdin="short\n")
    _one_line_error(rc, err, "at least 8 characters")
    rc, _, err = run(monkeypatch, capsys, cfg, *add, stdin="\n")
    _one_line_error(rc, err, "must not be empty")
    rc, _, err = run(monkeypatch, capsys, cfg, *add, stdin="")
    _one_line_error(rc, err, "no password")
    rc, _, err = run(
        monkeypatch, capsys, cfg, "add", "carol", "--role", "root", "--password-stdin", stdin="x" * 9
    )
    _one_line_error(rc, err, "unknown role 'root'")
    rc, _, err = run(
        monkeypatch, capsys, cfg, "add", "carol", "--role", "viewer", typed=("carol-pass-1", "carol-pass-2")
    )
    _one_line_error(rc, err, "do not match")
    rc, _, err = run(
        monkeypatch, capsys, cfg, "add", "a b", "--role", "viewer", "--password-stdin", stdin="x" * 9
    )
    _one_line_error(rc, err, "user name")
    assert UserStore(store.engine).accounts() == []

    assert run(monkeypatch, capsys, cfg, *add, stdin="carol-pass-1\n")[0] == 0
    rc, _, err = run(monkeypatch, capsys, cfg, *add, stdin="carol-pass-1\n")
    _one_line_error(rc, err, "exists already")
    for action in ("passwd", "disable", "enable"):
        rc, _, err = run(monkeypatch, capsys, cfg, action, "nobody")
        _one_line_error(rc, err, "no user 'nobody'")
    rc, _, err = run(monkeypatch, capsys, cfg, "passwd", "carol", "--password-stdin", stdin="tiny\n")
    _one_line_error(rc, err, "at least 8 characters")
    assert UserStore(store.engine).verify_password("carol", "carol-pass-1") is not None
    assert [a for _, a, _ in _audit(store)] == ["user.create"]  # refused changes are not audited


def test_an_unmigrated_database_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_settings(tmp_path / "fresh")
    rc, _, err = run(monkeypatch, capsys, tmp_path / "fresh-config.yaml", "list")
    _one_line_error(rc, err, "dicomnode db upgrade")
    rc, _, err = run(monkeypatch, capsys, tmp_path / "missing.yaml", "list")
    _one_line_error(rc, err, "cannot read")


def test_the_installed_command_reads_the_password_from_stdin(node: tuple[Settings, Store, Path]) -> None:
    _settings, store, cfg = node
    cmd: list[Any] = [sys.executable, "-m", "dicomnode", "user", "add", "dana", "--role", "sender"]
    r = subprocess.run(
        [*cmd, "--password-stdin", "--config", cfg], input="dana-pass-123\n", capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    u = UserStore(store.engine).verify_password("dana", "dana-pass-123")
    assert u is not None and u.is_sender
    # A password is never accepted as an argument.
    r = subprocess.run([*cmd, "--password", "dana-pass-123", "--config", cfg], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
