"""Refuse work beyond CLIP_MAX_CONCURRENT_REQUESTS before reading a byte of its body.

Each request's body is buffered before its images can be counted, so the requests being
read at once bound the memory a flood can pin (each up to CLIP_MAX_UPLOAD_BYTES). Past
the bound a POST gets the contract's JSON 503 `overloaded` with Retry-After at once;
GETs (/health, /ready, /info, /metrics, /docs) are cheap and always pass, so probes
keep answering under any load. Pure ASGI, like the body-size limit.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.api.security import unauthorized_answer

logger = logging.getLogger(__name__)


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_requests:
            # A request without a valid key is told so, not to come back in a second:
            # retrying as Retry-After says could never succeed.
            unauthorized = unauthorized_answer(scope)
            if unauthorized is not None:
                await unauthorized(scope, receive, send)
                return
            metrics = getattr(scope["app"].state if "app" in scope else None, "metrics", None)
            if metrics is not None:
                metrics.rejections.labels("overloaded").inc()
            message = (
                f"{self.in_flight} requests are in progress, the most this service takes at "
                "once (CLIP_MAX_CONCURRENT_REQUESTS); retry shortly"
            )
            # At WARNING, as every 503 the service answers (app.api.errors).
            logger.warning("request refused: overloaded: %s", message)
            response = error_response(503, "overloaded", message, {"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
