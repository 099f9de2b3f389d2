"""The failed-login throttle: the login form and HTTP Basic lock a user name / an address after N failures.

The node's real admin app (TestClient) on a real SQLite store; only the clock is fake, so nothing sleeps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_testing import ADMIN_PASSWORD, FAST_HASHER, free_port, make_settings, make_store

from dicomnode.config import LoginThrottleSettings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.store import Store
from dicomnode.web.ratelimit import LoginThrottle

MAX_USER = 3
MAX_ADDRESS = 5
LOCKOUT = 300
WINDOW = 60


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(tmp_path: Path, clock: FakeClock) -> tuple[Any, Store]:
    from dicomnode.web.admin import install_admin
    from dicomnode.web.app import create_app

    settings = make_settings(
        tmp_path / "data",
        http={
            "port": free_port(),
            "login_throttle": {
                "max_failures": MAX_USER,
                "max_failures_per_address": MAX_ADDRESS,
                "window_seconds": WINDOW,
                "lockout_seconds": LOCKOUT,
            },
        },
    )
    store = make_store(settings)
    app = create_app(settings, store, admin=False)
    install_admin(
        app,
        settings,
        store,
        environ={"DICOMNODE_ADMIN_PASSWORD": ADMIN_PASSWORD},
        password_hasher=FAST_HASHER,
        clock=clock,
    )
    return app, store


def _client(app: Any, address: str = "10.0.0.1") -> TestClient:
    return TestClient(app, follow_redirects=False, client=(address, 50000))


def _form(c: TestClient, username: str, password: str) -> Any:
    return c.post("/login", data={"username": username, "password": password, "next": "/jobs"})


def _logged_in(r: Any) -> bool:
    return bool(
        r.status_code == 303 and r.headers["location"] == "/jobs" and "dicomnode_session" in r.cookies
    )


def _locked_events(store: Store) -> list[Any]:
    return [e for e in store.list_audit(limit=500).items if e.action == "login.locked"]


def test_form_login_is_refused_after_n_failures_with_429_and_retry_after(
    node: tuple[Any, Store], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, store = node
    with _client(app) as c, caplog.at_level(logging.WARNING, logger="dicomnode.web.ratelimit"):
        for _ in range(MAX_USER):
            r = _form(c, "admin", "wrong-password-1")
            assert r.status_code == 303 and r.headers["location"].startswith("/login?")
        # Locked now: even the right password is refused, before it is checked.
        r = _form(c, "admin", ADMIN_PASSWORD)
        assert r.status_code == 429
        assert r.headers["retry-after"] == str(LOCKOUT)
        assert r.headers["content-type"].startswith("text/html")
        assert "Too many failed log-ins; try again in 5 minutes." in r.text
        assert "Traceback" not in r.text and "dicomnode_session" not in r.cookies
        clock.t += 100
        r = _form(c, "admin", ADMIN_PASSWORD)
        assert r.status_code == 429 and r.headers["retry-after"] == str(LOCKOUT - 100)
    # One lockout: one audit event and one WARNING line, naming the user, never the password.
    events = _locked_events(store)
    assert [(e.actor, e.target) for e in events] == [("admin", "user:admin")]
    assert events[0].after["via"] == "session" and events[0].after["failures"] == MAX_USER
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "admin" in warnings[0]
    assert not any("wrong-password-1" in m or ADMIN_PASSWORD in m for m in caplog.messages)


def test_lockout_ends_after_the_period(node: tuple[Any, Store], clock: FakeClock) -> None:
    app, _store = node
    with _client(app) as c:
        for _ in range(MAX_USER):
            _form(c, "admin", "wrong-password-1")
        assert _form(c, "admin", ADMIN_PASSWORD).status_code == 429
        clock.t += LOCKOUT - 1
        assert _form(c, "admin", ADMIN_PASSWORD).status_code == 429
        clock.t += 1
        assert _logged_in(_form(c, "admin", ADMIN_PASSWORD))


def test_failures_outside_the_window_are_forgotten(node: tuple[Any, Store], clock: FakeClock) -> None:
    app, _store = node
    with _client(app) as c:
        for _ in range(MAX_USER - 1):
            _form(c, "admin", "wrong-password-1")
        clock.t += WINDOW + 1
        _form(c, "admin", "wrong-password-1")  # only one failure inside the window now
        assert _logged_in(_form(c, "admin", ADMIN_PASSWORD))


def test_success_resets_the_count(node: tuple[Any, Store]) -> None:
    app, store = node
    with _client(app) as c:
        for _ in range(3):
            for _ in range(MAX_USER - 1):
                assert _form(c, "admin", "wrong-password-1").status_code == 303
            assert _logged_in(_form(c, "admin", ADMIN_PASSWORD))
    assert _locked_events(store) == []


def test_basic_auth_is_throttled_too_and_shares_the_count(node: tuple[Any, Store], clock: FakeClock) -> None:
    app, store = node
    with _client(app) as c:
        assert c.get("/api/jobs", auth=("admin", ADMIN_PASSWORD)).status_code == 200
        for _ in range(MAX_USER):
            r = c.get("/api/jobs", auth=("admin", "wrong-password-1"))
            assert r.status_code == 401
        # Cached good credentials do not get round the lock either.
        r = c.get("/api/jobs", auth=("admin", ADMIN_PASSWORD))
        assert r.status_code == 429 and r.headers["retry-after"] == str(LOCKOUT)
        assert r.json() == {"detail": "Too many failed log-ins; try again in 5 minutes."}
        # The same name is locked for the login form (one counter), public paths stay public.
        assert _form(c, "admin", ADMIN_PASSWORD).status_code == 429
        assert c.get("/api/health", auth=("admin", ADMIN_PASSWORD)).status_code == 200
        clock.t += LOCKOUT
        assert c.get("/api/jobs", auth=("admin", ADMIN_PASSWORD)).status_code == 200
    events = _locked_events(store)
    assert len(events) == 1 and events[0].after["via"] == "basic"


def test_an_existing_and_an_unknown_user_look_the_same(node: tuple[Any, Store]) -> None:
    app, _store = node

    def story(username: str, address: str) -> list[tuple[int, str, str]]:
        seen = []
        with _client(app, address + "1") as c:
            for _ in range(MAX_USER + 1):
                r = _form(c, username, "wrong-password-1")
                seen.append((r.status_code, r.headers.get("location", ""), r.headers.get("retry-after", "")))
            page = _form(c, username, "wrong-password-1")
            seen.append((page.status_code, page.text, page.headers.get("retry-after", "")))
        with _client(app, address + "2") as c:  # another address: its own count
            for _ in range(MAX_USER + 1):
                r = c.get("/api/jobs", auth=(username + "-b", "wrong-password-1"))
                seen.append((r.status_code, r.text, r.headers.get("retry-after", "")))
        return seen

    app.state.web.users.create("admin-b", "admin-b-pass-1", "viewer")  # Basic half: an existing name too
    existing = story("admin", "10.0.1.")
    unknown = story("nobody", "10.0.2.")
    assert existing == unknown
    assert [s[0] for s in existing] == [303] * MAX_USER + [429, 429] + [401] * MAX_USER + [429]


def test_one_address_is_locked_across_user_names(node: tuple[Any, Store]) -> None:
    app, store = node
    with _client(app, "10.0.0.9") as c:
        for i in range(MAX_ADDRESS):
            assert _form(c, f"guess{i}", "wrong-password-1").status_code == 303
        assert _form(c, "admin", ADMIN_PASSWORD).status_code == 429
    with _client(app, "10.0.0.10") as other:
        assert _logged_in(_form(other, "admin", ADMIN_PASSWORD))
    events = _locked_events(store)
    assert [e.target for e in events] == ["address:10.0.0.9"]
    assert events[0].after["address"] == "10.0.0.9"


def test_throttle_limits_of_zero_switch_a_scope_off() -> None:
    clock = FakeClock()
    t = LoginThrottle(
        LoginThrottleSettings(max_failures=0, max_failures_per_address=2, lockout_seconds=10), clock=clock
    )
    t.failed("a", "addr1", "basic")
    assert t.retry_after("a", "addr1") == 0
    lockouts = t.failed("b", "addr1", "basic")
    assert [lo.scope for lo in lockouts] == ["address"]
    assert t.retry_after("anyone", "addr1") == 10 and t.retry_after("a", "addr2") == 0
    clock.t += 10.5
    assert t.retry_after("anyone", "addr1") == 0


def test_throttle_settings_defaults_and_validation(tmp_path: Path) -> None:
    s = load_settings(None, environ={})
    lt = s.http.login_throttle
    assert (lt.max_failures, lt.max_failures_per_address, lt.window_seconds, lt.lockout_seconds) == (
        5,
        20,
        900.0,
        900.0,
    )
    s = load_settings(None, environ={"DICOMNODE_HTTP__LOGIN_THROTTLE__MAX_FAILURES": "7"})
    assert s.http.login_throttle.max_failures == 7
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http:\n  login_throttle:\n    lockout_seconds: -1\n")
    with pytest.raises(ConfigError, match=r"http\.login_throttle\.lockout_seconds"):
        load_settings(cfg, environ={})
