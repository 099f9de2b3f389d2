"""The HTTP application factory: health, readiness, metrics, and whatever routers the caller mounts.

``create_app`` builds a FastAPI app from things created elsewhere (settings, store, routers, readiness
checks): it opens no database and starts no thread itself, so the same factory serves ``serve``, ``receive``
and ``work`` (and tests). Other web features (admin pages, REST API) are mounted by passing their routers in,
or by extending the app the factory returns; ``app.state.settings`` and ``app.state.store`` hold the
dependencies for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse

from dicomnode import __version__
from dicomnode.config import Settings

#: A readiness check: returns None when ready, or a one-line reason why not.
ReadinessCheck = Callable[[], "str | None"]

__all__ = ["ReadinessCheck", "create_app"]


def create_app(
    settings: Settings,
    store: Any = None,
    *,
    role: str = "serve",
    routers: Sequence[APIRouter] = (),
    readiness: Sequence[tuple[str, ReadinessCheck]] = (),
    admin: bool = True,
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

    Returns
    -------
    FastAPI
        The app; serve it with uvicorn.
    """
    app = FastAPI(
        title="dicomnode", version=__version__, docs_url="/api/docs", openapi_url="/api/openapi.json"
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

        install_admin(app, settings, store, role=role, readiness=checks)
    # --- end hook --------------------------------------------------------------------------------------
    return app
