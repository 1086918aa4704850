"""The port while the model loads: open, and saying why it cannot serve yet.

uvicorn runs the app's lifespan, where the model loads and warms up (seconds, or minutes
with a download or a cold conversion), before it listens. A probe meanwhile met a
refused connection, which nobody can tell from a crashed process, and a liveness probe
that fails through a long load restarts the pod that was about to be ready.
`python -m app` binds the port first and, until the lifespan is done, answers here,
below the app: `/health` 200 (the process is alive), a path the app has no endpoint at
the 404 the app will give it, `/ready` and every other request a JSON 503 `not_ready`
with Retry-After, each on a connection closed after its answer. Requests are read with
the parser the app's server uses (llhttp, through httptools), so bytes refused here are
the bytes the app will refuse, in the same words, and no request the app will take is
refused while it loads.
Then the listening socket itself passes to uvicorn, so the connections queued on it are
the app's: none is refused or reset at the hand-over.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
from starlette.datastructures import URL

from app.api.body_limit import INVALID_HTTP_MESSAGE
from app.api.transport import (
    HEADERS_TOO_LARGE,
    MAX_HEAD_BYTES,
    RefusalObserver,
    closing_response,
    error_body,
    head_size,
    headers_too_slow,
    host_refusal,
    invalid_http_message,
    json_body,
    unknown_method_refusal,
)
from app.observability import request_id_for

# How long what a client still sends after its answer (a body) is read and dropped
# before closing: closing with unread bytes makes the kernel reset the connection, and
# a reset can reach the client before it has read the answer.
_LINGER_S = 2.0
# And at most this much of it: an upload's body (as much as the app would take), or a
# little of what follows bytes refused as malformed, which a flood sends without end.
_LINGER_BYTES = 16 * 1024 * 1024
_LINGER_BYTES_AFTER_REFUSAL = 64 * 1024
RETRY_AFTER_S = 5
logger = logging.getLogger(__name__)
NOT_READY_MESSAGE = "the model is loading; retry once /ready answers 200"


class LoadingResponder(asyncio.Protocol):
    """One connection while the model loads: one answer, then close; or, if its request
    is still arriving when the model is ready, handed to the app's protocol."""

    def __init__(
        self,
        header_timeout_s: float,
        on_refusal: RefusalObserver | None,
        live: set[LoadingResponder] | None = None,
        on_health: Callable[[float], None] | None = None,
        missing_endpoint: Callable[[str, str], str | None] | None = None,
    ) -> None:
        self._header_timeout_s = header_timeout_s
        self._on_refusal = on_refusal
        self._on_health = on_health
        # A path no endpoint will ever take (a probe at /health/) gets its 404 at once:
        # a 503 would have it retried until the load ends, and then fail anyway.
        self._missing_endpoint = missing_endpoint
        self._live = live if live is not None else set()
        self._head = bytearray()  # every byte received, for the app's protocol at hand-over
        # The parser the app's server reads requests with: so a request is refused here
        # where, and as, the app will refuse it, and taken where the app takes it.
        self._read = _RequestHead()
        self._parser = httptools.HttpRequestParser(self._read)
        self._read.parser = self._parser
        self._request = ("-", "-")  # method and path, once the request line is read
        self._linger_budget = _LINGER_BYTES
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._first_byte_at = 0.0  # the request's duration is counted from it

    def hand_over(self, make_protocol: Callable[[], asyncio.Protocol]) -> bool:
        """Pass the connection, and what it has sent so far, to `make_protocol()`'s
        protocol; False where its answer was given already (it is closing)."""
        transport = self._transport
        if self._answered or transport is None or transport.is_closing():
            return False
        if self._timer is not None:
            self._timer.cancel()
        self._live.discard(self)
        self._transport = None
        protocol = make_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._head:
            protocol.data_received(bytes(self._head))
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._live.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._answered:  # the rest of an answered request: dropped, up to a point
            self._linger_budget -= len(data)
            if self._linger_budget < 0 and self._transport is not None:
                self._transport.close()
            return
        if not self._head:
            self._first_byte_at = time.monotonic()
        self._head += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade the app's server does not take: served as a plain request
        except httptools.HttpParserError as error:
            self._refuse(error)
            return
        if self._read.complete:
            self._answer_request()
        elif len(self._head) > MAX_HEAD_BYTES:
            self._answer(*HEADERS_TOO_LARGE)

    def eof_received(self) -> bool:
        return False  # the client is done sending: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        self._live.discard(self)

    def _refuse(self, error: httptools.HttpParserError) -> None:
        """Answer bytes the parser refused, as the app's protocol answers them."""
        refusal = None if self._read.complete else unknown_method_refusal(bytes(self._head[:64]))
        if refusal is None:
            message = invalid_http_message(self._read.headers, error)
            refusal = (b"400 Bad Request", "invalid_http", message)
        self._answer(*refusal)

    def _answer_request(self) -> None:
        method = self._read.method
        self._request = (method, _shown_target(self._read.url))
        if head_size(self._read.url, self._read.headers) > MAX_HEAD_BYTES:
            self._answer(*HEADERS_TOO_LARGE)
            return
        refusal = host_refusal(self._read.http_version, self._read.headers)
        if refusal is not None:
            self._answer(*refusal)
            return
        paths = _paths(self._read.url)
        if paths is None:  # a target the app's server refuses
            self._answer(b"400 Bad Request", "invalid_http", INVALID_HTTP_MESSAGE)
            return
        path, shown_path = paths
        head_only = method == "HEAD"
        if path == "/health" and method in ("GET", "HEAD"):
            if self._on_health is not None:
                self._on_health(time.monotonic() - self._first_byte_at)
            self._write(b"200 OK", json_body({"status": "ok"}), head_only=head_only)
            return
        missing = self._missing_endpoint(path, shown_path) if self._missing_endpoint else None
        if missing is not None:
            self._answer(b"404 Not Found", "not_found", missing, head_only=head_only)
            return
        unavailable = b"503 Service Unavailable"
        # The app has an endpoint there: counted under it, as the app counts its answers.
        self._answer(
            unavailable, "not_ready", NOT_READY_MESSAGE, head_only=head_only, endpoint=path
        )

    def _headers_too_slow(self) -> None:
        self._timer = None
        self._answer(*headers_too_slow(self._header_timeout_s))

    def _answer(
        self,
        status: bytes,
        code: str,
        message: str,
        *,
        head_only: bool = False,
        endpoint: str = "other",
    ) -> None:
        if self._on_refusal is not None:
            self._on_refusal(int(status.split()[0]), code, endpoint)
        if code not in ("not_ready", "not_found"):  # a refusal of the bytes themselves
            self._linger_budget = _LINGER_BYTES_AFTER_REFUSAL
            if self._request == ("-", "-"):
                self._request = _request_line(bytes(self._head[:1024]))
        extra = f"retry-after: {RETRY_AFTER_S}\r\n".encode() if code == "not_ready" else b""
        self._write(status, error_body(code, message), head_only=head_only, extra_headers=extra)

    def _write(
        self, status: bytes, body: bytes, *, head_only: bool = False, extra_headers: bytes = b""
    ) -> None:
        transport = self._transport
        if transport is None or self._answered:
            return
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
        peer = transport.get_extra_info("peername")
        method, path = self._request
        # The caller's id, or a new one, on the answer and its log line, as the app does:
        # a client that logs the id of each failure can find a 503 of the load too.
        request_id = request_id_for(self._read.headers if self._read.complete else [])
        # One line per request, as the app's access log writes once it serves.
        logger.info(
            "answered while the model loads",
            extra={
                "request_id": request_id,
                "method": method,
                "path": path,
                "status": int(status.split()[0]),
                "client": peer[0] if isinstance(peer, tuple) else "-",
            },
        )
        extra_headers += f"x-request-id: {request_id}\r\n".encode()
        transport.write(
            closing_response(status, body, extra_headers=extra_headers, head_only=head_only)
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER_S, transport.close)


class _RequestHead:
    """The parser's callbacks for one request's line and headers: what the app's server
    keeps of them (header names in lower case, values without trailing whitespace)."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.parser: httptools.HttpRequestParser | None = None
        self.method = ""
        self.http_version = ""

    # Only the first request is answered (then the connection closes): one pipelined
    # behind it in the same read must not add its URL and headers to the first's.
    def on_url(self, url: bytes) -> None:
        if not self.complete:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        if not self.complete and self.parser is not None:
            # Read now: once the parser has gone on to a pipelined request, it tells that
            # one's.
            self.method = self.parser.get_method().decode("ascii")
            self.http_version = self.parser.get_http_version()
        self.complete = True


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, path) of a refused request's head, as far as it can be read: for its
    log line."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) < 2:
        return ("-", "-")
    return (parts[0].decode("latin-1")[:16], _shown_target(parts[1]))


def _shown_target(target: bytes) -> str:
    """A request target's path, for a log line."""
    text = target.decode("latin-1")
    path = urlsplit(text).path if "://" in text else text.split("?", 1)[0]
    return path[:200]


def _paths(target: bytes) -> tuple[str, str] | None:
    """The request's path as the app's scope will hold it (decoded) and as its URL shows
    it, or None where the app's server refuses the request target (bytes outside
    printable ASCII, a target with no path)."""
    if any(byte < 0x21 or byte > 0x7E for byte in target):
        return None
    try:
        raw_path = httptools.parse_url(target).path
    except httptools.HttpParserInvalidURLError:
        return None
    if not raw_path:
        return None
    path = raw_path.decode("ascii")
    if "%" in path:
        path = unquote(path)
    scope = {"type": "http", "scheme": "http", "server": ("-", 80), "path": path,
             "query_string": b"", "headers": [], "root_path": ""}  # fmt: skip
    return path, URL(scope=scope).path


class LoadingPort:
    """The port's answers while the model loads, until `hand_over`."""

    def __init__(self, server: asyncio.AbstractServer, live: set[LoadingResponder]) -> None:
        self._server = server
        self._live = live

    def hand_over(self, make_protocol: Callable[[], asyncio.Protocol]) -> int:
        """Stop accepting (the listening socket stays open, its queue for the app's
        server), and pass every connection whose request is still arriving to the app's
        protocol: so no request gets a 503 once the model is ready. How many passed."""
        self._server.close()
        return sum(responder.hand_over(make_protocol) for responder in list(self._live))

    def close(self) -> None:
        """Stop accepting; what is connected gets its 503 (the startup failed)."""
        self._server.close()


async def answer_while_loading(
    listener: socket.socket,
    header_timeout_s: float,
    on_refusal: RefusalObserver | None = None,
    backlog: int = 2048,
    on_health: Callable[[float], None] | None = None,
    missing_endpoint: Callable[[str, str], str | None] | None = None,
) -> LoadingPort:
    """Serve LoadingResponder on a duplicate of `listener` until the port is handed over
    or closed; `listener` stays open and listening, its queue intact, for the app's
    server."""
    live: set[LoadingResponder] = set()

    def respond() -> LoadingResponder:
        return LoadingResponder(header_timeout_s, on_refusal, live, on_health, missing_endpoint)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(respond, sock=listener.dup(), backlog=backlog)
    return LoadingPort(server, live)
