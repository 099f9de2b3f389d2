"""Login throttle: refuse password guessing after repeated failures (login form and HTTP Basic).

Failures are counted per user name *from one client address* (whether the account exists or not, so the
answer never tells which names exist) and per client address (the TCP peer, or the address a configured
reverse proxy forwards). When either count reaches its limit within the window, that name from that address
(or the whole address) is locked for the lockout period: every further attempt is refused before the
password is checked (HTTP 429 with ``Retry-After``). A successful log-in clears the counts of its name and
address.

A name is never locked for every address at once: otherwise anyone who can reach the port could lock out
a PACS's ``sender`` account (five wrong passwords for its name) and stop its STOW-RS deliveries. Guessing
one name from many addresses is slowed by the per-address limit on each of them and by argon2.

Each lockout is logged (WARNING, user name and address, never the password) and handed to the
``on_lockout`` callback (the admin app writes it to the audit log).

The counts live in this process's memory: a restart forgets them, and split ``receive`` / ``work`` processes
count separately. The clock is injected (tests pass a fake one; the default is :func:`time.monotonic`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from dicomnode.config import LoginThrottleSettings

log = logging.getLogger(__name__)

__all__ = ["Lockout", "LoginThrottle"]

#: Keys tracked at most (names and addresses together); beyond it the stalest are forgotten first.
MAX_KEYS = 10_000
_KEY_CHARS = 128

Scope = Literal["user", "address"]
_Key = tuple[Scope, str]


@dataclass(frozen=True)
class Lockout:
    """One lockout that just began.

    Attributes
    ----------
    scope
        ``"user"`` (a user name was locked from one client address) or ``"address"`` (a client address was
        locked for every name).
    username
        The user name of the attempt that reached the limit (as typed; it may not exist).
    address
        The client address of that attempt.
    via
        How the attempt came: ``"session"`` (login form) or ``"basic"`` (HTTP Basic).
    failures
        Failures counted within the window.
    seconds
        Length of the lockout.
    """

    scope: Scope
    username: str
    address: str
    via: str
    failures: int
    seconds: float


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    touched: float = 0.0


class LoginThrottle:
    """Counts failed log-ins and locks user names and client addresses (thread safe).

    Parameters
    ----------
    settings
        Limits, window and lockout length (``http.login_throttle``); None = the defaults.
    clock
        Seconds from a monotonic clock (tests pass a fake one).
    on_lockout
        Called with each new :class:`Lockout` (after the WARNING line is logged), outside the lock; its
        exceptions are logged, never raised to the request.
    """

    def __init__(
        self,
        settings: LoginThrottleSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_lockout: Callable[[Lockout], None] | None = None,
    ) -> None:
        self.settings = settings or LoginThrottleSettings()
        self.clock = clock
        self.on_lockout = on_lockout
        self._entries: dict[_Key, _Entry] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(username: str, address: str) -> tuple[_Key, _Key]:
        # Case-folded: "Admin" and "admin" share one count, whatever the database's collation does. The name
        # is counted per address, so a third party's failures never lock the name for its real user.
        name = username.strip().casefold()[:_KEY_CHARS]
        return ("user", f"{address[:_KEY_CHARS]}\0{name}"), ("address", address[:_KEY_CHARS])

    def _limit(self, scope: Scope) -> int:
        s = self.settings
        return s.max_failures if scope == "user" else s.max_failures_per_address

    def retry_after(self, username: str, address: str) -> int:
        """Seconds until an attempt for ``username`` from ``address`` may be made (0 = allowed now).

        Parameters
        ----------
        username
            The user name of the attempt (existing or not).
        address
            The client address of the attempt.

        Returns
        -------
        int
            Whole seconds (rounded up) of the longer of the two lockouts, 0 when neither is locked.
        """
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key in self._keys(username, address):
                entry = self._entries.get(key)
                if entry is not None and entry.locked_until > now:
                    wait = max(wait, entry.locked_until - now)
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, username: str, address: str, via: str) -> list[Lockout]:
        """Count a failed attempt; lock the name and/or address that reached its limit.

        Parameters
        ----------
        username, address
            The attempt's user name (as typed) and client address.
        via
            ``"session"`` (login form) or ``"basic"`` (HTTP Basic), for the log and the audit.

        Returns
        -------
        list of Lockout
            The lockouts this failure started (empty when none).
        """
        s = self.settings
        now = self.clock()
        started: list[Lockout] = []
        with self._lock:
            for key in self._keys(username, address):
                limit = self._limit(key[0])
                if limit <= 0:
                    continue
                entry = self._entries.get(key)
                if entry is None:
                    self._make_room(now)
                    entry = self._entries[key] = _Entry()
                entry.touched = now
                if entry.locked_until > now:
                    continue  # already locked (an attempt let through before the lock): no new lockout
                _forget_old(entry.failures, now - s.window_seconds)
                entry.failures.append(now)
                if len(entry.failures) >= limit:
                    entry.locked_until = now + s.lockout_seconds
                    entry.failures.clear()  # after the lockout, the next one needs a full count again
                    started.append(Lockout(key[0], username, address, via, limit, s.lockout_seconds))
        for lo in started:
            # User names are not patient data; the password never reaches this module.
            log.warning(
                "login locked out: %s %r for %.0f s after %d failed attempts (user %r, address %s, via %s)",
                lo.scope,
                lo.username if lo.scope == "user" else lo.address,
                lo.seconds,
                lo.failures,
                lo.username,
                lo.address,
                lo.via,
            )
            if self.on_lockout is not None:
                try:
                    self.on_lockout(lo)
                except Exception:  # the audit write failing must not turn a refusal into a 500
                    log.exception("could not record the lockout of %s %r", lo.scope, lo.username)
        return started

    def succeeded(self, username: str, address: str) -> None:
        """A successful log-in: forget the failures of ``username`` and of ``address``."""
        now = self.clock()
        with self._lock:
            for key in self._keys(username, address):
                entry = self._entries.get(key)
                if entry is not None and entry.locked_until <= now:
                    del self._entries[key]

    def _make_room(self, now: float) -> None:
        """Keep at most :data:`MAX_KEYS` entries: drop idle ones, then the stalest (caller holds the lock)."""
        if len(self._entries) < MAX_KEYS:
            return
        horizon = now - max(self.settings.window_seconds, self.settings.lockout_seconds)
        for key in [k for k, e in self._entries.items() if e.locked_until <= now and e.touched < horizon]:
            del self._entries[key]
        if len(self._entries) >= MAX_KEYS:
            # Unlocked entries go first: a flood of made-up names must not free a locked one.
            stalest = sorted(
                self._entries, key=lambda k: (self._entries[k].locked_until > now, self._entries[k].touched)
            )
            for key in stalest[: len(self._entries) - MAX_KEYS + 1]:
                del self._entries[key]


def _forget_old(failures: deque[float], oldest: float) -> None:
    while failures and failures[0] <= oldest:
        failures.popleft()
