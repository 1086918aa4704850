from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest

from app.codec import encode_embedding
from app.config import Settings
from tests.conftest import serve


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


async def test_pair_similarity_is_the_cosine(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(512), rng.standard_normal(512)
    response = await client.post(
        "/similarity", json={"a": encode_embedding(a * 7), "b": encode_embedding(b)}
    )
    assert response.status_code == 200, response.text
    assert response.json()["similarity"] == pytest.approx(float(unit(a) @ unit(b)), abs=1e-5)
    same = await client.post(
        "/similarity", json={"a": encode_embedding(a), "b": encode_embedding(a)}
    )
    assert same.json()["similarity"] == pytest.approx(1.0, abs=1e-6)


async def test_search_ranks_each_querys_gallery_best_first(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((20, 64)).astype(np.float32)
    queries = gallery[[7, 3]] + 0.01 * rng.standard_normal((2, 64)).astype(np.float32)
    response = await client.post(
        "/similarity",
        json={
            "queries": [encode_embedding(q) for q in queries],
            "gallery": [encode_embedding(g) for g in gallery],
            "top_k": 4,
        },
    )
    assert response.status_code == 200, response.text
    matches = response.json()["matches"]
    expected = np.stack([unit(q) for q in queries]) @ np.stack([unit(g) for g in gallery]).T
    for row, query_matches in zip(expected, matches, strict=True):
        assert [m["index"] for m in query_matches] == list(np.argsort(-row)[:4])
        scores = [m["similarity"] for m in query_matches]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(float(row.max()), abs=1e-5)
    assert matches[0][0]["index"] == 7
    assert matches[1][0]["index"] == 3


async def test_top_k_is_capped_at_the_gallery_size(client: httpx.AsyncClient) -> None:
    vectors = [encode_embedding(np.eye(4)[i]) for i in range(3)]
    response = await client.post(
        "/similarity", json={"queries": vectors[:1], "gallery": vectors, "top_k": 50}
    )
    assert len(response.json()["matches"][0]) == 3


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"a": encode_embedding([1.0, 0.0])}, 422, "both `a` and `b`"),
        ({}, 422, "either"),
        (
            {"a": encode_embedding([1.0]), "queries": [encode_embedding([1.0])]},
            422,
            "not both",
        ),
        ({"a": encode_embedding([1.0, 0.0]), "b": encode_embedding([1.0, 0.0, 0.0])}, 422, "dims"),
        ({"a": "@@", "b": encode_embedding([1.0])}, 400, "a: embedding is not valid"),
        ({"a": "AAAAAAA=", "b": encode_embedding([1.0, 0.0])}, 400, "multiple of 4"),
        ({"a": encode_embedding([float("nan"), 1.0]), "b": encode_embedding([1.0, 0])}, 400, "NaN"),
        ({"a": encode_embedding([0.0, 0.0]), "b": encode_embedding([1.0, 0.0])}, 400, "zero"),
        (
            {
                "queries": [encode_embedding([1.0, 0])],
                "gallery": [encode_embedding([1.0, 0])],
                "top_k": 0,
            },
            422,
            "top_k",
        ),
        (
            {
                "queries": [encode_embedding([1.0, 0])],
                "gallery": [encode_embedding([1.0, 0]), encode_embedding([1.0])],
            },
            422,
            "gallery[1] has 1 dims",
        ),
        ({"queries": [], "gallery": [encode_embedding([1.0])]}, 422, "queries"),
        ({"queries": [encode_embedding([1.0])], "gallery": ["!!"]}, 400, "gallery[0]"),
    ],
)
async def test_bad_similarity_requests(
    client: httpx.AsyncClient, body: dict[str, object], status: int, expected: str
) -> None:
    response = await client.post("/similarity", json=body)
    assert response.status_code == status, response.text
    assert expected in response.json()["error"]["message"]


async def test_similarity_takes_only_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/similarity", content=b"a=b", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "count", "setting"),
    [("queries", 4, "CLIP_MAX_QUERIES"), ("gallery", 6, "CLIP_MAX_GALLERY")],
)
async def test_search_sizes_are_limited(
    tiny_settings: Callable[..., Settings], field: str, count: int, setting: str
) -> None:
    vector = encode_embedding([1.0, 0.0])
    body = {"queries": [vector], "gallery": [vector], "top_k": 1}
    body[field] = [vector] * count
    async with serve(tiny_settings(max_queries=3, max_gallery=5, max_top_k=2, warmup=False)) as (
        _,
        client,
    ):
        response = await client.post("/similarity", json=body)
        top_k = await client.post(
            "/similarity", json={"queries": [vector], "gallery": [vector], "top_k": 3}
        )
    assert response.status_code == 413
    assert setting in response.json()["error"]["message"]
    assert top_k.status_code == 413
    assert "CLIP_MAX_TOP_K" in top_k.json()["error"]["message"]
