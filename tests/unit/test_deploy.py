"""What can be checked of the deployment files without a Docker engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The upper bound on the batcher's drain after requests in flight have finished.
DRAIN_S = 10


def _normal(value: Any) -> str:
    """One spelling for a default, whether a Python value or its environment form."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_normal(item) for item in value)
    if isinstance(value, (int, float)):
        number = float(value)
        return str(int(number)) if number.is_integer() else repr(number)
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    if "," in text:
        return ",".join(_normal(part) for part in text.split(","))
    try:
        return _normal(float(text))
    except ValueError:
        return text


def _settings_defaults() -> dict[str, str]:
    """CLIP_X -> default of every field of Settings, in `_normal` form."""
    return {
        f"CLIP_{name.upper()}": _normal(field.get_default(call_default_factory=True))
        for name, field in Settings.model_fields.items()
    }


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _compose_defaults() -> dict[str, str]:
    """CLIP_X -> the default after `:-` in `CLIP_X: ${CLIP_X:-default}` of x-settings."""
    defaults = {}
    for key, value in _compose()["x-settings"].items():
        match = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
        assert match, f"{key}: {value!r} is not ${{{key}:-default}}"
        assert match[1] == key, f"{key} reads ${{{match[1]}}}"
        if key.startswith("CLIP_"):
            defaults[key] = _normal(match[2])
    return defaults


def _readme_defaults() -> dict[str, str]:
    """CLIP_X -> default of each row of README.md's `## Settings` table."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Settings\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md has no `## Settings` section"
    defaults = {}
    for key, default in re.findall(r"^\| `(\w+)` \| ([^|]*) \|", section[1], re.M):
        default = default.strip()
        assert key not in defaults, f"{key} has two rows"
        if default == "(empty)":
            defaults[key] = ""
        else:
            assert re.fullmatch(r"`[^`]*`", default), f"{key}: default {default!r} not in backticks"
            defaults[key] = _normal(default[1:-1])
    return defaults


def _k8s() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "deploy/k8s/clip-reid.yaml").read_text()))


def _nginx_directive(name: str) -> str:
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    conf = re.sub(r"#.*", "", conf)
    values = re.findall(rf"^\s*{name}\s+([^;]*);", conf, re.M)
    assert len(values) == 1, f"nginx.conf sets {name} {len(values)} times"
    return values[0].strip()


def _seconds(value: str) -> float:
    """An nginx time such as `10s`, `500ms` or `1m`."""
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, f"not an nginx time: {value!r}"
    return int(match[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[match[2]]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_what_the_project_declares() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    # torch: the same pinned file in both, CPU wheels for the default image
    assert "-r requirements-torch.txt" in makefile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert '--index-url "${TORCH_INDEX_URL}" -r requirements-torch.txt' in dockerfile
    # everything else: read from pyproject.toml's dependency list, the one pip installs
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in dockerfile
    assert "install --quiet -e '.[dev]'" in makefile
    pins = (ROOT / "requirements-torch.txt").read_text()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        assert re.search(rf"^{name}==", pins, re.M)
        assert any(d.startswith(f"{name}>=") for d in declared)


def test_the_image_runs_unprivileged_with_a_health_check() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    # "healthy" means serving: the port answers /health while the model still loads.
    healthcheck = re.search(r"^HEALTHCHECK .*\\\n\s*CMD (.*)$", dockerfile, re.M)
    assert healthcheck is not None
    assert '"app.tools.healthcheck", "/ready"' in healthcheck.group(1)
    assert 'CMD ["python", "-m", "app"' in dockerfile
    assert "ARG BAKE_WEIGHTS" in dockerfile


def test_compose_has_the_profiles() -> None:
    compose = _compose()
    services = compose["services"]
    assert services["clip"]["ports"] == ["${CLIP_PORT:-8000}:8000"]
    assert services["clip"]["restart"] == "unless-stopped"
    assert "healthcheck" in services["clip"]
    gpu = services["clip-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia"
    assert services["clip-replica"]["deploy"]["replicas"] >= 2
    assert "models" in compose["volumes"]
    # every service of the image gets every setting
    for name in ("clip", "clip-gpu", "clip-replica"):
        assert services[name]["environment"] == compose["x-settings"], name


def test_compose_readme_and_settings_name_the_same_variables() -> None:
    declared = set(_settings_defaults())
    compose = set(_compose_defaults())
    documented = set(_readme_defaults())
    assert compose == declared, (
        f"compose lacks {sorted(declared - compose)}, has unknown {sorted(compose - declared)}"
    )
    assert documented == declared, (
        f"README lacks {sorted(declared - documented)}, "
        f"documents unknown {sorted(documented - declared)}"
    )
    assert "HF_HUB_OFFLINE" in _compose()["x-settings"]


def test_compose_readme_and_settings_give_the_same_defaults() -> None:
    declared = _settings_defaults()
    compose = _compose_defaults()
    documented = _readme_defaults()
    for key, default in declared.items():
        assert compose.get(key) == default, (
            f"{key}: compose {compose.get(key)!r}, Settings {default!r}"
        )
        assert documented.get(key) == default, (
            f"{key}: README {documented.get(key)!r}, Settings {default!r}"
        )


def test_compose_defaults_parse_to_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not just the same spelling: the service reads the compose values as its own defaults.
    for key in list(os.environ):
        if key.startswith("CLIP_"):
            monkeypatch.delenv(key)
    baseline = Settings()
    for key, value in _compose()["x-settings"].items():
        if key.startswith("CLIP_"):
            monkeypatch.setenv(key, re.fullmatch(r"\$\{\w+:-(.*)\}", value)[1])
    assert Settings() == baseline


def test_kubernetes_manifests_probe_health_and_ready() -> None:
    documents = _k8s()
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "nvidia.com/gpu" in container["resources"]["limits"]


def test_kubernetes_sets_every_setting_at_its_default() -> None:
    documents = _k8s()
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    secret = next(d for d in documents if d["kind"] == "Secret")["stringData"]
    declared = _settings_defaults()
    assert set(secret) == {"CLIP_API_KEYS"}  # keys belong in the Secret, nothing else does
    assert set(config) - {"HF_HUB_OFFLINE"} == set(declared) - {"CLIP_API_KEYS"}
    for key, value in config.items():
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
        if key in declared:
            assert _normal(value) == declared[key], f"{key}: {value!r}, Settings {declared[key]!r}"


def test_kubernetes_pauses_before_sigterm_and_leaves_time_to_drain() -> None:
    documents = _k8s()
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    sleep = re.fullmatch(r"(?:sh -c )?sleep (\d+)", " ".join(command))
    assert sleep, f"preStop is not a sleep: {command}"
    pause = int(sleep[1])
    assert pause >= 1
    timeout = max(float(config["CLIP_REQUEST_TIMEOUT_S"]), Settings().request_timeout_s)
    assert pod["terminationGracePeriodSeconds"] >= pause + timeout + DRAIN_S


def test_nginx_retries_a_503_on_another_replica_within_bounds() -> None:
    retry_on = set(_nginx_directive("proxy_next_upstream").split())
    # a replica answers 503 before doing any work, so a POST can go elsewhere
    assert {"error", "timeout", "http_503", "non_idempotent"} <= retry_on
    tries = int(_nginx_directive("proxy_next_upstream_tries"))
    assert 2 <= tries <= 5  # 0 would be unlimited
    give_up = _seconds(_nginx_directive("proxy_next_upstream_timeout"))
    assert 0 < give_up < Settings().request_timeout_s  # 0 would be unlimited
    assert _seconds(_nginx_directive("proxy_read_timeout")) > Settings().request_timeout_s


def test_nginx_takes_the_bodies_the_service_takes() -> None:
    size = re.fullmatch(r"(\d+)([km]?)", _nginx_directive("client_max_body_size"))
    assert size
    limit = int(size[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[size[2]]
    assert limit == Settings.model_fields["max_upload_bytes"].default


def test_the_python_claimed_is_the_python_tested() -> None:
    """pyproject, README and the image agree on 3.11+, and this run is on a version the
    claim covers (the code uses 3.11's StrEnum and builtin TimeoutError)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert "Python 3.11+" in (ROOT / "README.md").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    assert sys.version_info >= (3, 11)
