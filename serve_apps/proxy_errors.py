"""ASGI middleware for Ray Serve's HTTP proxy: a request whose Ingress replica died while it held
the request gets a retryable 503 with ``Retry-After`` and a JSON body, not a plain-text 500.

Why: when the replica that runs the Ingress dies mid-request, the proxy gets a ``RayActorError``;
Serve (``ray.serve._private.http_util.get_http_response_status``) maps it to 500 and writes no
response at all, so uvicorn answers its own ``500 Internal Server Error`` (text/plain). Serve has
no setting for that status; it does run the Starlette middlewares returned by the function named
in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` around the proxy. Set on every Ray node (it is
read when the proxy actor starts):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_apps.proxy_errors:middlewares

Only a request that got *no* response is rewritten: every answer the application or the proxy
wrote itself (4xx, the Ingress's own 503s, backpressure 503s, 408 timeouts) passes unchanged.
"""

from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware

log = logging.getLogger("petl.serve.proxy")
RETRY_AFTER_S = 1
BODY = json.dumps({"detail": "the replica serving this request failed; retry the request"}).encode()


class NoResponseAs503:
    """Pure ASGI middleware (no body buffering): tracks whether the app started a response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # the proxy itself failed before answering: the same, retryable
            if started:
                raise
            log.warning("request to %s failed before any response", scope.get("path"), exc_info=True)
        if not started:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(BODY)).encode()),
                                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
            await send({"type": "http.response.body", "body": BODY})


def middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(NoResponseAs503)]
