"""HTTP security headers: the standard set on every response, and Strict-Transport-Security on HTTPS.

:class:`SecurityHeadersMiddleware` adds to every HTTP response (pages, REST API, DICOMweb, health, metrics,
errors, and the refusals the authentication middleware writes itself):

* ``Content-Security-Policy``: scripts, styles, images and connections only from the node itself (the
  templates have no inline script or style), no plug-ins, no framing, forms post only to the node;
* ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY``,
  ``Cross-Origin-Opener-Policy: same-origin``;
* ``Cache-Control: no-store`` on everything but ``/static/`` (API answers, pages and log-in responses carry
  live state and patient-adjacent data), unless the handler chose a Cache-Control itself.

:class:`HstsMiddleware` adds ``Strict-Transport-Security`` when the request came over HTTPS: the node's own
TLS listener (``http.tls``), or a reverse proxy listed in ``http.forwarded_allow_ips`` that says so with
``X-Forwarded-Proto: https`` (uvicorn then reports the request's scheme as https). Over plain HTTP it is never
sent (RFC 6797 section 7.2: a browser ignores it there, and it would wrongly promise HTTPS). Session cookies
get ``Secure`` under the same condition (``dicomnode.web.pages``), so the browser never sends them over plain
HTTP.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONTENT_SECURITY_POLICY", "HstsMiddleware", "SecurityHeadersMiddleware"]

#: The policy of every response: nothing from another origin, nothing inline, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_FIXED: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode("latin-1")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
_FIXED_NAMES = frozenset(name for name, _ in _FIXED)
#: Paths whose responses may be cached (the stylesheet and script of the pages).
_CACHEABLE_PREFIXES = ("/static/",)


class SecurityHeadersMiddleware:
    """Pure ASGI middleware adding the standard security headers to every HTTP response.

    Parameters
    ----------
    app
        The wrapped ASGI app (the outermost layer, so that responses written by other middleware, such as
        the authentication refusals, get the headers too).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        cacheable = str(scope.get("path", "")).startswith(_CACHEABLE_PREFIXES)

        async def send_with_headers(message: Any) -> None:
            if message.get("type") == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _FIXED_NAMES]
                headers.extend(_FIXED)
                if not cacheable and not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


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
