"""The service as users run it: uvicorn in its own process, real sockets."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest
from starlette.types import Message

from app.client import ClipClient
from app.codec import decode_embedding
from app.config import Settings
from app.inference.weights import WeightsUnavailable
from app.main import create_app
from load_tests.concurrency import make_crops, memory_mb, run_load
from tests.helpers import noise_jpeg

pytestmark = pytest.mark.e2e


class RunningServer(NamedTuple):
    url: str
    process: subprocess.Popen[str]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UVICORN = ("-m", "uvicorn", "app.main:app")
PRODUCTION = ("-m", "app")  # uvicorn with the service's own connection handling


def start_server(
    env_overrides: dict[str, str], port: int, log: Path, entry: Sequence[str] = UVICORN
) -> subprocess.Popen[str]:
    """The server in its own process, its output in `log`: a pipe nobody reads would fill
    with access-log lines and block the server."""
    # The run's conversion cache (conftest) is kept; every other setting is the test's.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CLIP_") or k == "CLIP_CACHE_DIR"
    }
    env.update(env_overrides)
    return subprocess.Popen(
        [sys.executable, *entry, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


# Told each /ready poll's answer while a server starts (None: no connection).
StartupWatch = Callable[[httpx.Response | None], None]


@contextmanager
def ready_server(
    env_overrides: dict[str, str],
    log: Path,
    entry: Sequence[str] = UVICORN,
    watch: StartupWatch | None = None,
    poll_s: float = 0.2,
) -> Iterator[RunningServer]:
    """A server on a free port, once /ready answers 200 (the test fails if it never
    does); killed on leaving, if still running."""
    port = free_port()
    process = start_server(env_overrides, port, log, entry)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"server exited at startup:\n{log.read_text()}")
            try:
                ready: httpx.Response | None = httpx.get(f"{url}/ready", timeout=10)
            except httpx.TransportError:
                ready = None
            if ready is not None and ready.status_code == 200:
                break
            if watch is not None:
                watch(ready)
            time.sleep(poll_s)
        else:
            pytest.fail("server did not become ready in 120 s")
        yield RunningServer(url, process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        "CLIP_MODEL": f"local-dir:{tiny_model_dir}",
        "CLIP_DEVICE": "cpu",
        "CLIP_MAX_WAIT_MS": "20",
    }
    with ready_server(env, log) as running:
        yield running


def test_a_crop_is_embedded_over_real_http(server: RunningServer) -> None:
    url = server.url
    response = httpx.post(f"{url}/embed", files={"image": ("p.jpg", noise_jpeg(5), "image/jpeg")})
    assert response.status_code == 200, response.text
    vector = decode_embedding(response.json()["embedding"])
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
    assert httpx.get(f"{url}/docs").status_code == 200


def test_head_probes_are_answered_over_real_http(server: RunningServer) -> None:
    for path in ("/health", "/ready", "/info"):
        response = httpx.head(f"{server.url}{path}", timeout=10)
        assert response.status_code == 200, path
        assert response.content == b""
        assert int(response.headers["content-length"]) > 0


def test_concurrent_clients_are_all_answered(server: RunningServer) -> None:
    url = server.url

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/embed", files={"image": ("p.jpg", noise_jpeg(i))})
                    for i in range(24)
                )
            )
            return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * 24


@pytest.mark.parametrize("endpoint", ["embed", "batch", "analyze"])
def test_the_load_generator_drives_the_service(server: RunningServer, endpoint: str) -> None:
    url = server.url
    load = run_load(
        url, clients=2, seconds=1.0, crops=make_crops(4), endpoint=endpoint, batch_images=3
    )
    result = asyncio.run(load)
    assert result.endpoint == endpoint
    assert result.requests > 0
    assert result.errors == 0
    assert result.p50_ms <= result.p95_ms <= result.p99_ms
    if endpoint == "batch":  # three crops a request
        assert result.images_per_s == pytest.approx(3 * result.requests / result.seconds)


def test_memory_of_the_server_can_be_read(server: RunningServer) -> None:
    process = server.process
    resident, peak = memory_mb(process.pid)
    assert 50 < resident <= peak


def test_the_readme_client_example_runs(server: RunningServer, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Python client", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://localhost:8000", server.url))
    for index in (1, 2, 3):
        (tmp_path / f"crop_cam{index}.jpg").write_bytes(noise_jpeg(index))
    (tmp_path / "frame.jpg").write_bytes(noise_jpeg(4, size=(640, 480)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "'index': 0" in result.stdout
    assert "'type':" in result.stdout
    assert "[[412, 180, 530, 470]]" in result.stdout  # embed_frame's boxes as used


def test_sigterm_shuts_down_cleanly(server: RunningServer) -> None:
    url, process = server.url, server.process
    assert httpx.get(f"{url}/health").status_code == 200
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert (
        "Application shutdown complete" in server.log.read_text()
    )  # the lifespan drained the batcher
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is the
    # signal's own; anything else would mean a crash.
    assert process.returncode in (0, -signal.SIGTERM)


def test_python_m_app_drains_and_exits_0_on_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    log, port = tmp_path / "server.log", free_port()
    # The run's conversion cache (conftest) is kept; every other setting is the test's.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CLIP_") or k == "CLIP_CACHE_DIR"
    }
    env["CLIP_MODEL"] = f"local-dir:{tiny_model_dir}"
    command = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    assert httpx.post(f"{url}/embed", files={"image": ("p.jpg", noise_jpeg(1))}).status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("endpoint") == "/embed" and line.get("status") == 200 for line in lines)
    messages = [line["message"] for line in lines]
    assert any(m.startswith("SIGTERM: draining") for m in messages)
    assert messages[-1] == "stopped"  # the log says it stopped cleanly, not only the status


def test_clip_log_level_warning_leaves_out_access_lines_and_refusals_not_the_lifecycle(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    env = {"CLIP_MODEL": f"local-dir:{tiny_model_dir}", "CLIP_LOG_LEVEL": "WARNING"}
    with ready_server(env, log, PRODUCTION) as running:
        embedded = httpx.post(f"{running.url}/embed", files={"image": ("p.jpg", noise_jpeg(1))})
        assert embedded.status_code == 200
        refused = httpx.post(f"{running.url}/embed", files={"image": ("p.jpg", b"not a jpeg")})
        assert refused.status_code == 400
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    quiet = [line for line in lines if line["level"] in ("debug", "info")]
    # What is left of info: the lifecycle, which says the service is ready and open to all.
    assert {line["logger"] for line in quiet} == {"app.lifecycle"}
    messages = [line["message"] for line in quiet]
    assert any(m.startswith("ready: ") and "API keys: none" in m for m in messages)
    assert messages[-1] == "stopped"


def test_a_second_signal_answers_requests_in_flight_with_a_json_503_and_exits_at_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An operator who will not wait: uvicorn's forced exit cancelled the requests in
    flight (a plain-text 500 each and a 70-line traceback) and the process exited 0."""
    env = {"CLIP_MODEL": f"local-dir:{tiny_model_dir}", "CLIP_DEVICE": "cpu"}
    log = tmp_path / "server.log"
    with ready_server(env, log, PRODUCTION) as running:
        host, port = running.url.removeprefix("http://").split(":")
        # In flight: inside the app, its body still arriving when the signals come.
        upload = socket.create_connection((host, int(port)), timeout=10)
        upload.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"image": "'
        )
        time.sleep(0.3)
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert running.process.poll() is None  # draining: the upload may still finish
        started = time.monotonic()
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=10) == 128 + signal.SIGINT
        assert time.monotonic() - started < 3
        answer = b""
        while chunk := upload.recv(65536):
            answer += chunk
        upload.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert json.loads(body)["error"]["code"] == "shutting_down"
    assert b"\r\nretry-after: 5" in head  # as every 503 of the service
    assert b"\r\nx-request-id: " in head
    text = log.read_text()
    assert "Exception in ASGI application" not in text
    assert "Traceback" not in text
    messages = [json.loads(line)["message"] for line in text.splitlines() if line.startswith("{")]
    assert (
        "a second SIGINT: exiting now; 1 request(s) in flight answered 503 shutting_down"
        in messages
    )


def test_python_m_app_answers_503_while_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """From the moment the port opens: /health 200, /ready and work a JSON 503
    `not_ready`, a path with no endpoint the app's own 404, then the app, with no
    refused or reset connection at the hand-over."""
    # A cold conversion cache: the model's load includes converting it, a longer window.
    env = {
        "CLIP_MODEL": f"local-dir:{tiny_model_dir}",
        "CLIP_DEVICE": "cpu",
        "CLIP_CACHE_DIR": str(tmp_path / "cache"),
    }
    loading: list[httpx.Response] = []
    misplaced: list[httpx.Response] = []  # a probe at /health/: no endpoint, before or after

    def watch(ready: httpx.Response | None) -> None:
        if ready is None:  # refused before the port opens (Python's imports); never after
            if loading:
                pytest.fail("a connection failed after the port had answered")
            return
        loading.append(ready)
        url = str(ready.url).removesuffix("/ready")
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        work = httpx.post(f"{url}/embed", files={"image": ("p.jpg", noise_jpeg(0))}, timeout=10)
        assert work.status_code in (200, 503)  # the model may be ready by now
        loading.extend([work] if work.status_code == 503 else [])
        misplaced.append(httpx.get(f"{url}/health/", timeout=10))

    with ready_server(env, tmp_path / "server.log", PRODUCTION, watch, poll_s=0.01) as running:
        assert loading, "the port never answered while the model loaded"
        for answer in loading:
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "5"
            assert answer.json()["error"]["code"] == "not_ready"
        embedded = httpx.post(f"{running.url}/embed", files={"image": ("p.jpg", noise_jpeg(0))})
        assert embedded.status_code == 200
        metrics = httpx.get(f"{running.url}/metrics").text
        assert f'clip_rejections_total{{reason="not_ready"}} {len(loading)}.0' in metrics
        after = httpx.get(f"{running.url}/health/")
        assert after.status_code == 404
        assert all((r.status_code, r.json()) == (404, after.json()) for r in misplaced)


def test_a_client_started_beside_the_service_waits_until_it_is_ready(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {"CLIP_MODEL": f"local-dir:{tiny_model_dir}", "CLIP_DEVICE": "cpu"}
    process = start_server(env, port, tmp_path / "server.log", PRODUCTION)
    try:
        with ClipClient(f"http://127.0.0.1:{port}", retries=0) as client:
            client.wait_until_ready(timeout_s=120)
            embedding = client.embed(noise_jpeg(2))  # no retry needed: it is ready
    finally:
        process.kill()
        process.wait()
    assert embedding.shape == (64,)  # the tiny model's dimension
    assert float(np.linalg.norm(embedding)) == pytest.approx(1.0, abs=1e-5)


def test_sigterm_while_the_model_loads_exits_at_once(vit_b_32_dir: Path, tmp_path: Path) -> None:
    """The load runs in a thread nothing can stop: waiting for it outlasted the grace
    period of a pod stopped during a cold conversion (67 s for int8)."""
    env = {
        "CLIP_MODEL": f"local-dir:{vit_b_32_dir}",
        "CLIP_DEVICE": "cpu",
        "CLIP_CACHE_DIR": str(tmp_path / "cache"),  # cold: a conversion of ViT-B-32
    }
    log = tmp_path / "server.log"
    port = free_port()
    process = start_server(env, port, log, PRODUCTION)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            assert ready.json()["error"]["code"] == "not_ready", "loaded before the test"
            break
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "SIGTERM while the model loads: exiting now" in log.read_text()


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler of its own for `sig` (/proc's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_python_imports_exits_0_with_a_json_line(
    tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """Before the port opens, Python spends seconds importing torch: SIGTERM then ended
    it with 143 and no log, SIGINT with a plain-text traceback."""
    log = tmp_path / "server.log"
    port = free_port()
    process = start_server({"CLIP_MODEL": f"local-dir:{tiny_model_dir}"}, port, log, PRODUCTION)
    try:
        deadline = time.monotonic() + 10
        while not catches(process.pid, signal.SIGTERM):  # the first thing it does
            assert time.monotonic() < deadline
            assert process.poll() is None
            time.sleep(0.005)
        with pytest.raises(ConnectionRefusedError):  # still importing: nothing listens yet
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        process.send_signal(sig)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = log.read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == [
        f"{sig.name} while the server is not running: exiting now"
    ]


def test_a_port_in_use_is_named_with_what_to_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    """uvicorn logs only "[Errno 98] Address already in use": no address, no advice."""
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    log = tmp_path / "server.log"
    try:
        process = start_server({"CLIP_MODEL": f"local-dir:{tiny_model_dir}"}, port, log, PRODUCTION)
        assert process.wait(timeout=60) != 0
    finally:
        holder.close()
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    assert any(f"cannot listen on 127.0.0.1:{port}" in m and "--port" in m for m in messages)


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error_not_a_traceback(port: str) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "app", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2  # argparse's usage error
    assert "argument --port" in done.stderr
    assert "Traceback" not in done.stderr
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()}
    assert "torch" not in imported  # answered before the seconds of importing it


def test_missing_weights_fail_startup_fast_with_the_setting_named(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = start_server({"CLIP_MODEL": f"local-dir:{tmp_path}/nothing"}, free_port(), log)
    assert process.wait(timeout=60) != 0
    output = log.read_text()
    assert "CLIP_MODEL=local-dir:" in output
    assert "Traceback" not in output  # the message alone; uvicorn's traceback buries it


NOBODY = 65534
# `python -m app` with reading one file refused, as permissions would refuse it: the
# variant of the unreadable-weights test that runs as root, who may read any file.
RUN_APP_WITH_ONE_FILE_UNREADABLE = """
import errno, os, pathlib, runpy, sys
denied = sys.argv.pop(1)
real_open = pathlib.Path.open
def open_(self, *args, **kwargs):
    if str(self) == denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    return real_open(self, *args, **kwargs)
pathlib.Path.open = open_
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def run_app(
    env_overrides: dict[str, str], prefix: list[str] | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m app` (or `prefix` before the module's arguments) until it exits; it must
    exit by itself, at startup, within the timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
    env.update({"CLIP_DEVICE": "cpu", **env_overrides})
    if home is not None:
        env["HOME"] = str(home)
    command = prefix or [sys.executable, "-m", "app"]
    return subprocess.run(
        [*command, "--host", "127.0.0.1", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_reported_in_a_line(
    result: subprocess.CompletedProcess[str], *named: str
) -> list[dict[str, Any]]:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = output.splitlines()
    assert len(lines) <= 3, output  # the message, and uvicorn's "startup failed" at most
    records = [json.loads(line) for line in lines]
    for text in named:
        assert any(text in record["message"] for record in records), output
    return records


def test_python_m_app_reports_missing_weights_in_a_line() -> None:
    result = run_app({"CLIP_MODEL": "local-dir:/nonexistent"})
    assert result.returncode == 3  # as uvicorn reports a failed startup
    assert_reported_in_a_line(result, "CLIP_MODEL=local-dir:/nonexistent: directory not found")


def test_a_file_where_the_weights_belong_is_named_as_such(tmp_path: Path) -> None:
    """A text file as CLIP_PRETRAINED was "open_clip could not build ViT-B-32/afile: 101";
    a file as the local-dir folder, "directory not found"."""
    text, noise = tmp_path / "afile", tmp_path / "noise.pt"
    text.write_text("hello world\n")
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    for weights in (text, noise):
        result = run_app({"CLIP_MODEL": "ViT-B-32", "CLIP_PRETRAINED": str(weights)})
        records = assert_reported_in_a_line(
            result, f"CLIP_PRETRAINED={weights} is not a checkpoint open_clip can load"
        )
        assert not any("weights_only" in record["message"] for record in records)
    result = run_app({"CLIP_MODEL": f"local-dir:{text}"})
    assert_reported_in_a_line(result, f"CLIP_MODEL=local-dir:{text}: is a file, not a folder")
    result = run_app({"CLIP_MODEL": "ViT-B-32", "CLIP_PRETRAINED": str(tmp_path)})
    assert_reported_in_a_line(result, f"CLIP_PRETRAINED={tmp_path} is a folder")


def test_python_m_app_reports_invalid_settings_in_a_line() -> None:
    result = run_app({"CLIP_MAX_WAIT_MS": "-1", "CLIP_DEVICE": "tpu"})
    assert result.returncode == 1
    assert_reported_in_a_line(result, "CLIP_MAX_WAIT_MS", "CLIP_DEVICE")


def test_a_backend_named_with_a_precision_it_does_not_run_fails_with_the_settings() -> None:
    """Was exit 3 once the model had loaded (the table lived beside the runtimes)."""
    result = run_app({"CLIP_BACKEND": "onnxruntime", "CLIP_PRECISION": "bf16"})
    assert result.returncode == 1
    assert_reported_in_a_line(
        result, "CLIP_BACKEND=onnxruntime does not run CLIP_PRECISION=bf16; it runs fp32, int8"
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user may enter: pytest's own are the running user's alone."""
    folder = Path(tempfile.mkdtemp(prefix="clip-unreadable-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def as_unprivileged_user() -> list[str]:
    """`python -m app` as a user the chmod binds, for runs as root; skips where none can be
    had or it cannot run the service."""
    if os.geteuid() != 0:
        return [sys.executable, "-m", "app"]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root reads whatever the mode, and setpriv is not here to drop root")
    drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    failure = import_failure_as(tuple(drop))
    if failure is not None:
        pytest.skip(f"uid {NOBODY} cannot import the service here: {failure}")
    return [*drop, sys.executable, "-m", "app"]


@functools.cache
def import_failure_as(drop: tuple[str, ...]) -> str | None:
    """Why `drop` cannot import the service, or None: asked once a run, since torch's
    import takes seconds."""
    home = Path(tempfile.mkdtemp(prefix="clip-nobody-home-"))
    home.chmod(0o755)
    try:
        probe = subprocess.run(
            [*drop, sys.executable, "-c", "import app.main"],
            capture_output=True,
            env={**os.environ, "HOME": str(home)},
            timeout=120,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return None if probe.returncode == 0 else repr(probe.stderr[-300:])


@pytest.mark.parametrize("setting", ["CLIP_MODEL", "CLIP_PRETRAINED"])
@pytest.mark.parametrize("how", ["chmod", "simulated"])
def test_python_m_app_reports_unreadable_weights_as_unreadable(
    shared_tmp: Path, setting: str, how: str
) -> None:
    # Resolution fails before any file's content is read: placeholder bytes do.
    folder = shared_tmp / "model"
    folder.mkdir(mode=0o755)
    (folder / "open_clip_config.json").write_text("{}")
    weights = folder / "open_clip_model.safetensors"
    weights.write_bytes(b"x")
    env = (
        {"CLIP_MODEL": f"local-dir:{folder}"}
        if setting == "CLIP_MODEL"
        else {"CLIP_MODEL": "ViT-B-32", "CLIP_PRETRAINED": str(weights)}
    )
    if how == "chmod":
        weights.chmod(0)
        prefix = as_unprivileged_user()
    else:
        prefix = [sys.executable, "-c", RUN_APP_WITH_ONE_FILE_UNREADABLE, str(weights)]
    result = run_app(env, prefix, home=shared_tmp)
    assert result.returncode == 3
    records = assert_reported_in_a_line(
        result, f"{setting}=", f"{weights} exists but cannot be read (permission denied)"
    )
    assert not any("No such file" in record["message"] for record in records)


async def startup_messages(error: Exception) -> list[Message]:
    """What the app tells the server when loading the model raises `error`."""

    def fail(settings: Settings, texts: Sequence[str] = ()) -> Any:
        raise error

    app = create_app(Settings(model="local-dir:/unused", device="cpu"), encoder_factory=fail)
    received: asyncio.Queue[Message] = asyncio.Queue()
    received.put_nowait({"type": "lifespan.startup"})
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    with pytest.raises(type(error)):
        await app(scope, received.get, send)
    return sent


async def test_a_known_startup_failure_reaches_the_server_without_its_traceback() -> None:
    sent = await startup_messages(WeightsUnavailable("CLIP_MODEL=x: not here"))
    assert sent == [{"type": "lifespan.startup.failed", "message": ""}]


async def test_an_unknown_startup_failure_keeps_its_traceback() -> None:
    sent = await startup_messages(RuntimeError("a bug"))
    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert "Traceback" in sent[0]["message"]
    assert "RuntimeError: a bug" in sent[0]["message"]
