"""The per-call socket deadline of the sync client, without a network."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpcore
import httpx
import pytest

from app import call_deadline
from app.call_deadline import DeadlineBackend


class _RecordingStream(httpcore.NetworkStream):
    def __init__(self, timeouts: list[float | None]) -> None:
        self.timeouts = timeouts

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.timeouts.append(timeout)
        return b""

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.timeouts.append(timeout)

    def close(self) -> None:
        pass

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:  # fmt: skip
        self.timeouts.append(timeout)
        return self


class _RecordingBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None,
                    ) -> httpcore.NetworkStream:  # fmt: skip
        self.timeouts.append(timeout)
        return _RecordingStream(self.timeouts)


def test_every_socket_operation_waits_at_most_until_the_deadline() -> None:
    recorded = _RecordingBackend()
    backend = DeadlineBackend(recorded)
    with call_deadline.deadline(time.monotonic() + 2.0):
        stream = backend.connect_tcp("svc", 80, timeout=60.0)
        stream = stream.start_tls(None, "svc", timeout=60.0)  # type: ignore[arg-type]
        stream.write(b"GET / HTTP/1.1\r\n\r\n", timeout=None)
        stream.read(100, timeout=0.5)  # a shorter timeout of its own still holds
    *bounded, read = recorded.timeouts
    assert len(bounded) == 3  # connect, TLS, write
    assert all(t is not None and 1.9 < t <= 2.0 for t in bounded)
    assert read == 0.5


def test_an_operation_after_the_deadline_times_out_at_once() -> None:
    backend = DeadlineBackend(_RecordingBackend())
    stream = backend.connect_tcp("svc", 80)
    with call_deadline.deadline(time.monotonic() - 0.01):
        with pytest.raises(httpcore.ReadTimeout, match="the call's time ran out"):
            stream.read(100, timeout=30.0)
        with pytest.raises(httpcore.WriteTimeout):
            stream.write(b"x", timeout=30.0)
        with pytest.raises(httpcore.ConnectTimeout):
            backend.connect_tcp("svc", 80, timeout=30.0)


def test_without_a_deadline_or_in_another_thread_nothing_changes() -> None:
    recorded = _RecordingBackend()
    stream = DeadlineBackend(recorded).connect_tcp("svc", 80, timeout=7.0)
    seen_elsewhere: list[float | None] = []
    with call_deadline.deadline(time.monotonic() + 0.5):
        other = threading.Thread(target=lambda: seen_elsewhere.append(_read(stream, recorded)))
        other.start()
        other.join()
    stream.read(1, timeout=None)
    assert recorded.timeouts == [7.0, 30.0, None]
    assert seen_elsewhere == [30.0]


def _read(stream: httpcore.NetworkStream, recorded: _RecordingBackend) -> float | None:
    stream.read(1, timeout=30.0)
    return recorded.timeouts[-1]


def test_bind_reaches_the_default_transport_and_proxies_but_not_foreign_ones() -> None:
    with httpx.Client() as plain:
        assert call_deadline.bind(plain) == 1
        assert call_deadline.bind(plain) == 1  # once, not wrapped twice
        pool = plain._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool._network_backend, DeadlineBackend)
        assert not isinstance(pool._network_backend._backend, DeadlineBackend)
    mounts = {"http://": httpx.HTTPTransport(proxy="http://proxy:3128")}
    with httpx.Client(mounts=mounts) as proxied:
        assert call_deadline.bind(proxied) == 2
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    with httpx.Client(transport=mock) as foreign:
        assert call_deadline.bind(foreign) == 0
