"""Connections, below the ASGI app: what `python -m app` gives uvicorn so that idle or
half-open sockets cannot take the service's probes down.

uvicorn times out a keep-alive connection only while it is silent, and never one whose
request line and headers are still arriving: a client (or a slowloris) that sends a
header byte every few seconds holds its connection for ever. And its connection limit
(`limit_concurrency`) counts every open connection, idle ones included, answering
/health itself with a plain-text 503 once it is reached. So here: a request's headers
must be complete within a deadline of their first byte (or of the connection, for one
that sends nothing), else a JSON 408 and the connection is closed; and the connection
limit is what the process's file descriptors allow, not a number close to the request
limit. Work is bounded by the service's own JSON 503 (CLIP_MAX_CONCURRENT_REQUESTS),
which GETs always pass. uvicorn's plain-text 400 for bytes that are not HTTP is JSON here
too, as every other error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import sys
from collections.abc import Callable

import httptools
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.body_limit import INVALID_HTTP_MESSAGE, REFUSED_BELOW_APP, transfer_codings
from app.api.errors import shown

logger = logging.getLogger(__name__)

# Descriptors kept for the process's own files (weights, caches, pipes, logs).
_RESERVED_DESCRIPTORS = 256
_MAX_DESCRIPTORS = 65536


# Told (status, code, endpoint) of each answer given below the app, for its metrics: the
# endpoint's path where the request named one (the loading port's 503s), else "other".
RefusalObserver = Callable[[int, str, str], None]

# Longest request line and headers taken (nginx's large_client_header_buffers are 32 KiB).
# httptools has no limit of its own: it holds a header's bytes until the header ends.
MAX_HEAD_BYTES = 64 * 1024
HEADERS_TOO_LARGE_MESSAGE = (
    f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB; "
    "send fewer or shorter headers"
)
HEADERS_TOO_LARGE = (
    b"431 Request Header Fields Too Large",
    "headers_too_large",
    HEADERS_TOO_LARGE_MESSAGE,
)


# RFC 9110's token: what a method may be made of.
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake, version 3.x
TLS_TO_PLAIN_HTTP = (
    b"400 Bad Request",
    "invalid_http",
    "a TLS handshake reached a port that speaks plain HTTP; use http://, or put a "
    "TLS-terminating proxy in front of the service",
)


def unknown_method_refusal(head: bytes) -> tuple[bytes, str, str] | None:
    """The answer to a request whose method the parser does not know, from the first
    bytes of its head: a 400 naming the method, or saying that a TLS handshake reached
    this plain-HTTP port. None where the head is neither, or its method has not ended
    yet. (RFC 9110 suggests a 501 for an unknown method; a client's mistake stays a 4xx
    here, as every other.)"""
    head = head.lstrip(b"\r\n")  # empty lines before a request line are ignored
    if head.startswith(TLS_HANDSHAKE):
        return TLS_TO_PLAIN_HTTP
    method, space, _ = head.partition(b" ")
    if not space or not _METHOD_TOKEN.fullmatch(method) or _parser_knows(method):
        return None
    return (
        b"400 Bad Request",
        "invalid_http",
        f"{method.decode('ascii')} is not an HTTP method this service knows (methods are "
        "case-sensitive); it takes GET, HEAD and POST (see /docs)",
    )


def _parser_knows(method: bytes) -> bool:
    parser = httptools.HttpRequestParser(object())
    try:
        parser.feed_data(method + b" / HTTP/1.1\r\n")
    except httptools.HttpParserInvalidMethodError:
        return False
    except httptools.HttpParserError:
        pass
    return True


def head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A request's line and headers, as MAX_HEAD_BYTES counts them once parsed."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def host_refusal(
    http_version: str, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes, str, str] | None:
    """The 400 RFC 9112 (3.2) requires for an HTTP/1.1 request without a Host header, or
    for any request with more than one: a proxy or a cache keys on it, so a request
    that has none or two is not one to guess about. None where Host is as it should be.
    `headers` as the parser read them, names in lower case."""
    hosts = sum(1 for name, _ in headers if name == b"host")
    if hosts > 1:
        fault = "Host was sent more than once"
    elif hosts == 0 and http_version == "1.1":
        fault = "an HTTP/1.1 request must carry a Host header, and this one has none"
    else:
        return None
    return (
        b"400 Bad Request",
        "invalid_http",
        f"{fault}; send one Host header naming the server (host:port), as HTTP clients do",
    )


def invalid_http_message(
    headers: list[tuple[bytes, bytes]], parse_error: BaseException | None
) -> str:
    """What a request the parser refused (with `parse_error`) is told to fix: its
    framing headers where they are the fault, else that it is not valid HTTP/1.1.
    `headers` as the parser read them, names in lower case."""
    return unframed_body_message(headers) or _framing_message(parse_error) or INVALID_HTTP_MESSAGE


def headers_too_slow(timeout_s: float) -> tuple[bytes, str, str]:
    """The refusal of a request whose line and headers took over `timeout_s`."""
    message = (
        f"the request line and headers did not arrive within {timeout_s:g} s; send them at once"
    )
    return (b"408 Request Timeout", "request_timeout", message)


class _RefusedHead(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers."""

    header_timeout_s: float = 10.0
    on_refusal: RefusalObserver | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._reading_head = True
        self._head_bytes = 0
        # The first bytes of the request being read (its method), where it began at the
        # start of a read; None where it began inside one, after an earlier request.
        self._head_start: bytes | None = b""
        self._between_requests = True
        self._begun_in_read = 0
        self._head_refusal: tuple[bytes, str, str] | None = None
        self._stopped_reading = False
        self._deferred_refusal: tuple[bytes, str, str] | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._stopped_reading:
            return  # past the refused bytes: the parser reads nothing more
        in_head = self._reading_head
        if in_head:
            self._head_bytes += len(data)
        if self._between_requests:
            self._head_start = data[:64]
        elif self._head_start is not None and len(self._head_start) < 64:
            self._head_start += data[: 64 - len(self._head_start)]
        self._begun_in_read = 0
        super().data_received(data)
        # Checked after parsing: a read that ends the headers also carries body bytes.
        if in_head and self._reading_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head(*HEADERS_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()
        # Only a request whose first byte began a read has its start in _head_start.
        if not self._between_requests or self._begun_in_read > 0:
            self._head_start = None
        self._between_requests = False
        self._begun_in_read += 1

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        self._reading_head = False
        self._head_bytes = 0
        # Exact, where data_received counted whole reads: the last one may carry body.
        if head_size(self.url, self.headers) > MAX_HEAD_BYTES:
            self._head_refusal = HEADERS_TOO_LARGE
        else:
            self._head_refusal = host_refusal(self.parser.get_http_version(), self.headers)
        if self._head_refusal is not None:
            # Stops the parser before the app sees the request; uvicorn then answers
            # through send_400_response, which gives this refusal instead.
            raise _RefusedHead
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True  # what follows is the next request's head
        self._between_requests = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.header_timeout_s, self._headers_too_slow
            )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self._refuse_head(*headers_too_slow(self.header_timeout_s))

    def _refuse_head(self, status: bytes, code: str, message: str) -> None:
        """Answer a request whose head will not be read, and close. Where an earlier
        request on this connection (pipelined) is still being answered, that answer
        goes out first: nothing more is read meanwhile, and the refusal follows it."""
        if self.transport.is_closing():
            return
        if self._requests_answered():
            self._answer_and_close(status, code, message)
        else:
            self._deferred_refusal = (status, code, message)
            self._stopped_reading = True
            self.transport.pause_reading()

    def _requests_answered(self) -> bool:
        """Every request read on this connection is answered: none queued (pipelined),
        and the last one read (`cycle`) has its whole response out."""
        return not self.pipeline and (self.cycle is None or self.cycle.response_complete)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, if any
        if self._stopped_reading and not self.transport.is_closing():
            self.transport.pause_reading()  # uvicorn resumed it for the next request
        if self._deferred_refusal is None or self.transport.is_closing():
            return
        if self._requests_answered():
            refusal, self._deferred_refusal = self._deferred_refusal, None
            self._answer_and_close(*refusal)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to bytes its parser refuses, in the service's JSON shape.
        refusal, self._head_refusal = self._head_refusal, None
        # Called from uvicorn's handler of the parser's error, which is still current.
        parse_error = sys.exc_info()[1]
        if refusal is None and self._head_start is not None and not self._reading_body():
            refusal = unknown_method_refusal(self._head_start)
        if refusal is not None:
            self._refuse_head(*refusal)
            return
        message = invalid_http_message(self.headers, parse_error)
        cycle = self.cycle
        if self.pipeline and cycle is not None and cycle.more_body:
            # The bad bytes are the body of a request queued behind others: in its
            # turn it gets this refusal as its answer, and the connection closes.
            self._stopped_reading = True
            queued, _ = self.pipeline[0]  # the last one read
            self.pipeline[0] = (queued, _refusal_app(400, "invalid_http", message, self.on_refusal))
            return
        if not self._reading_body():
            # The bad bytes are a later request's, behind those read before it: they
            # are answered first (queued ones included), then this refusal.
            self._refuse_head(b"400 Bad Request", "invalid_http", message)
            return
        assert cycle is not None
        reading_body = not cycle.response_complete
        if reading_body:
            # The app is reading this request's body and will see the connection close:
            # told why, it answers (to nobody) and counts the request under its endpoint.
            cycle.scope.setdefault("state", {})[REFUSED_BELOW_APP] = "invalid_http"
        self._answer_and_close(
            b"400 Bad Request", "invalid_http", message, counted=not reading_body
        )

    def abandon(
        self, status: bytes, code: str, message: str, *, retry_after_s: int | None = None
    ) -> bool:
        """At a forced exit: answer the request in flight with this refusal if its
        response has not begun (with its request id and Retry-After, as the app's own
        503s), and close the connection. Whether one was answered."""
        if self.transport.is_closing():
            return False
        cycle = self.cycle
        answered = cycle is not None and not cycle.response_started
        if cycle is not None and answered:
            request_id = cycle.scope.get("state", {}).get("request_id")
            extra = f"x-request-id: {request_id}\r\n" if request_id else ""
            if retry_after_s is not None:
                extra += f"retry-after: {retry_after_s}\r\n"
            body = error_body(code, message)
            self.transport.write(closing_response(status, body, extra_headers=extra.encode()))
        self.transport.close()
        return answered

    def _reading_body(self) -> bool:
        """Whether the bytes being parsed are the body of the last request read."""
        return not self.pipeline and self.cycle is not None and self.cycle.more_body

    def _answer_and_close(
        self, status: bytes, code: str, message: str, *, counted: bool = True
    ) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        logger.info("refused below the app: %s %s from %s", status.decode(), code, client)
        if counted and self.on_refusal is not None:
            self.on_refusal(int(status.split()[0]), code, "other")
        self.transport.write(closing_response(status, error_body(code, message)))
        self.transport.close()


def _refusal_app(
    status: int, code: str, message: str, on_refusal: RefusalObserver | None
) -> ASGI3Application:
    """An ASGI app that answers any request with this refusal and closes the connection:
    run in place of the app for a queued request whose bytes were refused."""

    async def refuse(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if on_refusal is not None:
            on_refusal(status, code, "other")
        body = error_body(code, message)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


def unframed_body_message(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What to fix when the parser refused a request whose Transfer-Encoding does not end
    in chunked (`gzip`, `identity`): its body's length is unknown, so
    RFC 9112 makes it a 400 and a closed connection, but "not valid HTTP" alone does
    not tell the sender that the header is what to change. None for other refusals."""
    codings = transfer_codings(headers)
    if not codings or codings[-1] == b"chunked" or any(n == b"content-length" for n, _ in headers):
        return None  # both framings at once: _framing_message says so
    named = b", ".join(codings).decode("latin-1")
    return (
        f"Transfer-Encoding {shown(named, 32)} does not end in chunked, so "
        "the body's length is unknown; send the body as it is, with Content-Length or "
        "Transfer-Encoding: chunked alone"
    )


# What llhttp says of a Transfer-Encoding it refuses while still reading the header,
# before the protocol sees it: chunked before another coding, or named twice.
_PARSER_BAD_TRANSFER_ENCODING = "Invalid `Transfer-Encoding` header value"
# And of a request framed both ways, whichever header came first.
_PARSER_BOTH_FRAMINGS = (
    "Transfer-Encoding can't be present with Content-Length",
    "Content-Length can't be present with Transfer-Encoding",
)


# llhttp's words for a Content-Length it cannot take, and what the sender should fix.
_PARSER_BAD_CONTENT_LENGTH = {
    "Duplicate Content-Length": "Content-Length was sent more than once",
    "Invalid character in Content-Length": "Content-Length is not a whole number of bytes",
    "Empty Content-Length": "Content-Length is empty",
    "Content-Length overflow": "Content-Length is too large to be a length",
}


def _framing_message(parse_error: BaseException | None) -> str | None:
    """What to fix where the parser refused how the body is framed; None for other
    refusals. A request framed both ways is refused whole (RFC 9112 6.3 allows a server
    to, and it is how requests are smuggled past a proxy), but its sender is told which
    two headers disagree."""
    if not isinstance(parse_error, httptools.HttpParserError):
        return None
    if str(parse_error) == _PARSER_BAD_TRANSFER_ENCODING:
        return (
            "Transfer-Encoding must name chunked once, as its last coding (`chunked, gzip` "
            "does not), or the body's length is unknown; send the body as it is, with "
            "Content-Length or Transfer-Encoding: chunked alone"
        )
    fault = _PARSER_BAD_CONTENT_LENGTH.get(str(parse_error))
    if fault is not None:
        return (
            f"{fault}, so the body's length is unknown; send one Content-Length header "
            "with the body's size in bytes (digits only), or Transfer-Encoding: chunked"
        )
    if str(parse_error) in _PARSER_BOTH_FRAMINGS:
        return (
            "Content-Length and Transfer-Encoding were both sent, so the body's length is "
            "ambiguous; send one of them: Content-Length, or Transfer-Encoding: chunked"
        )
    return None


def json_body(content: object) -> bytes:
    """JSON written below the app, byte for byte as the app's JSONResponse writes it."""
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def error_body(code: str, message: str) -> bytes:
    return json_body({"error": {"code": code, "message": message}})


def closing_response(
    status: bytes, body: bytes, *, extra_headers: bytes = b"", head_only: bool = False
) -> bytes:
    """A JSON answer written below the app, on a connection closed after it."""
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + extra_headers
        + b"\r\n"
        + (b"" if head_only else body)
    )


def header_deadline_protocol(
    timeout_s: float, on_refusal: RefusalObserver | None = None
) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this deadline, telling
    `on_refusal` of the answers it gives below the app."""
    attributes: dict[str, object] = {"header_timeout_s": timeout_s}
    if on_refusal is not None:
        attributes["on_refusal"] = staticmethod(on_refusal)
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), attributes)


def connection_limit() -> int:
    """Open connections uvicorn may hold: the descriptors this process may open (raised
    to the hard limit, at most 65536) less a reserve, so a flood of connections meets
    uvicorn's refusal before accept() fails for want of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MAX_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, _MAX_DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d: %s", soft, exc)
    usable = _MAX_DESCRIPTORS if soft == resource.RLIM_INFINITY else soft
    return max(64, usable - _RESERVED_DESCRIPTORS)
