"""Refuse request bodies over CLIP_MAX_UPLOAD_BYTES before they are buffered.

A pure ASGI middleware, so the limit holds for every route, for bodies with a
Content-Length (refused before a byte is read) and for chunked ones (refused as soon as
the running count passes the limit).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response


def too_large_message(size: int, limit: int, at_least: bool = False) -> str:
    amount = f"at least {size}" if at_least else str(size)
    return (
        f"request body is {amount} bytes, over the limit of {limit} (CLIP_MAX_UPLOAD_BYTES); "
        "send smaller crops or fewer per request"
    )


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413, "payload_too_large", too_large_message(int(declared), self.max_bytes)
            )
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # HTTPException passes through FastAPI's body parsing untouched and
                    # reaches the JSON error handler as a 413.
                    raise HTTPException(413, too_large_message(received, self.max_bytes, True))
            return message

        await self.app(scope, limited_receive, send)
