"""Projection served by the API, float16 transport, fit-projection and eval-reid end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.codec import decode_embedding, encode_embedding
from app.config import Settings
from app.inference.projection import Projection, ProjectionError, fit_pca
from app.reid import eval_reid, fit_projection
from app.tools.synthetic_people import make_person, random_garment
from tests.conftest import serve
from tests.helpers import noise_jpeg


def market_dataset(root: Path, people: int = 6) -> Path:
    """A tiny Market-1501 layout: each person in 3 cameras, plus junk and distractors."""
    rng = np.random.default_rng(3)
    (root / "query").mkdir(parents=True)
    (root / "bounding_box_test").mkdir()
    for person in range(1, people + 1):
        outfit = (random_garment(rng), random_garment(rng))
        for camera in (1, 2, 3):
            folder = "query" if camera == 1 else "bounding_box_test"
            name = f"{person:04d}_c{camera}s1_{person * 10 + camera:06d}_00.jpg"
            (root / folder / name).write_bytes(make_person(rng, outfit).jpeg)
    (root / "bounding_box_test" / "-1_c1s1_000001_00.jpg").write_bytes(noise_jpeg(1))
    (root / "bounding_box_test" / "0000_c2s1_000002_00.jpg").write_bytes(noise_jpeg(2))
    return root


async def test_embed_returns_the_projected_dim_matching_numpy_by_hand(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    crops = [noise_jpeg(seed) for seed in range(12)]
    async with serve(tiny_settings(warmup=False)) as (_, client):
        info = (await client.get("/info")).json()
        raw = [
            decode_embedding(
                (await client.post("/embed", files={"image": ("c", c)})).json()["embedding"]
            )
            for c in crops
        ]
    projection, _ = fit_pca(np.stack(raw), 8, info["model"])
    path = tmp_path / "pca8.safetensors"
    projection.save(path)
    async with serve(tiny_settings(projection=str(path), warmup=False)) as (_, client):
        info = (await client.get("/info")).json()
        body = (await client.post("/embed", files={"image": ("c", crops[0])})).json()
        analyzed = (
            await client.post(
                "/analyze", files={"image": ("c", crops[0])}, data={"include_embedding": "true"}
            )
        ).json()
    assert (info["dim"], info["projection"]) == (8, "pca")
    served = decode_embedding(body["embedding"])
    assert body["dim"] == 8
    assert float(np.linalg.norm(served)) == pytest.approx(1.0, abs=1e-5)
    by_hand = (raw[0] - projection.mean) @ projection.weight.T
    np.testing.assert_allclose(served, by_hand / np.linalg.norm(by_hand), atol=1e-5)
    np.testing.assert_allclose(decode_embedding(analyzed["embedding"]), served, atol=1e-5)


async def test_a_projection_for_another_model_stops_startup(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "other.safetensors"
    fit_pca(np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32), 4, "ViT-L-14/x")[
        0
    ].save(path)
    with pytest.raises(ProjectionError, match="CLIP_PROJECTION"):
        async with serve(tiny_settings(projection=str(path), warmup=False)):
            pass


async def test_float16_transport_end_to_end(tiny_settings: Callable[..., Settings]) -> None:
    async with serve(tiny_settings(warmup=False)) as (_, client):
        half = (
            await client.post("/embed?dtype=float16", files={"image": ("c", noise_jpeg(1))})
        ).json()
        full = (await client.post("/embed", files={"image": ("c", noise_jpeg(1))})).json()
        batch = (
            await client.post(
                "/embed/batch?dtype=float16", files=[("images", ("c", noise_jpeg(1)))]
            )
        ).json()
        a = decode_embedding(half["embedding"], "float16")
        pair = await client.post(
            "/similarity",
            json={"a": half["embedding"], "b": encode_embedding(a, "float16"), "dtype": "float16"},
        )
        wrong = await client.post("/embed?dtype=float8", files={"image": ("c", noise_jpeg(1))})
    assert half["dtype"] == "float16"
    assert full["dtype"] == "float32"
    assert len(__import__("base64").b64decode(half["embedding"])) == 2 * half["dim"]
    np.testing.assert_allclose(a, decode_embedding(full["embedding"]), atol=2e-3)
    assert batch["dtype"] == "float16"
    assert pair.json()["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert wrong.status_code == 422


def test_fit_projection_and_eval_reid_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = market_dataset(tmp_path / "market")
    model = f"local-dir:{tiny_model_dir}"
    pca = tmp_path / "pca8.safetensors"
    centre = tmp_path / "centre.safetensors"
    crops = str(dataset / "bounding_box_test")
    common = ["--model", model, "--device", "cpu"]
    fit_projection.main([crops, *common, "--dim", "8", "--out", str(pca)])
    fit_projection.main([crops, *common, "--centre", "--out", str(centre)])
    assert Projection.load(pca).output_dim == 8
    out = tmp_path / "results"
    results = eval_reid.main(
        [
            str(dataset),
            "--model",
            model,
            "--device",
            "cpu",
            "--projection",
            str(pca),
            "--projection",
            str(centre),
            "--out",
            str(out),
        ]
    )
    assert len(results) == 3
    raw = results["raw"]
    assert raw.queries == 6
    assert raw.skipped == 0
    assert 0.0 <= raw.mean_ap <= 1.0
    assert raw.cmc[1] <= raw.cmc[5] <= raw.cmc[10] <= 1.0
    document = json.loads((out / "reid.json").read_text())
    assert set(document["results"]) == set(results)
    assert "| raw |" in (out / "reid.md").read_text()
