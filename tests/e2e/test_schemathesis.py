"""Schemathesis against the service's own OpenAPI schema, over real HTTP.

Every check schemathesis has runs (`--checks all`): no generated input may cause a
server error, every response must match the schema (status codes, content types, bodies,
headers), schema-violating input must be refused, unsupported methods answer 405 with
Allow. The exceptions are in schemathesis.toml, each with its reason. A second run with
API keys checks that no operation accepts a missing or wrong key.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import free_port, start_server

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")
# The one check left out, and why: schemathesis.toml.
EXCLUDED_CHECKS = "positive_data_acceptance"


def schemathesis(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert binary, "schemathesis is a dev dependency"
    command = [binary, "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "-n", "30",
               "--seed", "7", "--no-color"]  # fmt: skip
    return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600)


def served(tiny_model_dir: Path, tmp_path: Path, **env: str) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    settings = {"CLIP_MODEL": f"local-dir:{tiny_model_dir}", "CLIP_MAX_WAIT_MS": "1", **env}
    process = start_server(settings, port, tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return url, process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"server not ready:\n{(tmp_path / 'server.log').read_text()}")


def test_no_server_error_and_every_response_matches_the_schema(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url, process = served(tiny_model_dir, tmp_path)
    try:
        result = schemathesis(url, "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS)
    finally:
        process.kill()
        process.wait()
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout


def test_with_keys_no_operation_ignores_authentication(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url, process = served(tiny_model_dir, tmp_path, CLIP_API_KEYS="schemathesis-key")
    try:
        result = schemathesis(
            url,
            "--checks",
            "ignored_auth,not_a_server_error",
            "-H",
            "Authorization: Bearer schemathesis-key",
        )
    finally:
        process.kill()
        process.wait()
    assert result.returncode == 0, result.stdout[-4000:]
