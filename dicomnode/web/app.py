"""The HTTP application factory: health, readiness, metrics, and whatever routers the caller mounts.

``create_app`` builds a FastAPI app from things created elsewhere (settings, store, routers, readiness
checks): it opens no database and starts no thread itself, so the same factory serves ``serve``, ``receive``
and ``work`` (and tests). Other web features (admin pages, REST API) are mounted by passing their routers in,
or by extending the app the factory returns; ``app.state.settings`` and ``app.state.store`` hold the
dependencies for them.

API documentation works offline (the node usually has no internet): FastAPI's Swagger UI and ReDoc pages,
which load their scripts from a CDN, are off; ``/api/docs`` is a small page rendered here from the OpenAPI
description (``/api/openapi.json``) that references no other host.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import HTMLResponse, JSONResponse

from dicomnode import __version__
from dicomnode.config import Settings

if TYPE_CHECKING:  # typing only: the bare app (health, metrics) stays light
    from dicomnode.pipeline.rules_in_force import RulesInForce

#: A readiness check: returns None when ready, or a one-line reason why not.
ReadinessCheck = Callable[[], "str | None"]

__all__ = ["ReadinessCheck", "api_docs_html", "create_app"]

_METHODS = ("get", "post", "put", "patch", "delete")


def api_docs_html(spec: Mapping[str, Any]) -> str:
    """A self-contained HTML page listing the operations of an OpenAPI document (no script, no CDN)."""
    info = spec.get("info", {})
    title = html.escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    rows = []
    for path, item in sorted(spec.get("paths", {}).items()):
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            summary = op.get("summary") or ""
            desc = (op.get("description") or "").strip().split("\n\n")[0]
            tags = ", ".join(op.get("tags", []))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(tags)}</td><td><b>{html.escape(summary)}</b><br>{html.escape(desc)}</td></tr>"
            )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title} - API</title>"
        "</head>"  # no inline style: the Content-Security-Policy allows none (dicomnode.web.security)
        f"<body><h1>{title} - REST API</h1>"
        "<p>Machine-readable description: <a href='/api/openapi.json'>/api/openapi.json</a>. "
        "Authenticate with HTTP Basic or <code>Authorization: Bearer TOKEN</code>.</p>"
        "<table border='1' cellpadding='4'><thead>"
        "<tr><th>Method</th><th>Path</th><th>Tags</th><th>What it does</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>"
    )


def create_app(
    settings: Settings,
    store: Any = None,
    *,
    role: str = "serve",
    routers: Sequence[APIRouter] = (),
    readiness: Sequence[tuple[str, ReadinessCheck]] = (),
    admin: bool = True,
    rules: RulesInForce | None = None,
) -> FastAPI:
    """Build the node's HTTP app.

    Parameters
    ----------
    settings
        The validated settings (kept in ``app.state.settings``).
    store
        The :class:`dicomnode.store.Store` (kept in ``app.state.store`` for routers that need it).
    role
        The process role reported by ``/api/health`` ("serve", "receive" or "work").
    routers
        Routers to mount as they are (e.g. the STOW-RS router from ``dicomnode.ingest``).
    readiness
        ``(name, check)`` pairs evaluated by ``/api/ready``; a check returns None when ready, or a reason.
    admin
        With a store: install the admin UI, REST API, authentication and database metrics
        (:func:`dicomnode.web.admin.install_admin`); False = the bare app (health, ready, metrics, routers).
    rules
        The node's rules provider, the one its runner routes with (the admin app makes its own when None).

    Returns
    -------
    FastAPI
        The app; serve it with uvicorn.
    """
    # No Swagger UI / ReDoc: they load from a CDN, and the node has no internet (see /api/docs below).
    app = FastAPI(
        title="dicomnode",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.settings = settings
    app.state.store = store
    app.state.role = role
    checks = list(readiness)

    @app.get("/api/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers HTTP."""
        return {"status": "ok", "version": __version__, "role": role}

    @app.get("/api/ready", tags=["health"])
    def ready() -> JSONResponse:
        """Readiness: every check passes (database reachable, listeners up...); 503 otherwise."""
        problems: dict[str, str] = {}
        for name, check in checks:
            try:
                reason = check()
            except Exception as exc:  # a failing check means "not ready", never a 500
                reason = f"{type(exc).__name__}: {exc}"
            if reason:
                problems[name] = reason
        status = "ready" if not problems else "not ready"
        return JSONResponse(
            {"status": status, "problems": problems}, status_code=200 if not problems else 503
        )

    @app.get("/api/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        """The endpoints, listed from the OpenAPI description (works without internet)."""
        return HTMLResponse(api_docs_html(app.openapi()))

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics of this process (the default registry)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)

    # --- hook: admin UI + REST API + auth + DB metrics (owner: dicomnode.web.admin) -------------------
    if admin and store is not None:
        from dicomnode.web.admin import install_admin

        install_admin(app, settings, store, role=role, readiness=checks, rules=rules)
        from dicomnode.web.fhir import router as fhir_router  # FHIR lab values (issue 12)

        app.include_router(fhir_router)
    # --- end hook --------------------------------------------------------------------------------------
    from dicomnode.web.security import HstsMiddleware, SecurityHeadersMiddleware

    if settings.http.hsts_seconds:  # HSTS on HTTPS responses
        app.add_middleware(HstsMiddleware, max_age_s=settings.http.hsts_seconds)
    # Added last, so outermost: every response gets the headers, the auth middleware's refusals included.
    app.add_middleware(SecurityHeadersMiddleware)
    return app
