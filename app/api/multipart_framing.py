"""What Starlette's multipart parser leaves to its caller: where the body starts and
whether it ended.

A wrapper around a request's `receive`, in front of `Request.form()`:
- the preamble (text before the first boundary, which RFC 2046 5.1.1 says to ignore) is
  dropped: python-multipart refuses a body that does not open with its boundary;
- whether the closing delimiter (`--boundary--`) arrived is noted: the parser accepts a
  body cut short, or one of mere garbage, as a form of the parts it finished, so a
  truncated upload would otherwise read as a missing field. Each chunk is scanned with
  its predecessor's tail, so a delimiter split across chunks is found too.
"""

from __future__ import annotations

from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.types import Message, Receive

# Past this much preamble the body is handed on as it stands: the parser's error.
_MAX_PREAMBLE_BYTES = 64 * 1024


class MultipartFraming:
    def __init__(self, receive: Receive, boundary: bytes) -> None:
        self._receive = receive
        self.boundary = boundary
        self._opening = b"--" + boundary
        self._closing = self._opening + b"--"
        self._head = b""  # held while looking for the first boundary
        self._opened = False
        self._tail = b""
        self.closed = False

    @classmethod
    def for_request(cls, request: Request) -> MultipartFraming | None:
        """None where the boundary is missing: the parser's own error says so."""
        _, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        return cls(request.receive, boundary) if boundary else None

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        body = message.get("body", b"")
        if not self._opened:
            self._head += body
            start = self._head.find(self._opening)
            more = message.get("more_body", False)
            if start < 0 and more and len(self._head) < _MAX_PREAMBLE_BYTES:
                return {**message, "body": b""}  # hold it until the boundary shows
            body = self._head[max(start, 0) :]
            self._head, self._opened = b"", True
            message = {**message, "body": body}
        if not self.closed:
            window = self._tail + body
            self.closed = self._closing in window
            self._tail = window[-(len(self._closing) - 1) :]
        return message
