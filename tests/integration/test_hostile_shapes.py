"""Shapes that cost far more than their bytes: the work of a request must be bounded by
its pixels and the model input, never by its aspect ratio. Each runs in a fresh process
so its peak memory can be measured (a bug here once asked the kernel for 24 GB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import image_bytes

ROOT = Path(__file__).resolve().parents[2]

# (width, height): a 411 kB PNG of 40 Mpx, a 201 kB one of 40 Mpx in 1:40, and turned.
SHAPES = [(40, 1_000_000), (1_000_000, 40), (1000, 40_000), (40_000, 1000)]
ENDPOINTS = ["/embed", "/analyze"]

# Peak memory a request may add: its decoded pixels (4 bytes each in Pillow's RGB) a
# few times over, plus slack for the interpreter. 40 Mpx -> 160 MB decoded.
DECODED_BYTES_PER_PIXEL = 4
ALLOWED_MULTIPLE = 1.5
SLACK_MB = 64


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("hostile")
    paths = []
    for width, height in SHAPES:
        path = folder / f"flat-{width}x{height}.png"
        path.write_bytes(image_bytes((width, height), color=(90, 120, 160), fmt="PNG"))
        paths.append(path)
    return paths


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_extreme_aspect_ratios_cost_bounded_memory_and_time(
    tiny_model_dir: Path, hostile_files: list[Path], resize_mode: str
) -> None:
    specs = [f"{path}:{endpoint}" for path in hostile_files for endpoint in ENDPOINTS]
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.shape_probe", str(tiny_model_dir),
         resize_mode, *specs],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(reports) == len(specs)
    for report, (width, height) in zip(
        reports, [shape for shape in SHAPES for _ in ENDPOINTS], strict=True
    ):
        # /analyze needs 8 x 16 pixels to find garments; /embed takes any shape.
        assert report["status"] in (200, 422), report
        if report["endpoint"] == "/embed":
            assert report["status"] == 200, report
        decoded_mb = width * height * DECODED_BYTES_PER_PIXEL / 2**20
        assert report["peak_rise_mb"] < ALLOWED_MULTIPLE * decoded_mb + SLACK_MB, report
        assert report["seconds"] < 8, report
