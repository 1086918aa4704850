"""What can be checked of the deployment files without a Docker engine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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
    assert (
        "--index-url https://download.pytorch.org/whl/cpu -r requirements-torch.txt" in dockerfile
    )
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
    assert "HEALTHCHECK" in dockerfile
    assert "/health" in dockerfile
    assert 'CMD ["python", "-m", "app"' in dockerfile
    assert "ARG BAKE_WEIGHTS" in dockerfile


def test_compose_has_the_profiles_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["clip"]["ports"] == ["8000:8000"]
    assert services["clip"]["restart"] == "unless-stopped"
    assert "healthcheck" in services["clip"]
    gpu = services["clip-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia"
    assert services["clip-replica"]["deploy"]["replicas"] >= 2
    assert "models" in compose["volumes"]
    settings = set(services["clip"]["environment"])
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(CLIP_[A-Z_]+)`", readme))
    assert settings - {"HF_HUB_OFFLINE"} <= documented


def test_kubernetes_manifests_probe_health_and_ready() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy/k8s/clip-reid.yaml").read_text()))
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "nvidia.com/gpu" in container["resources"]["limits"]
