"""Clients that stall or vanish mid-upload, or hold connections open, over real sockets
to `python -m app`: a stalled camera uplink or a slowloris must not hold the service's
request slots or take its probes down, and a client that hangs up is nobody's fault on
the server's side."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import PRODUCTION, RunningServer, ready_server
from tests.helpers import noise_jpeg

pytestmark = pytest.mark.e2e

READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def strict_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("strict-server") / "server.log"
    env = {
        "CLIP_MODEL": f"local-dir:{tiny_model_dir}",
        "CLIP_DEVICE": "cpu",
        "CLIP_BACKEND": "torch",
        "CLIP_REQUEST_TIMEOUT_S": str(READ_TIMEOUT_S),
        "CLIP_MAX_CONCURRENT_REQUESTS": "2",
    }
    with ready_server(env, log, PRODUCTION) as running:
        yield running


def start_partial_upload(url: str, declared: int = 1000) -> socket.socket:
    """A POST whose headers promise `declared` body bytes and whose body stops after a few."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + b'{"image": "'
    )
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, object], bool]:
    """Status, JSON body, and whether the server closed the connection after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    closed = sock.recv(1) == b""
    return int(lines[0].split()[1]), json.loads(body[:length]), closed


def test_stalled_uploads_get_408_and_free_their_slots(strict_server: RunningServer) -> None:
    stalled = [start_partial_upload(strict_server.url) for _ in range(2)]
    started = time.monotonic()
    try:
        answers = [read_response(sock) for sock in stalled]
        waited = time.monotonic() - started
    finally:
        for sock in stalled:
            sock.close()
    for status, body, closed in answers:
        assert status == 408
        error = body["error"]
        assert isinstance(error, dict)
        assert error["code"] == "request_timeout"
        assert "CLIP_REQUEST_TIMEOUT_S" in error["message"]
        assert closed  # the connection is not left to the stalled client
    assert waited < READ_TIMEOUT_S + 5
    # Both slots (CLIP_MAX_CONCURRENT_REQUESTS=2) are free again.
    after = httpx.post(
        f"{strict_server.url}/embed", files={"image": ("c.jpg", noise_jpeg(3))}, timeout=30
    )
    assert after.status_code == 200, after.text


def test_a_client_hanging_up_mid_upload_is_a_499_not_a_fault(
    strict_server: RunningServer,
) -> None:
    sock = start_partial_upload(strict_server.url)
    time.sleep(0.2)
    sock.close()
    time.sleep(0.5)
    metrics = httpx.get(f"{strict_server.url}/metrics", timeout=10).text
    log = strict_server.log.read_text()
    assert 'status="500"' not in metrics
    assert 'reason="internal_error"' not in metrics
    assert 'status="499"' in metrics
    assert "Traceback" not in log
    assert '"level": "error"' not in log


def test_idle_and_half_open_connections_leave_probes_and_work_answered(
    strict_server: RunningServer,
) -> None:
    """Far more connections than the request limit (2) allows requests: idle ones and
    ones whose headers never finish. /health and a POST are still answered, in JSON,
    and the half-open ones are closed with a 408 past the header deadline."""
    host, port = strict_server.url.removeprefix("http://").split(":")
    half_open, idle = [], []
    try:
        for _ in range(100):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow")
            half_open.append(sock)
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        health = httpx.get(f"{strict_server.url}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        crop = {"image": ("c.jpg", noise_jpeg(4))}
        assert httpx.post(f"{strict_server.url}/embed", files=crop, timeout=30).status_code == 200
        started = time.monotonic()
        status, body, closed = read_response(half_open[0])
        assert time.monotonic() - started < READ_TIMEOUT_S + 5
        assert status == 408
        assert body["error"]["code"] == "request_timeout"  # type: ignore[index]
        assert closed
        for sock in idle[:3]:  # silent from the start: closed too, at the same deadline
            assert read_response(sock)[0] == 408
        metrics = httpx.get(f"{strict_server.url}/metrics", timeout=10).text
        assert 'clip_requests_total{endpoint="other",status="408"}' in metrics
        assert 'clip_rejections_total{reason="request_timeout"}' in metrics
    finally:
        for sock in half_open + idle:
            sock.close()


def refused_as_invalid_http(url: str, request: bytes) -> str:
    """`request`, sent as it stands, gets the JSON 400 invalid_http and a closed
    connection; returns the error's message."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        status, body, closed = read_response(sock)
    assert status == 400
    assert body["error"]["code"] == "invalid_http"  # type: ignore[index]
    assert closed
    return str(body["error"]["message"])  # type: ignore[index]


def test_bytes_that_are_not_http_get_a_json_400(strict_server: RunningServer) -> None:
    message = refused_as_invalid_http(
        strict_server.url, b"POST /embed HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n"
    )
    assert "not valid HTTP/1.1" in message
    metrics = httpx.get(f"{strict_server.url}/metrics", timeout=10).text
    assert 'clip_rejections_total{reason="invalid_http"}' in metrics
    assert 'clip_requests_total{endpoint="other",status="400"}' in metrics


@pytest.mark.parametrize("method", [b"FOO", b"get", b"BREW"])
def test_an_unknown_method_is_named_in_its_400(strict_server: RunningServer, method: bytes) -> None:
    """uvicorn's parser said only "invalid HTTP"; a lowercase method is the likeliest
    mistake, methods being case-sensitive."""
    message = refused_as_invalid_http(
        strict_server.url, method + b" /health HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert message.startswith(f"{method.decode()} is not an HTTP method")
    assert "GET, HEAD and POST" in message


def test_a_tls_handshake_is_told_the_port_speaks_plain_http(
    strict_server: RunningServer,
) -> None:
    """A client configured with https:// for this port: Python's own TLS client's first
    bytes, answered in plain HTTP with what to change."""
    import ssl

    hello = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    message = refused_as_invalid_http(strict_server.url, hello.read())
    assert "TLS handshake" in message
    assert "http://" in message


@pytest.mark.parametrize(
    ("head", "fault"),
    [
        (b"GET /health HTTP/1.1\r\n\r\n", "has none"),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than once"),
        (b"GET /health HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", "more than once"),
    ],
    ids=["HTTP/1.1 without Host", "two Hosts", "two Hosts in HTTP/1.0"],
)
def test_a_request_without_one_host_header_is_a_400_naming_it(
    strict_server: RunningServer, head: bytes, fault: str
) -> None:
    """RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host, and to
    any with more than one; they used to be served."""
    message = refused_as_invalid_http(strict_server.url, head)
    assert fault in message
    assert "send one Host header" in message


def test_an_http_1_0_request_needs_no_host(strict_server: RunningServer) -> None:
    host, port = strict_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        status, body, _ = read_response(sock)
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize("codings", [b"gzip", b"identity", b"deflate, br"])
def test_a_transfer_encoding_not_ending_in_chunked_is_named(
    strict_server: RunningServer, codings: bytes
) -> None:
    """RFC 9112 makes these a 400 and a closed connection (the body's length is unknown);
    the message says the header is what to change."""
    message = refused_as_invalid_http(
        strict_server.url,
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: " + codings + b"\r\n\r\n{}",
    )
    assert f"Transfer-Encoding {codings.decode()} does not end in chunked" in message
    assert "Content-Length" in message


@pytest.mark.parametrize("codings", [b"chunked, gzip", b"gzip, chunked, chunked"])
def test_chunked_not_once_and_last_is_named(strict_server: RunningServer, codings: bytes) -> None:
    """Refused inside the parser's reading of the header, before the protocol sees it:
    the message cannot quote the value, but says what the header must be."""
    message = refused_as_invalid_http(
        strict_server.url,
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: " + codings + b"\r\n\r\n{}",
    )
    assert message.startswith("Transfer-Encoding must name chunked once, as its last coding")


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: gzip\r\n",
    ],
)
def test_a_body_framed_both_ways_is_refused_naming_both_headers(
    strict_server: RunningServer, framing: bytes
) -> None:
    """The shape requests are smuggled past a proxy with: refused whole, whichever
    header comes first, and an honest client is told which two disagree."""
    message = refused_as_invalid_http(
        strict_server.url, b"POST /embed HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n0\r\n\r\n"
    )
    assert message.startswith("Content-Length and Transfer-Encoding were both sent")


@pytest.mark.parametrize(
    ("length", "fault"),
    [
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", "Content-Length was sent more than once"),
        (b"Content-Length: -1\r\n", "Content-Length is not a whole number of bytes"),
        (b"Content-Length: 5 5\r\n", "Content-Length is not a whole number of bytes"),
        (b"Content-Length: 1" + b"0" * 25 + b"\r\n", "Content-Length is too large to be a length"),
        (b"Content-Length:\r\n", "Content-Length is empty"),
    ],
)
def test_a_content_length_that_is_no_length_is_named(
    strict_server: RunningServer, length: bytes, fault: str
) -> None:
    """Each was "not valid HTTP/1.1 (its request line, headers or chunked framing)":
    right, but not what to change."""
    message = refused_as_invalid_http(
        strict_server.url,
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + length
        + b"\r\n{}",
    )
    assert message.startswith(f"{fault}, so the body's length is unknown")


def counters(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in lines)
        if name.startswith(("clip_requests_total{", "clip_rejections_total{"))
    }


def test_a_body_with_broken_chunk_framing_is_one_400_under_its_endpoint(
    strict_server: RunningServer,
) -> None:
    """The parser fails while the app reads the body: the app must not take the closed
    connection for a client that hung up (499)."""
    before = counters(strict_server.url)
    refused_as_invalid_http(
        strict_server.url,
        b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"ima\r\nZZ\r\nabc\r\n0\r\n\r\n',
    )
    time.sleep(0.3)
    after = counters(strict_server.url)
    changed = {
        k: after[k] - before.get(k, 0.0)
        for k in after
        if after[k] != before.get(k) and "/metrics" not in k  # the reading itself
    }
    assert changed == {
        'clip_requests_total{endpoint="/embed",status="400"}': 1.0,
        'clip_rejections_total{reason="invalid_http"}': 1.0,
    }


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def send_until_refused(sock: socket.socket, chunk: bytes, limit: int) -> int:
    """Bytes sent before the peer closed the connection (or `limit`, if it never did)."""
    sent = 0
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_headers_past_64_kib_get_431_and_are_not_held(strict_server: RunningServer) -> None:
    """httptools holds a header's bytes until the header ends: one endless header was
    taken whole (64 MB), and eight at once held the event loop for seconds."""
    host, port = strict_server.url.removeprefix("http://").split(":")
    before = resident_mb(strict_server.process.pid)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        sent = send_until_refused(sock, b"a" * 65536, limit=32 * 1024 * 1024)
        assert sent < 8 * 1024 * 1024  # the server closed the connection long before
    assert resident_mb(strict_server.process.pid) - before < 50
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
        status, body, closed = read_response(sock)
    assert status == 431
    assert body["error"]["code"] == "headers_too_large"  # type: ignore[index]
    assert closed


def test_large_headers_under_the_limit_and_large_bodies_pass(
    strict_server: RunningServer,
) -> None:
    """Only the head counts: 60 KiB of headers sent in the same write as the body, and a
    body far over 64 KiB, are an ordinary request."""
    request = httpx.Request(
        "POST",
        f"{strict_server.url}/embed",
        files={"image": ("p.jpg", noise_jpeg(3, (1200, 2400)))},
        headers={"X-Pad": "a" * 60_000},
    )
    body = request.read()
    assert len(body) > 100_000
    host, port = strict_server.url.removeprefix("http://").split(":")
    head = f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
    head += b"".join(
        f"{k}: {v}\r\n".encode()
        for k, v in request.headers.items()
        if k.lower() in ("content-type", "x-pad")
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"\r\n" + body)
        status, answer, _ = read_response(sock)
    assert status == 200, answer


def answers_of(url: str, *writes: bytes) -> list[tuple[int, dict[str, object]]]:
    """The answers on one connection to `writes`, sent in that many writes, each after
    a pause, read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for number, data in enumerate(writes):
            if number:
                time.sleep(0.1)
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append((int(head.split()[1]), json.loads(rest[:length])))
        received = rest[length:]
    return answers


@pytest.mark.parametrize(
    "refused",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
        b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        # Read with the first in one chunk: not a 501 that names the first one's POST.
        b"FOO /health HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["oversized head", "bad chunk framing", "unknown method"],
)
def test_a_request_pipelined_ahead_of_a_refused_one_keeps_its_answer(
    strict_server: RunningServer, refused: bytes
) -> None:
    """Both in one write: the first is answered, then the refusal, then the close."""
    first = httpx.Request(
        "POST", f"{strict_server.url}/embed", files={"image": ("p.jpg", noise_jpeg(8))}
    )
    body = first.read()
    head = (
        f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: {first.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answers = answers_of(strict_server.url, head + body + refused)
    assert [status for status, _ in answers] == [200, 431 if b"X-Pad" in refused else 400]
    error: dict[str, str] = answers[1][1]["error"]  # type: ignore[assignment]
    assert error["code"] == ("headers_too_large" if b"X-Pad" in refused else "invalid_http")
    assert "POST is not" not in error["message"]


@pytest.mark.parametrize(
    "refused",
    [
        b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["unknown method", "bad chunk framing"],
)
def test_every_request_pipelined_ahead_of_a_refused_one_is_answered(
    strict_server: RunningServer, refused: bytes
) -> None:
    """Two requests queued ahead of refused bytes, in one write: both answered, in order,
    then the refusal (the queued one used to be dropped unanswered)."""
    probes = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /info HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = answers_of(strict_server.url, probes + refused)
    assert [status for status, _ in answers] == [200, 200, 400]
    assert answers[0][1] == {"status": "ok"}
    assert "dim" in answers[1][1]
    assert answers[2][1]["error"]["code"] == "invalid_http"  # type: ignore[index]


def test_a_method_split_across_reads_is_named_whole_or_not_at_all(
    strict_server: RunningServer,
) -> None:
    """`M` at the end of one read and `XYZ` in the next is the method MXYZ, never XYZ;
    a method begun at the start of a read is named whole however it arrives."""
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = answers_of(strict_server.url, health + b"M", b"XYZ /x HTTP/1.1\r\n\r\n")
    assert [status for status, _ in answers] == [200, 400]
    assert not str(answers[1][1]["error"]["message"]).startswith("XYZ")  # type: ignore[index]
    answers = answers_of(strict_server.url, b"G", b"XT /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert str(answers[0][1]["error"]["message"]).startswith("GXT is not")  # type: ignore[index]


def test_a_missing_file_of_the_offline_docs_is_a_404_that_says_what_to_read(
    strict_server: RunningServer,
) -> None:
    missing = httpx.get(f"{strict_server.url}/static-offline-docs/nope.css", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == (
        "nothing at /static-offline-docs/nope.css; /docs lists the endpoints"
    )
