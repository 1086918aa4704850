"""Limits on reading a request body: its size (CLIP_MAX_UPLOAD_BYTES), its time
(CLIP_REQUEST_TIMEOUT_S) and its codings (identity only; chunked framing alone), and a
client that hangs up half-way.

A pure ASGI middleware, so the limits hold for every route: a body with a Content-Length
over the size is refused before a byte is read, a chunked one as soon as the running
count passes it. A client that stops sending (a stalled camera uplink, or a slowloris)
would otherwise hold its admission slot, and the memory of what it sent, for as long as
its socket stays open: past the deadline it gets 408 and the connection is closed. One
that closes the connection mid-body is a 499 (nginx's "client closed request") in the
access log and metrics, not an unhandled error; unless the server's protocol closed it,
refusing body bytes that are not HTTP (app/api/transport.py), which is a 400.

Refusals raise Starlette's HTTPException: it passes through FastAPI's and Starlette's
body parsing untouched and reaches the JSON error handler.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response, shown
from app.api.media_types import DeclaredMediaTypes, media_type_of
from app.api.security import unauthorized_answer
from app.errors import InvalidRequest

CLIENT_CLOSED_REQUEST = 499
# Where the server's protocol notes, in the request's scope state, that it refused the
# rest of the body itself (bytes that are not HTTP) and closed the connection: the app
# then sees a disconnect, which is not the client's doing.
REFUSED_BELOW_APP = "refused_below_app"


class CodedHTTPException(HTTPException):
    """An HTTPException that carries its error code (FastAPI lets HTTPExceptions through
    its body parsing; the JSON error handler reads `code`)."""

    def __init__(self, status_code: int, code: str, detail: str) -> None:
        super().__init__(status_code, detail)
        self.code = code


INVALID_HTTP_MESSAGE = (
    "the request is not valid HTTP/1.1 (its request line, headers or chunked framing); "
    "send it with an HTTP client library"
)


def too_large_message(size: int, limit: int, at_least: bool = False, path: str = "") -> str:
    amount = f"at least {size}" if at_least else str(size)
    fix = (
        'send fewer gallery embeddings per request, or float16 ones ("dtype": "float16")'
        if path == "/similarity"
        else "send smaller crops or fewer per request"
    )
    return (
        f"request body is {amount} bytes, over the limit of {limit} (CLIP_MAX_UPLOAD_BYTES); {fix}"
    )


def transfer_codings(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """A request's Transfer-Encoding codings in order, lower case, from lower-case header
    names (ASGI's and the HTTP parser's)."""
    return [
        coding.strip().lower()
        for name, value in headers
        if name == b"transfer-encoding"
        for coding in value.split(b",")
        if coding.strip()
    ]


async def _refuse(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a refusal made from the headers alone; a POST without a valid key gets its
    401 instead, as the routes would have answered it."""
    if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
        response = unauthorized_answer(scope) or response
    await response(scope, receive, send)


def _has_endpoint(scope: Scope) -> bool:
    """Whether a route takes the request's method at its path. A body sent to none gets
    the 404 or 405 that says so whatever its size (the router answers those without
    reading the body): a 413 would have the client shrink an upload that was never
    going anywhere."""
    app = scope.get("app")
    router = getattr(app, "router", None)
    if router is None:
        return True
    return any(route.matches(scope)[0] == Match.FULL for route in router.routes)


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        read_timeout_s: float,
        media_types: DeclaredMediaTypes | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.media_types = media_types or {}

    def _media_type_refusal(self, scope: Scope) -> Response | None:
        """The route's answer to this request's body type, where the route declares the
        types it takes and this is not one of them (415), or two were sent (400); None
        otherwise."""
        declared = self.media_types.get((scope["method"], scope.get("path", "")))
        if declared is None:
            return None
        headers = scope["headers"]
        sent = [value.decode("latin-1") for name, value in headers if name == b"content-type"]
        try:
            wrong_type = declared.refusal(media_type_of(sent))
        except InvalidRequest as exc:  # as the route answers it
            return error_response(400, exc.code, exc.message)
        if wrong_type is None:
            return None
        return error_response(415, "unsupported_media_type", wrong_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        coding = headers.get(b"content-encoding", b"identity").strip().lower()
        if coding not in (b"identity", b""):
            # Read as it stands, a gzip body is "not valid JSON" or "invalid multipart",
            # which sends the client looking in the wrong place (RFC 7694: 415).
            response = error_response(
                415,
                "unsupported_media_type",
                f"Content-Encoding {shown(coding.decode('latin-1'), 32)} is not taken; send "
                "the body uncompressed (JPEG and PNG crops are compressed already)",
                {"Accept-Encoding": "identity"},
            )
            await _refuse(response, scope, receive, send)
            return
        unframed = [
            c for c in transfer_codings(scope["headers"]) if c not in (b"chunked", b"identity")
        ]
        if unframed:
            # The server removes the chunked framing only: a `gzip, chunked` body reached
            # the routes still compressed, and was read as if it were not.
            response = error_response(
                415,
                "unsupported_media_type",
                f"Transfer-Encoding {shown(b', '.join(unframed).decode('latin-1'), 32)} is not "
                "taken; send the body as it is (chunked alone is fine)",
            )
            await _refuse(response, scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes and _has_endpoint(scope):
            size_message = too_large_message(
                int(declared), self.max_bytes, path=scope.get("path", "")
            )
            answer = self._media_type_refusal(scope) or error_response(
                413, "payload_too_large", size_message
            )
            await _refuse(answer, scope, receive, send)
            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        received = 0
        body_complete = False

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                # After the body only the disconnect is left, which the routes await for
                # as long as their work takes: no deadline of ours.
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"{received} bytes of the request body arrived within "
                    f"{self.read_timeout_s:g} s (CLIP_REQUEST_TIMEOUT_S), and the rest did "
                    "not; send the whole body at once",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                if scope.get("state", {}).get(REFUSED_BELOW_APP) == "invalid_http":
                    raise CodedHTTPException(400, "invalid_http", INVALID_HTTP_MESSAGE)
                raise HTTPException(
                    CLIENT_CLOSED_REQUEST,
                    f"the client closed the connection after {received} bytes of the body",
                )
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(
                        413,
                        too_large_message(received, self.max_bytes, True, scope.get("path", "")),
                    )
                body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
