"""The re-ID evaluation run against a service, as a user checks a deployment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.reid import eval_reid, fit_projection
from tests.e2e.test_server import PRODUCTION, ready_server
from tests.integration.test_reid_toolkit import FAST, market_dataset

pytestmark = pytest.mark.e2e


def test_eval_reid_names_a_served_projection_instead_of_calling_it_raw(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    dataset = market_dataset(tmp_path / "market")
    pca = tmp_path / "pca4.safetensors"
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    fit_projection.main(
        [str(dataset / "bounding_box_test"), *model, "--dim", "4", "--out", str(pca)]
    )
    env = {
        "CLIP_MODEL": f"local-dir:{tiny_model_dir}",
        "CLIP_DEVICE": "cpu",
        "CLIP_BACKEND": "torch",
        "CLIP_PROJECTION": str(pca),
    }
    out = tmp_path / "results"
    with ready_server(env, tmp_path / "server.log", PRODUCTION) as running:
        results = eval_reid.main([str(dataset), "--url", running.url, "--out", str(out)])
    assert list(results) == ["as served (pca, 4-d)"]
    access = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    assert [a.get("path") for a in access].count("/info") == 1  # read once, not per step
    document = json.loads((out / "reid.json").read_text())
    assert document["served_projection"] == "pca"
    assert document["dim"] == 4
