"""The container's health probe: 0 only for a 200 on the path it is asked about."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from app.tools.healthcheck import main


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_healthy_when_the_path_answers_200(port: int) -> None:
    assert main(["/health", "--port", str(port)]) == 0


def test_unhealthy_when_the_path_answers_otherwise(
    port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["/ready", "--port", str(port)]) == 1
    assert "/ready did not answer 200" in capsys.readouterr().err


def test_unhealthy_when_nothing_listens(port: int) -> None:
    assert main(["/health", "--port", "1", "--timeout", "0.5"]) == 1
