"""What the port answers while the model loads (app.api.loading), over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from app.api.errors import install_error_handlers, missing_endpoint
from app.api.loading import answer_while_loading
from app.api.transport import header_deadline_protocol


def listening_socket() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.setblocking(False)
    return listener


@asynccontextmanager
async def loading_port(
    header_timeout_s: float = 5.0, app: FastAPI | None = None
) -> AsyncIterator[tuple[int, list[tuple[int, str]], socket.socket]]:
    """A port answered by the loading responder (for `app`, when given); what it
    counted as refusals."""
    listener = listening_socket()
    refusals: list[tuple[int, str]] = []
    server = await answer_while_loading(
        listener,
        header_timeout_s,
        lambda status, code, endpoint: refusals.append((status, code)),
        missing_endpoint=partial(missing_endpoint, app) if app is not None else None,
    )
    try:
        yield listener.getsockname()[1], refusals, listener
    finally:
        server.close()
        listener.close()


async def exchange(port: int, data: bytes, *, then: bytes = b"") -> bytes:
    """Send `data` (and `then`, after a pause) and read until the server closes: the
    answer must come with a close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if then:
            await asyncio.sleep(0.2)  # the answer is sent meanwhile
            writer.write(then)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, body


async def test_answers_below_the_app_are_written_as_the_app_writes_json() -> None:
    """Byte for byte: a client comparing bodies, or a cache keyed on them, sees one format."""
    async with loading_port() as (port, _, _):
        for path in (b"/health", b"/ready", b"/info\xc3\xa9"):  # 200, 503, a quoted path
            request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            _, headers, body = parse(await exchange(port, request))
            assert body == JSONResponse(json.loads(body)).body
            assert headers["content-length"] == str(len(body))


async def test_ready_and_work_get_a_json_503_that_says_the_model_is_loading() -> None:
    async with loading_port() as (port, refusals, _):
        for request in (
            b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /info?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x/ready HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            status, headers, body = parse(await exchange(port, request))
            assert status == 503
            assert headers["content-type"] == "application/json"
            assert headers["retry-after"] == "5"
            assert headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error["code"] == "not_ready"
            assert "/ready" in error["message"]
        assert refusals == [(503, "not_ready")] * 3


async def test_every_answer_while_loading_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.api.loading"):
        async with loading_port() as (port, _, _):
            await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await exchange(
                port, b"POST /embed?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            )
    lines = [(r.method, r.path, r.status, r.client) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [("GET", "/health", 200, "127.0.0.1"), ("POST", "/embed", 503, "127.0.0.1")]


async def test_health_is_200_while_loading_and_head_gets_headers_only() -> None:
    async with loading_port() as (port, refusals, _):
        status, headers, body = parse(
            await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, headers, body = parse(
            await exchange(port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        assert status == 200
        assert body == b""
        assert int(headers["content-length"]) > 0
        status, _, body = parse(await exchange(port, b"HEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 503
        assert body == b""
        assert refusals == [(503, "not_ready")]


async def test_an_upload_is_answered_whole_not_reset() -> None:
    """The body is read and dropped after the answer: closing with it unread would make
    the kernel reset the connection, and the client could lose the 503."""
    body = b"\xff" * (4 * 1024 * 1024)
    head = (
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    async with loading_port() as (port, _, _):
        for _ in range(3):
            # Most of the body arrives after the answer went out.
            answer = await exchange(port, head + body[:1024], then=body[1024:])
            status, _, answer = parse(answer)
            assert status == 503
            assert json.loads(answer)["error"]["code"] == "not_ready"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n", 400, "invalid_http"),
        (b"GET /ready HTTP/1.1\nHost: x\n\n", 400, "invalid_http"),
        (b"GET /ready HTTP/1.1\r\nX: " + b"a" * (70 * 1024), 431, "headers_too_large"),
    ],
    ids=["tls", "bare line feeds", "huge headers"],
)
async def test_bytes_that_are_not_a_request_get_a_json_4xx(
    data: bytes, status: int, code: str
) -> None:
    async with loading_port() as (port, refusals, _):
        answered, _, body = parse(await exchange(port, data))
        assert answered == status
        assert json.loads(body)["error"]["code"] == code
        assert refusals == [(status, code)]


async def test_headers_that_never_finish_get_408_and_the_connection_closes() -> None:
    async with loading_port(header_timeout_s=0.3) as (port, refusals, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
        started = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        assert asyncio.get_running_loop().time() - started < 5
        status, _, body = parse(answer)
        assert status == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert refusals == [(408, "request_timeout")]


async def test_the_listening_socket_outlives_the_responder_with_its_queue() -> None:
    """The hand-over: a connection made while the responder runs but not yet accepted
    stays queued on the socket, and the app's server answers it; nothing is reset."""
    listener = listening_socket()
    loop = asyncio.get_running_loop()
    loading = await answer_while_loading(listener, 5.0)
    # Stops accepting (nothing connected to pass on); the socket stays open, listening.
    assert loading.hand_over(asyncio.Protocol) == 0
    await asyncio.sleep(0.05)
    client = socket.create_connection(listener.getsockname(), timeout=10)  # queued
    client.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")

    async def app_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    app_server = await asyncio.start_server(app_answer, sock=listener)
    try:
        answer = await loop.run_in_executor(None, client.recv, 4096)
        assert answer.startswith(b"HTTP/1.1 200 OK")
    finally:
        client.close()
        app_server.close()


async def test_a_request_still_arriving_at_the_hand_over_goes_to_the_app() -> None:
    """A connection accepted while loading, whose head ends after the model is ready,
    is answered by the app's protocol with every byte it sent, not with a 503."""
    listener = listening_socket()
    port = listener.getsockname()[1]
    loading = await answer_while_loading(listener, 5.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n")  # the rest comes after the hand-over
    await writer.drain()
    await asyncio.sleep(0.1)
    received: list[bytes] = []

    class App(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            received.append(data)
            if b"".join(received).endswith(b"\r\n\r\n"):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # type: ignore[attr-defined]
                self.transport.close()

    assert loading.hand_over(App) == 1
    writer.write(b"X-Late: 1\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    listener.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"".join(received) == b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Late: 1\r\n\r\n"


async def test_answered_connections_are_not_handed_over() -> None:
    listener = listening_socket()
    loading = await answer_while_loading(listener, 5.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
    writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    status, _, _ = parse(await asyncio.wait_for(reader.read(), timeout=10))
    assert status == 503
    assert loading.hand_over(asyncio.Protocol) == 0
    writer.close()
    listener.close()


async def test_what_follows_a_refused_head_is_not_read_for_long() -> None:
    """A header flood while loading: after the 431 a client that keeps sending is cut
    off within a little more, not read for seconds."""
    async with loading_port() as (port, refusals, _):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ready HTTP/1.1\r\nX-Pad: ")
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), timeout=10)
                sent += 65536
        except (ConnectionResetError, BrokenPipeError):
            pass
        writer.close()
        assert sent < 4 * 1024 * 1024
        assert refusals == [(431, "headers_too_large")]


async def test_health_answers_while_loading_are_counted() -> None:
    """/health answered below the app is in the request count, as once the app serves:
    a dashboard of liveness probes otherwise began only when the model was ready; and
    /ready's 503 under /ready."""
    from fastapi import FastAPI

    from app.observability import Metrics
    from app.server import count_health, count_refusal

    app = FastAPI()
    app.state.metrics = Metrics.create()
    listener = listening_socket()
    server = await answer_while_loading(
        listener,
        5.0,
        on_refusal=lambda status, code, endpoint: count_refusal(app, status, code, endpoint),
        on_health=lambda seconds: count_health(app, seconds),
    )
    try:
        port = listener.getsockname()[1]
        for request in (
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            await exchange(port, request)
        await exchange(
            port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
        )  # a refusal: counted elsewhere
    finally:
        server.close()
        listener.close()
    counted = app.state.metrics.registry.get_sample_value(
        "clip_requests_total", {"endpoint": "/health", "status": "200"}
    )
    assert counted == 2
    # In the durations too, as the app's answers are.
    timed = app.state.metrics.registry.get_sample_value(
        "clip_request_duration_seconds_count", {"endpoint": "/health"}
    )
    assert timed == 2
    # /ready's 503 under /ready, where the app counts its answers (it was "other").
    not_ready = app.state.metrics.registry.get_sample_value(
        "clip_requests_total", {"endpoint": "/ready", "status": "503"}
    )
    assert not_ready == 1


async def test_answers_while_loading_carry_the_callers_request_id_or_a_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As the app's answers do: an id a client logs with a failure finds the 503 of the
    load in the server's log too."""
    async with loading_port() as (port, _, _):
        with caplog.at_level(logging.INFO, logger="app.api.loading"):
            sent = b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Request-ID: probe-7.a\r\n\r\n"
            status, headers, _ = parse(await exchange(port, sent))
            assert (status, headers["x-request-id"]) == (503, "probe-7.a")
            minted = []
            for unusable in (
                b"",
                b"X-Request-ID: a b\r\n",
                b"X-Request-ID: 1\r\nX-Request-ID: 2\r\n",
            ):
                health = b"GET /health HTTP/1.1\r\nHost: x\r\n" + unusable + b"\r\n"
                status, headers, _ = parse(await exchange(port, health))
                assert status == 200
                assert len(headers["x-request-id"]) == 32
                minted.append(headers["x-request-id"])
            # Bytes that are not HTTP have no headers to take an id from: a new one.
            status, headers, _ = parse(await exchange(port, b"\x16\x03\x01 TLS\r\n\r\n"))
            assert (status, len(headers["x-request-id"])) == (400, 32)
    assert len(set(minted)) == 3
    logged = [getattr(r, "request_id", None) for r in caplog.records]
    assert logged[:2] == ["probe-7.a", minted[0]]


@pytest.mark.parametrize("path", ["/health/", "/embed/", "/nowhere", "/emb%65d/"])
async def test_a_path_no_endpoint_takes_gets_the_apps_404_not_a_503(path: str) -> None:
    """A probe misconfigured at /health/ learns it at once, in the words the app will
    use once it serves, instead of retrying a 503 until the load ends."""
    app = FastAPI(redirect_slashes=False)  # as app.main builds it
    install_error_handlers(app)
    app.get("/health")(lambda: {"status": "ok"})
    app.post("/embed")(lambda: {})
    app.get("/ready")(lambda: {})
    after = TestClient(app).get(path)
    async with loading_port(app=app) as (port, refusals, _):
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        status, headers, body = parse(await exchange(port, request))
        assert (status, json.loads(body)) == (404, after.json())
        assert "retry-after" not in headers
        for routed in (b"/embed", b"/health?probe=1", b"/ready"):
            request = b"POST " + routed + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            assert parse(await exchange(port, request))[0] in (200, 503)
    assert refusals[0] == (404, "not_found")


async def test_an_unknown_method_or_a_tls_handshake_is_answered_as_the_app_will() -> None:
    """The same answers as app.api.transport gives once the model is ready; a TLS
    handshake at once, not after the header deadline (its head has no end)."""
    async with loading_port(header_timeout_s=30) as (port, refusals, _):
        status, _, body = parse(await exchange(port, b"get /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 400
        assert json.loads(body)["error"]["message"].startswith("get is not an HTTP method")
        answer = await asyncio.wait_for(exchange(port, b"\x16\x03\x01\x00\xa5\x01\x00"), 5)
        status, _, body = parse(answer)
        assert status == 400
        assert "TLS handshake" in json.loads(body)["error"]["message"]
    assert refusals == [(400, "invalid_http"), (400, "invalid_http")]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", 400),  # never ends a head: refused at once
        (b"\x80\x2e\x01\x03\x00", 400),  # an SSLv2-style hello
        (b"FOO /x HTTP/1.1\r\n", 400),  # the method is known bad before the head ends
        (b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # raw bytes: as the parser
        (b"GET /heal%74h HTTP/1.1\r\nHost: x\r\n\r\n", 200),  # /health, encoded
        (b"GET /health#frag HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ],
)
async def test_the_loading_port_reads_a_request_as_the_apps_parser_does(
    request_bytes: bytes, status: int
) -> None:
    async with loading_port(header_timeout_s=30) as (port, _, _):
        answer = await asyncio.wait_for(exchange(port, request_bytes), 5)
        assert parse(answer)[0] == status


@pytest.mark.parametrize(
    "path", ["/nowhere#frag", "/nowhere%3Fx", "/" + "a" * 5000, "/%41" * 100, "/a%5Cb", "/a%0d%0ab"]
)
async def test_a_404_while_loading_quotes_the_path_as_the_app_will(path: str) -> None:
    app = FastAPI(redirect_slashes=False)
    install_error_handlers(app)
    app.get("/health")(lambda: {"status": "ok"})
    after = TestClient(app).get(path)
    async with loading_port(app=app) as (port, _, _):
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        status, _, body = parse(await exchange(port, request))
    assert (status, json.loads(body)) == (404, after.json())


# Heads the app's server takes or refuses in ways a hand-written reader gets wrong.
POST_EMBED = b"POST /embed HTTP/1.1\r\nHost: x\r\n"
HEADS_READ_AS_THE_APP_READS_THEM = [
    b"GET  /health HTTP/1.1\r\nHost: x\r\n\r\n",  # two spaces: taken
    b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n",  # an empty line first: taken
    b"GET /health\r\n\r\n",  # HTTP/0.9's request line: taken
    b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.x\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n Folded: y\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    POST_EMBED + b"Transfer-Encoding: gzip\r\n\r\n",
    POST_EMBED + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nab",
    POST_EMBED + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    POST_EMBED + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    POST_EMBED + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    POST_EMBED + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    POST_EMBED + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n",
    b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://x/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health?x=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    b"get /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (64 * 1024) + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # no Host: refused (RFC 9112 3.2)
    b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",  # two: refused
    b"GET /health HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs none: taken
]


async def first_answer(port: int, data: bytes) -> tuple[int, bytes]:
    """The status and body of the first answer to `data`, closed after it or not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status, headers, _ = parse(head)
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return status, body
    finally:
        writer.close()


async def test_the_loading_port_takes_and_refuses_heads_as_the_apps_server_does() -> None:
    """Each head goes to the app's own server (uvicorn with app.api.transport's protocol)
    and to the loading port: a refusal of the bytes is the same answer word for word, and
    what the app's server takes the loading port takes too (200 /health, 404, or 503)."""
    app = FastAPI(redirect_slashes=False)
    install_error_handlers(app)
    app.get("/health")(lambda: {"status": "ok"})
    app.post("/embed")(lambda: {})
    listener = listening_socket()
    config = uvicorn.Config(app, http=header_deadline_protocol(5), lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        for _ in range(500):  # uvicorn has no event for it
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        async with loading_port(app=app) as (loading, _, _):
            for head in HEADS_READ_AS_THE_APP_READS_THEM:
                served = await first_answer(listener.getsockname()[1], head)
                while_loading = await first_answer(loading, head)
                if served[0] in (400, 404, 431):
                    assert while_loading == served, head
                else:
                    assert while_loading[0] in (200, 503), head
                    assert (while_loading[0] == 200) == (served == (200, b'{"status":"ok"}'))
    finally:
        server.should_exit = True
        await serving
        listener.close()


@pytest.mark.parametrize(
    ("pipelined", "status"),
    [
        (b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /ready HTTP/1.1\r\n\r\n", 200),
        (POST_EMBED + b"Content-Length: 0\r\n\r\nGET /health HTTP/1.0\r\n\r\n", 503),
    ],
    ids=["two /health", "then /ready without Host", "POST then GET"],
)
async def test_a_request_pipelined_while_loading_does_not_change_the_first(
    pipelined: bytes, status: int
) -> None:
    """The second request's URL and headers were added to the first's: two /health were
    "Host was sent more than once", /health then /ready "no endpoint at /health/ready"."""
    async with loading_port() as (port, _, _):
        answered, _, _ = parse(await exchange(port, pipelined))
    assert answered == status
