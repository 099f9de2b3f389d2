"""Authentication for the admin app: session cookies for the pages, HTTP Basic or bearer tokens for scripts.

* :class:`SessionCodec` signs the session cookie (``itsdangerous``; HttpOnly, SameSite=Lax, Secure when the
  request came over https). The session holds the user name, a CSRF token, a session id and the account's
  stamp (password hash and role); the account is read from the users table on every request, and a session
  ends server-side at log-out (its id is revoked), on a password change, a role change or when the account
  is disabled.
* :class:`AuthMiddleware` (pure ASGI, so streamed STOW-RS bodies pass untouched) authenticates every request
  except the public paths (``/api/health``, ``/login``, ``/static/``). Anonymous API calls get 401 with
  ``WWW-Authenticate: Basic``; anonymous page views are redirected to ``/login``.
* Roles at the door: a ``sender`` (an account for a PACS that pushes studies) may only store instances with
  STOW-RS (``POST /dicomweb/studies[/{study}]``); any other path answers 403. STOW-RS itself needs the
  ``admin`` or ``sender`` role (a ``viewer`` is read-only: 403).
* Anonymous STOW-RS from listed client addresses (``http.stow_allow_addresses``, for a PACS that cannot
  authenticate; empty by default = credentials always required): only the STOW-RS path, only from those
  addresses (the TCP peer address; a forwarding proxy's headers are not trusted).
* Password guessing: HTTP Basic attempts go through the :class:`dicomnode.web.ratelimit.LoginThrottle`
  shared with the login form; a locked user name or client address gets 429 with ``Retry-After`` (before
  the password is checked, so an existing and an unknown name answer alike).
* CSRF: every state-changing request authenticated by the cookie must carry the session's token, in the
  ``X-CSRF-Token`` header (fetch) or the ``csrf_token`` form field (forms); see
  :func:`dicomnode.web.deps.csrf`.
  Basic/bearer requests carry no ambient credential and need no token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from itsdangerous import BadSignature, URLSafeTimedSerializer

from dicomnode.web.ratelimit import LoginThrottle
from dicomnode.web.users import User, UserStore

log = logging.getLogger(__name__)

__all__ = [
    "SESSION_COOKIE",
    "AuthMiddleware",
    "Session",
    "SessionCodec",
    "SessionRevocations",
    "is_stow_request",
    "load_or_create_secret",
    "parse_networks",
    "too_many_message",
]

SESSION_COOKIE = "dicomnode_session"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths anyone may fetch (prefix match for those ending in "/").
PUBLIC_PATHS: tuple[str, ...] = ("/api/health", "/login", "/static/", "/favicon.ico")
#: Path prefixes answered with 401 rather than a redirect to the login page.
API_PREFIXES: tuple[str, ...] = ("/api/", "/metrics", "/dicomweb")


def load_or_create_secret(path: Path) -> bytes:
    """The key that signs session cookies, kept in ``path`` (created 0600) so sessions survive restarts."""
    try:
        data = path.read_bytes().strip()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(key)
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


@dataclass(frozen=True)
class Session:
    """What a session cookie holds: the user, the CSRF token, the session id and the account stamp."""

    username: str
    csrf: str
    #: Random id of this session (what log-out revokes).
    sid: str = ""
    #: :meth:`SessionCodec.stamp` of the account when the session began (password hash and role).
    stamp: str = ""


class SessionRevocations:
    """Session ids ended by log-out, until their cookies would have expired anyway.

    Kept in memory and in ``path`` (JSON, written atomically, 0600) beside the key that signs the cookies,
    so a log-out survives a restart and holds for every node process that shares the key (the processes of
    one host, one data directory). A process re-reads the file when it changed on disk.

    Parameters
    ----------
    path
        The file; None = memory only (tests).
    max_age_s
        How long a revoked id is remembered (the cookie lifetime: after that the signature check refuses it).
    """

    def __init__(self, path: Path | None, max_age_s: float) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self._ids: dict[str, float] = {}
        self._mtime_ns = -1
        self._lock = threading.Lock()

    def revoke(self, sid: str) -> None:
        """End the session ``sid`` now (in this process at once, in others at their next request)."""
        if not sid:
            return
        with self._lock:
            self._reload()
            now = time.time()
            self._ids = {k: v for k, v in self._ids.items() if v > now}
            self._ids[sid] = now + self.max_age_s
            self._save()

    def is_revoked(self, sid: str) -> bool:
        with self._lock:
            self._reload()
            until = self._ids.get(sid)
        return until is not None and until > time.time()

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime_ns:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            log.warning("session revocation list %s unreadable; keeping the one in memory", self.path.name)
            return
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(k, str) and isinstance(v, int | float):
                    self._ids[k] = max(float(v), self._ids.get(k, 0.0))
        self._mtime_ns = mtime

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fp:
            json.dump(self._ids, fp)
        tmp.replace(self.path)
        self._mtime_ns = self.path.stat().st_mtime_ns


class SessionCodec:
    """Signs and reads the session cookie; sessions end server-side.

    A cookie is valid only while (1) its signature and age check out, (2) its session id was not revoked
    (log-out: :meth:`revoke`), and (3) the account's stamp still matches (:meth:`current`): the stamp is a
    keyed hash of the account's password hash and role, so a password change (``dicomnode user passwd``,
    the Users page) or a role change ends every session of that account at once, in every process.

    Parameters
    ----------
    secret
        Signing key.
    max_age_s
        Sessions older than this are refused (the user logs in again).
    revocations
        Where revoked session ids are kept (default: memory only).
    """

    def __init__(
        self, secret: bytes, max_age_s: float = 12 * 3600, revocations: SessionRevocations | None = None
    ) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="dicomnode-session")
        self._stamp_key = hmac.new(secret, b"dicomnode-session-stamp", hashlib.sha256).digest()
        self.max_age_s = max_age_s
        self.revocations = revocations or SessionRevocations(None, max_age_s)

    def stamp(self, password_hash: str, role: str) -> str:
        """The account stamp: changes whenever the password hash or the role changes."""
        mac = hmac.new(self._stamp_key, f"{password_hash}\0{role}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def issue(self, username: str, *, password_hash: str = "", role: str = "") -> tuple[str, Session]:
        """A new session cookie for ``username`` whose account has ``password_hash`` and ``role`` now."""
        sess = Session(
            username, secrets.token_urlsafe(24), secrets.token_urlsafe(16), self.stamp(password_hash, role)
        )
        cookie = self._s.dumps({"u": sess.username, "c": sess.csrf, "i": sess.sid, "s": sess.stamp})
        return cookie, sess

    def read(self, cookie: str) -> Session | None:
        """The session in a cookie: None when forged, expired, from before the stamp existed, or revoked."""
        try:
            data = self._s.loads(cookie, max_age=int(self.max_age_s))
        except BadSignature:
            return None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("u", "c", "i", "s")):
            return None
        if self.revocations.is_revoked(data["i"]):
            return None
        return Session(data["u"], data["c"], data["i"], data["s"])

    def current(self, sess: Session, password_hash: str, role: str) -> bool:
        """Whether ``sess`` was issued for the account as it is now (same password hash, same role)."""
        return hmac.compare_digest(sess.stamp, self.stamp(password_hash, role))

    def revoke(self, sess: Session) -> None:
        """End ``sess`` server-side (log-out): its cookie is refused from now on, wherever it is replayed."""
        self.revocations.revoke(sess.sid)


class _CredentialCache:
    """Short-lived memory of verified Basic credentials: argon2 is slow on purpose, scripts poll often.

    It remembers the stored password hash the credentials were verified against; a hit counts only while
    the account still has that hash and is enabled (checked in the database on each request, as sessions
    are), so a password reset or a disabled account (``dicomnode user``, another process) applies at once.
    """

    def __init__(self, ttl_s: float = 60.0, size: int = 256) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._key = secrets.token_bytes(32)
        self._d: dict[bytes, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def _k(self, username: str, password: str) -> bytes:
        return hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256).digest()

    def get(self, username: str, password: str) -> str | None:
        """The password hash these credentials were verified against, or None."""
        k = self._k(username, password)
        with self._lock:
            hit = self._d.get(k)
            if hit is None or hit[0] < time.monotonic():
                self._d.pop(k, None)
                return None
            return hit[1]

    def put(self, username: str, password: str, password_hash: str) -> None:
        with self._lock:
            if len(self._d) >= self.size:
                self._d.clear()
            self._d[self._k(username, password)] = (time.monotonic() + self.ttl_s, password_hash)

    def drop(self, username: str, password: str) -> None:
        with self._lock:
            self._d.pop(self._k(username, password), None)


#: Path of the STOW-RS receiver (``dicomnode.ingest.stow``, mounted under this prefix).
STOW_PATH = "/dicomweb/studies"
#: Roles that may store instances with STOW-RS.
STOW_ROLES = frozenset({"admin", "sender"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_stow_request(method: str, path: str) -> bool:
    """``POST /dicomweb/studies`` or ``POST /dicomweb/studies/{study}`` (and nothing below a study)."""
    if method != "POST":
        return False
    if path in (STOW_PATH, STOW_PATH + "/"):
        return True
    rest = path[len(STOW_PATH) + 1 :] if path.startswith(STOW_PATH + "/") else ""
    return bool(rest) and "/" not in rest.rstrip("/")


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """``["10.0.0.5", "192.168.1.0/24"]`` -> networks; ``ValueError`` naming a bad entry."""
    out: list[Network] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or network") from None
    return tuple(out)


def _address_in(host: str | None, networks: Sequence[Network]) -> bool:
    if not host or not networks:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in networks)


def _is_public(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in PUBLIC_PATHS)


def _is_api(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in API_PREFIXES)


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


class AuthMiddleware:
    """Authenticate every non-public request; put ``user``, ``auth`` and ``csrf`` in ``request.state``.

    Parameters
    ----------
    app
        The wrapped ASGI app.
    users
        Where users, password hashes and token hashes live.
    sessions
        The cookie codec.
    stow_allow_addresses
        Client addresses or networks allowed to use STOW-RS without credentials (default: none).
    throttle
        Failed-login counter shared with the login form (default: a private one with default limits).
    """

    def __init__(
        self,
        app: ASGIApp,
        users: UserStore,
        sessions: SessionCodec,
        stow_allow_addresses: Sequence[str] = (),
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.app = app
        self.users = users
        self.sessions = sessions
        self.stow_networks = parse_networks(stow_allow_addresses)
        self.throttle = throttle or LoginThrottle()
        self._cache = _CredentialCache()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = scope.get("client")
        address = str(client[0]) if client else ""
        user, how, sess, wait = await self._authenticate(headers, address)
        if how == "locked":
            if not _is_public(path):
                await _too_many(send, wait)
                return
            how = None  # a public path (health, login page) is served as to anyone
        state = scope.setdefault("state", {})
        state["user"] = user
        state["auth"] = how
        state["csrf"] = sess.csrf if sess is not None else None
        state["session"] = sess
        stow = is_stow_request(scope.get("method", "GET"), path)
        if user is None and stow and how is None and _address_in(address or None, self.stow_networks):
            state["auth"] = "address"
            await self.app(scope, receive, send)
            return
        if user is None and not _is_public(path):
            await self._deny(scope, send, path, bad_credentials=how == "failed")
            return
        if user is not None and not _is_public(path):
            if user.is_sender and not stow:
                await _forbid(send, "the sender role may only store instances (POST /dicomweb/studies)")
                return
            if stow and user.role not in STOW_ROLES:
                await _forbid(send, "storing instances needs the admin or sender role")
                return
        await self.app(scope, receive, send)

    async def _authenticate(
        self, headers: dict[str, str], address: str
    ) -> tuple[User | None, str | None, Session | None, int]:
        """``(user, how, session, retry-after seconds)``; ``how`` is "locked" for a throttled Basic try."""
        from starlette.concurrency import run_in_threadpool

        authz = headers.get("authorization", "")
        scheme, _, value = authz.partition(" ")
        if scheme.lower() == "basic" and value:
            try:
                username, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, "failed", None, 0
            # Checked first, even for cached credentials: a locked name answers the same whether it
            # exists or not, and whether the password is right or not.
            wait = self.throttle.retry_after(username, address)
            if wait:
                return None, "locked", None, wait
            user = None
            cached = self._cache.get(username, password)
            if cached is not None:
                found = await run_in_threadpool(self.users.lookup, username)
                if found is not None and found[1] == cached:
                    user = found[0]  # its current role
                    self.throttle.succeeded(username, address)
                else:
                    self._cache.drop(username, password)
            if user is None:
                # argon2 takes tens of ms (and a lockout is audited in the database): off the event loop.
                user = await run_in_threadpool(self._verify_basic, username, password, address)
            return (user, "basic", None, 0) if user is not None else (None, "failed", None, 0)
        if scheme.lower() == "bearer" and value:
            user = await run_in_threadpool(self.users.verify_token, value.strip())
            return (user, "bearer", None, 0) if user is not None else (None, "failed", None, 0)
        cookie = _cookies(headers).get(SESSION_COOKIE)
        if cookie:
            sess = self.sessions.read(cookie)
            if sess is not None:
                # The account as it is now: disabled, a new password or another role end the session.
                found = await run_in_threadpool(self.users.lookup, sess.username)
                if found is not None and self.sessions.current(sess, found[1], found[0].role):
                    return found[0], "session", sess, 0
        return None, None, None, 0

    def _verify_basic(self, username: str, password: str, address: str) -> User | None:
        user = self.users.verify_password(username, password)
        if user is None:
            self.throttle.failed(username, address, "basic")
            return None
        self.throttle.succeeded(username, address)
        found = self.users.lookup(username)
        if found is not None:
            self._cache.put(username, password, found[1])
        return user

    async def _deny(self, scope: Scope, send: Send, path: str, *, bad_credentials: bool) -> None:
        method = scope.get("method", "GET")
        if not _is_api(path) and method in ("GET", "HEAD") and not bad_credentials:
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            await _respond(send, 303, b"", [(b"location", f"/login?next={quote(target, safe='')}".encode())])
            return
        body = json.dumps({"detail": "authentication required"}).encode()
        await _respond(
            send,
            401,
            body,
            [(b"content-type", b"application/json"), (b"www-authenticate", b'Basic realm="dicomnode"')],
        )


async def _too_many(send: Send, wait: int) -> None:
    body = json.dumps({"detail": too_many_message(wait)}).encode()
    await _respond(
        send, 429, body, [(b"content-type", b"application/json"), (b"retry-after", str(wait).encode())]
    )


def too_many_message(wait: int) -> str:
    """The one line shown for a refused (throttled) log-in; the same for every user name."""
    minutes = max(1, math.ceil(wait / 60))
    return f"Too many failed log-ins; try again in {minutes} minute{'s' if minutes != 1 else ''}."


async def _forbid(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await _respond(send, 403, body, [(b"content-type", b"application/json")])


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def session_cookie_kwargs(secure: bool) -> dict[str, Any]:
    """Attributes of the session cookie (``Response.set_cookie`` keywords)."""
    return {"httponly": True, "samesite": "lax", "secure": secure, "path": "/"}
