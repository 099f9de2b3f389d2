"""Dependencies of the admin routers (FastAPI ``Depends``): the web context, the user, roles, CSRF.

Everything a handler needs is reached through :class:`WebContext` (kept in ``app.state.web`` by
:func:`dicomnode.web.admin.install_admin`), never through globals, so several apps can live in one process
(tests).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates

from dicomnode.config import Settings
from dicomnode.store import Store
from dicomnode.web.actions import Actions
from dicomnode.web.auth import SessionCodec
from dicomnode.web.ratelimit import LoginThrottle
from dicomnode.web.rules import RulesService
from dicomnode.web.users import User, UserStore

__all__ = ["AdminUser", "AnyUser", "Ctx", "WebContext", "csrf", "get_ctx", "require_admin", "require_user"]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class WebContext:
    """The admin app's dependencies."""

    settings: Settings
    store: Store
    users: UserStore
    rules: RulesService
    actions: Actions
    sessions: SessionCodec
    templates: Jinja2Templates
    role: str = "serve"
    #: Failed-login counter shared by the login form and HTTP Basic (the auth middleware).
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def get_ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.web
    return ctx


def require_user(request: Request) -> User:
    """The authenticated user (the middleware already refused anonymous requests; this is the backstop)."""
    user: User | None = getattr(request.state, "user", None)
    if user is None:
        raise HTTPException(
            401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="dicomnode"'}
        )
    return user


async def csrf(request: Request) -> None:
    """Refuse a state-changing, cookie-authenticated request without the session's CSRF token (403)."""
    if request.method not in UNSAFE_METHODS or getattr(request.state, "auth", None) != "session":
        return
    expected: str | None = getattr(request.state, "csrf", None)
    given = request.headers.get("x-csrf-token")
    if not given:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token")
            given = value if isinstance(value, str) else None
    if not expected or not given or not hmac.compare_digest(expected, given):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page")


def require_admin(user: Annotated[User, Depends(require_user)], _: Annotated[None, Depends(csrf)]) -> User:
    """An admin (403 for a viewer); state-changing requests are CSRF-checked."""
    if not user.is_admin:
        raise HTTPException(403, "this needs the admin role")
    return user


Ctx = Annotated[WebContext, Depends(get_ctx)]
AnyUser = Annotated[User, Depends(require_user)]
AdminUser = Annotated[User, Depends(require_admin)]
