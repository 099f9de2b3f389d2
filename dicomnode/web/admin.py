"""Install the admin UI, the REST API, authentication and the database metrics on the node's FastAPI app.

``create_app`` (``dicomnode.web.app``) calls :func:`install_admin` for apps that have a store; it can also be
called on any FastAPI app::

    install_admin(app, settings, store, environ=os.environ)   # at app start, never at import

What it adds: the first admin (``DICOMNODE_ADMIN_PASSWORD`` or a generated password printed once; the
``users`` table itself comes from the store's migrations), the authentication middleware (with the STOW-RS
address allow-list of ``http.stow_allow_addresses`` and the failed-login throttle of ``http.login_throttle``,
shared by ``/login`` and HTTP Basic, each lockout audited as ``login.locked``), ``/login``, the pages,
``/api/...`` routes, the static files, a ``spool`` readiness check, ``/metrics`` with the database-derived
metrics, and one structured access log line per request (method, path, status, user, duration; never patient
data).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, MutableSequence
from datetime import datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.routing import Route

from dicomnode.config import Settings
from dicomnode.pipeline.rules_in_force import RulesInForce
from dicomnode.store import Store
from dicomnode.web import api, pages
from dicomnode.web.actions import Actions, ProbeFn
from dicomnode.web.auth import AuthMiddleware, SessionCodec, SessionRevocations, load_or_create_secret
from dicomnode.web.deps import WebContext
from dicomnode.web.prometheus import StoreCollector, metrics_text
from dicomnode.web.ratelimit import Lockout, LoginThrottle
from dicomnode.web.rules import RulesService
from dicomnode.web.security import SecurityHeadersMiddleware
from dicomnode.web.users import UserStore, bootstrap_admin, ensure_users_table

log = logging.getLogger(__name__)
access_log = logging.getLogger("dicomnode.web.access")

__all__ = ["install_admin", "spool_space_check"]

HERE = Path(__file__).resolve().parent
STATE_CLASSES = {
    "pending": "st-wait",
    "analysing": "st-run",
    "reported": "st-run",
    "delivering": "st-run",
    "done": "st-ok",
    "success": "st-ok",
    "not_qualifying": "st-muted",
    "superseded": "st-muted",
    "failed": "st-bad",
    "permanent_failure": "st-bad",
    "retrying": "st-warn",
}


def spool_space_check(settings: Settings) -> Callable[[], str | None]:
    """Readiness: the spool's filesystem has more free space than ``dicom.free_space_floor_mb``."""

    def check() -> str | None:
        path = settings.spool_dir if settings.spool_dir.exists() else settings.data_dir
        free = shutil.disk_usage(path).free
        floor = settings.dicom.free_space_floor_mb * 1_000_000
        if free < floor:
            return f"spool has {free / 1e6:.0f} MB free, below the floor of {floor / 1e6:.0f} MB"
        return None

    return check


def _fmt_dt(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _fmt_num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _attr(attrs: Mapping[str, Any] | None, key: str) -> str:
    v = attrs.get(key) if attrs else None
    if v is None:
        return ""
    if isinstance(v, list | tuple):
        return "\\".join(str(x) for x in v)
    return str(v)


def _short_uid(uid: str | None, n: int = 24) -> str:
    if not uid:
        return ""
    return uid if len(uid) <= n else "…" + uid[-(n - 1) :]


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["dt"] = _fmt_dt
    env.filters["num"] = _fmt_num
    env.filters["bytes"] = _fmt_bytes
    env.filters["short_uid"] = _short_uid
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=1, sort_keys=True, default=str)
    env.globals["attr"] = _attr
    env.globals["state_class"] = lambda s: STATE_CLASSES.get(str(getattr(s, "value", s)), "st-muted")
    return templates


def install_admin(
    app: FastAPI,
    settings: Settings,
    store: Store,
    *,
    role: str = "serve",
    readiness: MutableSequence[tuple[str, Callable[[], str | None]]] | None = None,
    environ: Mapping[str, str] | None = None,
    probe: ProbeFn | None = None,
    on_jobs_created: Callable[[], None] | None = None,
    password_hasher: PasswordHasher | None = None,
    clock: Callable[[], float] = time.monotonic,
    rules: RulesInForce | None = None,
) -> WebContext:
    """Add the admin app to ``app`` (see the module docstring).

    Parameters
    ----------
    app
        The node's FastAPI app (from ``create_app``).
    settings, store
        The node's settings and store.
    role
        Process role shown in the UI.
    readiness
        The app's readiness checks; a spool-space check is appended.
    environ
        Where ``DICOMNODE_ADMIN_PASSWORD`` is read (default ``os.environ``, read now).
    probe
        Destination test function (default: ``dicomnode.delivery.echo``).
    on_jobs_created
        Called after a re-run (wakes local workers).
    password_hasher
        argon2 parameters (tests use cheap ones).
    clock
        Monotonic seconds for the login throttle's window and lockout (tests pass a fake clock).
    rules
        The node's rules provider, shared with the runner (a new one over ``store`` when None).

    Returns
    -------
    WebContext
        Also kept in ``app.state.web``.
    """
    ensure_users_table(store.engine)  # a check only: migration 0002 creates the table
    users = UserStore(store.engine, password_hasher)
    bootstrap_admin(users, os.environ if environ is None else environ)
    secret = load_or_create_secret(settings.data_dir / "web-session.key")
    ctx = WebContext(
        settings=settings,
        store=store,
        users=users,
        rules=RulesService(store, settings, rules),
        actions=Actions(store, settings, probe=probe, on_jobs_created=on_jobs_created),
        sessions=SessionCodec(
            secret,
            max_age_s=settings.http.session_max_age_seconds,
            revocations=SessionRevocations(
                settings.data_dir / "web-sessions-revoked.json", settings.http.session_max_age_seconds
            ),
        ),
        templates=make_templates(),
        role=role,
        throttle=LoginThrottle(settings.http.login_throttle, clock=clock, on_lockout=_audit_lockout(store)),
    )
    app.state.web = ctx
    if readiness is not None:
        readiness.append(("spool", spool_space_check(settings)))

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # /metrics: the process's default registry plus the database-derived metrics of this node.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, settings.spool_dir))
    app.router.routes[:] = [
        r for r in app.router.routes if not (isinstance(r, Route) and r.path == "/metrics")
    ]

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(metrics_text(registry), media_type=CONTENT_TYPE_LATEST)

    _install_error_pages(app, ctx)
    app.add_middleware(_AccessLog)
    app.add_middleware(  # outermost: runs first
        AuthMiddleware,
        users=users,
        sessions=ctx.sessions,
        stow_allow_addresses=settings.http.stow_allow_addresses,
        throttle=ctx.throttle,
    )
    # Outermost again (idempotent): the refusals the auth middleware writes get the security headers too.
    app.add_middleware(SecurityHeadersMiddleware)
    return ctx


def _audit_lockout(store: Store) -> Callable[[Lockout], None]:
    def record(lo: Lockout) -> None:
        target = f"user:{lo.username[:64]}" if lo.scope == "user" else f"address:{lo.address[:64]}"
        store.audit(
            lo.username[:64] or "?",
            "login.locked",
            target,
            after={
                "via": lo.via,
                "address": lo.address,
                "failures": lo.failures,
                "lockout_seconds": lo.seconds,
            },
        )

    return record


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith(
        ("/api/", "/metrics", "/dicomweb")
    ) and "text/html" in request.headers.get("accept", "text/html")


def _install_error_pages(app: FastAPI, ctx: WebContext) -> None:
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if _wants_html(request) and exc.status_code in (403, 404, 409):
            return ctx.templates.TemplateResponse(
                request,
                "error.html",
                {
                    "request": request,
                    "user": getattr(request.state, "user", None),
                    "csrf_token": getattr(request.state, "csrf", None) or "",
                    "nav": pages.NAV,
                    "active": "",
                    "status": exc.status_code,
                    "detail": exc.detail,
                    "node_role": ctx.role,
                },
                status_code=exc.status_code,
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


class _AccessLog:
    """One structured log line per request: JSON with method, path, status, user and milliseconds."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            if not path.startswith("/static/"):
                user = scope.get("state", {}).get("user")
                access_log.info(
                    "%s",
                    json.dumps(
                        {
                            "event": "http",
                            "method": scope.get("method"),
                            "path": path,
                            "status": status[0],
                            "user": getattr(user, "username", None),
                            "ms": round((time.perf_counter() - t0) * 1000, 1),
                        }
                    ),
                )
