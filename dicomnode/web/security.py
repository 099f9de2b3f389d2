"""HTTP security headers: Strict-Transport-Security on HTTPS responses.

The header is added when the request came over HTTPS: the node's own TLS listener (``http.tls``), or a
reverse proxy listed in ``http.forwarded_allow_ips`` that says so with ``X-Forwarded-Proto: https`` (uvicorn
then reports the request's scheme as https). Over plain HTTP it is never sent (RFC 6797 section 7.2: a
browser ignores it there, and it would wrongly promise HTTPS). Session cookies get ``Secure`` under the same
condition (``dicomnode.web.pages``), so the browser never sends them over plain HTTP.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HstsMiddleware"]


class HstsMiddleware:
    """Pure ASGI middleware adding ``Strict-Transport-Security: max-age=N`` to HTTPS responses.

    Parameters
    ----------
    app
        The wrapped ASGI app.
    max_age_s
        The max-age, seconds (``http.hsts_seconds``); 0 sends nothing.
    """

    def __init__(self, app: Any, max_age_s: int) -> None:
        self.app = app
        self.value = f"max-age={int(max_age_s)}".encode("latin-1")
        self.enabled = max_age_s > 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self.enabled or scope.get("type") != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message.get("type") == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"strict-transport-security"
                ]
                headers.append((b"strict-transport-security", self.value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
