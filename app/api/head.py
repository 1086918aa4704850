"""HEAD wherever GET is served (RFC 9110 9.3.2): monitors and load balancers probe
with it. FastAPI routes answer only the methods they declare, so /health, /ready, /info
and /metrics answered HEAD with 405; here a HEAD runs as the GET it stands for and its
body is dropped, headers (Content-Length included) kept. POST-only paths still answer
405, naming the methods they take."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
