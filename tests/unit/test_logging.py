"""The service's log stream is JSON lines, whoever writes to it."""

from __future__ import annotations

import json
import subprocess
import sys

# As the service starts: torch imported (it installs plain-text handlers of its own),
# then the service's logging; then a library logs through torch's logger and warns.
SCRIPT = """
import logging, warnings
import torch
from app.observability import configure_logging
configure_logging()
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using X")
logging.getLogger("torch.utils.cpp_extension").warning("a compiler warning")
warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
"""


def test_library_warnings_and_torch_logs_are_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    records = [json.loads(line) for line in result.stderr.strip().splitlines()]  # all JSON
    assert [(r["logger"], r["level"]) for r in records] == [
        ("torch.utils.cpp_extension", "warning"),
        ("py.warnings", "warning"),
    ]
    # The CUDA notice torch writes on every CPU host (int8's conversion imports its
    # extension builder) is dropped: an operator took it for a fault.
    assert records[0]["message"] == "a compiler warning"
    assert "a library's FutureWarning" in records[1]["message"]


# A multipart body with a broken boundary, as a client with a bug sends it.
MULTIPART_SCRIPT = """
from python_multipart.multipart import MultipartParser
from app.observability import configure_logging
configure_logging()
parser = MultipartParser(b"boundary", callbacks={})
try:
    parser.write(b"--bXundary\\r\\nContent-Disposition: form-data; name=a\\r\\n\\r\\nx")
except Exception as exc:
    print("refused:", exc)
"""


def test_a_malformed_multipart_body_is_not_a_warning_in_the_log() -> None:
    """python_multipart logged a WARNING line for each such body: a client's mistake,
    already answered (400) and logged once at INFO, filled the log at WARNING."""
    result = subprocess.run(
        [sys.executable, "-c", MULTIPART_SCRIPT],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "refused: Expected boundary character" in result.stdout, result.stderr
    assert "python_multipart" not in result.stderr, result.stderr


LEVEL_SCRIPT = """
import logging, sys
from app.observability import configure_logging, set_log_level
configure_logging()
set_log_level(sys.argv[1])
logging.getLogger("app.access").info("request")
logging.getLogger("app.api.errors").info("request refused: invalid_image: ...")
logging.getLogger("app.lifecycle").info("ready: ...")
logging.getLogger("app.api.errors").warning("request refused: overloaded: ...")
logging.getLogger("uvicorn.error").info("Started server process")
logging.getLogger("app.inference.batcher").debug("embed: pass 0, 1 item(s)")
logging.getLogger("app").error("request failed: ...")
"""


def logged_at(level: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", LEVEL_SCRIPT, level],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line)["message"] for line in result.stderr.strip().splitlines()]


def test_clip_log_level_quiets_requests_but_keeps_the_lifecycle_down_to_warning() -> None:
    """At warning an operator still reads that the service is ready (and whether callers
    need a key); at error, only failures."""
    everything = [
        "request", "request refused: invalid_image: ...", "ready: ...",
        "request refused: overloaded: ...", "request failed: ...",
    ]  # fmt: skip
    assert logged_at("info") == everything
    assert logged_at("debug") == [*everything[:4], "embed: pass 0, 1 item(s)", everything[4]]
    assert logged_at("WARNING") == ["ready: ...", *everything[3:]]
    assert logged_at("error") == ["request failed: ..."]


CONTEXT_SCRIPT = """
import logging
from app.observability import configure_logging, request_id_var
configure_logging()
request_id_var.set("req-1")  # as when a signal interrupts the loop inside a request's task
logging.getLogger("app.lifecycle").info("SIGTERM: draining")
logging.getLogger("app.api.errors").info("request refused: ...")
"""


def test_lifecycle_lines_take_no_request_id_from_the_context_they_interrupt() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CONTEXT_SCRIPT],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    records = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert [(r["message"], r.get("request_id")) for r in records] == [
        ("SIGTERM: draining", None),
        ("request refused: ...", "req-1"),
    ]
