from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Callable
from functools import partial

import httpx
import numpy as np
import pytest

from app.api.schemas import SearchSimilarityResponse
from app.codec import encode_embedding
from app.config import Settings
from app.search import SearchExecutor
from tests.conftest import serve

# The tiny test model's dimension: /similarity takes embeddings of exactly that length.
DIM = 64


def _half(first: float) -> str:
    """A DIM-long embedding as float16 bytes."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0] = first
    return encode_embedding(vector, "float16")


def emb(values: object) -> str:
    """base64 of `values`, zero-padded to the service's dimension (a shorter vector is
    the same direction in the first axes)."""
    vector = np.zeros(DIM, dtype=np.float32)
    given = np.asarray(values, dtype=np.float32)
    vector[: given.shape[0]] = given
    return encode_embedding(vector)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


async def test_pair_similarity_is_the_cosine(client: httpx.AsyncClient) -> None:
    assert (await client.get("/info")).json()["dim"] == DIM
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(DIM), rng.standard_normal(DIM)
    response = await client.post("/similarity", json={"a": emb(a * 7), "b": emb(b)})
    assert response.status_code == 200, response.text
    assert response.json()["similarity"] == pytest.approx(float(unit(a) @ unit(b)), abs=1e-5)
    same = await client.post("/similarity", json={"a": emb(a), "b": emb(a)})
    assert same.json()["similarity"] == pytest.approx(1.0, abs=1e-6)


async def test_search_ranks_each_querys_gallery_best_first(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((20, 64)).astype(np.float32)
    queries = gallery[[7, 3]] + 0.01 * rng.standard_normal((2, 64)).astype(np.float32)
    response = await client.post(
        "/similarity",
        json={
            "queries": [emb(q) for q in queries],
            "gallery": [emb(g) for g in gallery],
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
    vectors = [emb(np.eye(4)[i]) for i in range(3)]
    response = await client.post(
        "/similarity", json={"queries": vectors[:1], "gallery": vectors, "top_k": 50}
    )
    assert len(response.json()["matches"][0]) == 3


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"a": emb([1.0, 0.0])}, 422, "both `a` and `b`"),
        ({}, 422, "or `queries` and `gallery` for a search"),
        (
            {"a": emb([1.0]), "queries": [emb([1.0])]},
            422,
            "not both",
        ),
        ({"a": emb([1.0, 0.0]), "b": encode_embedding([1.0, 0.0, 0.0])}, 422, "b has 3 values"),
        # A pair with a search's field: it was validated, then dropped (200).
        ({"a": emb([1.0, 0.0]), "b": emb([1.0, 0.0]), "top_k": 3}, 422, "`top_k` belongs to"),
        ({"a": emb([1.0, 0.0]), "b": emb([1.0, 0.0]), "top_k": 5}, 422, "`top_k` belongs to"),
        ({"a": "@@", "b": emb([1.0])}, 400, "a: embedding is not valid"),
        ({"a": "AAAAAAA=", "b": emb([1.0, 0.0])}, 400, "multiple of 4"),
        ({"a": encode_embedding(np.ones(DIM // 2)), "b": emb([1.0])}, 422, "looks like float16"),
        ({"a": emb([float("nan"), 1.0]), "b": emb([1.0, 0])}, 400, "NaN"),
        # float32 bytes read as float16 are NaN where a value's low half is 0x7fff (here
        # 0.50195307): the length tells the sender what to fix, so it is checked first.
        (
            {
                "a": encode_embedding(np.full(DIM, np.frombuffer(b"\xff\x7f\x00\x3f", "<f4")[0])),
                "b": emb([1.0]),
                "dtype": "float16",
            },
            422,
            "looks like float32",
        ),
        ({"a": emb([0.0, 0.0]), "b": emb([1.0, 0.0])}, 400, "zero"),
        (
            {
                "queries": [emb([1.0, 0])],
                "gallery": [emb([1.0, 0])],
                "top_k": 0,
            },
            422,
            "top_k",
        ),
        (
            {
                "queries": [emb([1.0, 0])],
                "gallery": [emb([1.0, 0]), encode_embedding([1.0])],
            },
            422,
            "gallery[1] has 1 dims",
        ),
        # One request mixing the encodings: "looks like float32: send dtype float32"
        # would only make the float16 ones fail instead.
        (
            {"queries": [_half(1.0)], "gallery": [emb([1.0])], "dtype": "float16"},
            422,
            "while the queries read as float16 fit; it looks like float32 beside the others",
        ),
        (
            {"a": emb([1.0]), "b": _half(1.0)},
            422,
            "while a read as float32 fit; it looks like float16 beside the others",
        ),
        (
            {"queries": [emb([1.0])], "gallery": [emb([1.0]), _half(1.0)]},
            422,
            "gallery[1] has 32 dims but gallery[0] has 64; it looks like float16 beside",
        ),
        # The odd one first in the request: the queries, checked first, were advised to
        # change dtype, which would have broken the gallery.
        (
            {"queries": [emb([1.0])], "gallery": [_half(1.0)] * 3, "dtype": "float16"},
            422,
            "queries[0] has 128 values read as float16, but this service's embeddings have "
            "64, while the gallery read as float16 fit; it looks like float32 beside",
        ),
        (
            {"queries": [_half(1.0), emb([1.0])], "gallery": [emb([1.0])]},
            422,
            "while queries[1] read as float32 fit; it looks like float16 beside",
        ),
        (
            {"a": _half(1.0), "b": emb([1.0])},
            422,
            "while b read as float32 fit; it looks like float16 beside",
        ),
        # Alone in its dtype, with nothing that fits: the advice to switch stands.
        (
            {"queries": [_half(1.0)], "gallery": [_half(1.0)]},
            422,
            'it looks like float16: send "dtype": "float16" with it',
        ),
        ({"queries": [], "gallery": [emb([1.0])]}, 422, "queries"),
        ({"a": emb([1.0]), "b": None}, 422, "a pair needs both `a` and `b`; `b` is null"),
        ({"b": emb([1.0])}, 422, "a pair needs both `a` and `b`; `a` is missing"),
        # A null read "Input should be a valid integer", as if the value had been lost.
        (
            {"queries": [emb([1.0])], "gallery": [emb([1.0])], "top_k": None},
            422,
            "top_k: null was sent; input should be a valid integer (a field that has a "
            "default may be left out",
        ),
        ({"queries": [emb([1.0])], "gallery": ["!!"]}, 400, "gallery[0]"),
    ],
)
async def test_bad_similarity_requests(
    client: httpx.AsyncClient, body: dict[str, object], status: int, expected: str
) -> None:
    response = await client.post("/similarity", json=body)
    assert response.status_code == status, response.text
    assert expected in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Empty: FastAPI called it a missing field (422), /embed a body that is not JSON.
        (b"", "body is empty; send a JSON object"),
        # Not UTF-8, and an integer too long to read: the cause named, as /embed does,
        # rather than "not valid JSON (or holds a number too long to read)".
        (b'{"a": "\xff"}', "body is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
        (b'{"top_k": ' + b"9" * 5000 + b"}", "an integer of more than 4300 digits"),
        (b'{"a": ', "body is not valid JSON: Expecting value: line 1 column 7 (char 6)"),
        # A multipart body under a JSON content type (curl -F with -H content-type: json).
        (
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\xd8\r\n--x--\r\n',
            "it looks like multipart/form-data",
        ),
    ],
)
async def test_bodies_that_are_not_json_are_400_as_on_embed(
    client: httpx.AsyncClient, body: bytes, expected: str
) -> None:
    for path in ("/similarity", "/embed"):
        response = await client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_json"
        assert expected in response.json()["error"]["message"], (path, response.text)


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
    vector = emb([1.0, 0.0])
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


def sparse_unit_rows(rng: np.random.Generator, count: int, dim: int = 32) -> np.ndarray:
    """Unit rows of sixteen +-0.25 entries: their cosines are multiples of 1/16, exact in
    float32 whatever the summation order, so equal scores are truly equal (many ties)."""
    rows = np.zeros((count, dim), dtype=np.float32)
    for row in rows:
        row[rng.choice(dim, 16, replace=False)] = rng.choice([-0.25, 0.25], 16)
    return rows


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[list, list]:
    """Every score, then a full sort by (-score, index): best first, ties by index."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    columns = np.arange(gallery.shape[0])
    order = [np.lexsort((columns, -row))[:k] for row in scores]
    return [o.tolist() for o in order], [
        row[o].tolist() for row, o in zip(scores, order, strict=True)
    ]


def search_body(queries: np.ndarray, gallery: np.ndarray, top_k: int) -> dict[str, object]:
    return {
        "queries": [emb(q) for q in queries],
        "gallery": [emb(g) for g in gallery],
        "top_k": top_k,
    }


@pytest.mark.parametrize("top_k", [1, 7, 40, 100])
async def test_search_equals_a_brute_force_reference(client: httpx.AsyncClient, top_k: int) -> None:
    # 70 queries: more than one chunk of 64; many exactly equal scores.
    rng = np.random.default_rng(top_k)
    queries, gallery = sparse_unit_rows(rng, 70), sparse_unit_rows(rng, 40)
    response = await client.post("/similarity", json=search_body(queries, gallery, top_k))
    assert response.status_code == 200, response.text
    matches = response.json()["matches"]
    indices, similarities = brute_force(queries, gallery, top_k)
    assert [[m["index"] for m in row] for row in matches] == indices
    assert [[m["similarity"] for m in row] for row in matches] == similarities


async def test_search_response_has_the_documented_shape(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(8)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    gallery = rng.standard_normal((9, 16)).astype(np.float32)
    response = await client.post("/similarity", json=search_body(queries, gallery, 4))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["matches"]
    assert len(body["matches"]) == 3
    for row in body["matches"]:
        assert len(row) == 4
        for match in row:
            assert list(match) == ["index", "similarity"]
            assert type(match["index"]) is int
            assert 0 <= match["index"] < 9
            assert type(match["similarity"]) is float
            assert -1 <= match["similarity"] <= 1
    SearchSimilarityResponse.model_validate(body)
    expected = np.stack([unit(q) for q in queries]) @ np.stack([unit(g) for g in gallery]).T
    got = [[m["similarity"] for m in row] for row in body["matches"]]
    np.testing.assert_allclose(got, -np.sort(-expected, axis=1)[:, :4], atol=1e-6)

    schema = (await client.get("/openapi.json")).json()
    ok = schema["paths"]["/similarity"]["post"]["responses"]["200"]["content"]["application/json"]
    refs = {option["$ref"].rsplit("/", 1)[-1] for option in ok["schema"]["anyOf"]}
    assert refs == {"PairSimilarityResponse", "SearchSimilarityResponse"}


async def test_a_long_pair_is_decoded_off_the_loop_and_refused_by_its_dimension(
    client: httpx.AsyncClient,
) -> None:
    # Past the size decoded inline, so it goes through the search executor; no valid
    # pair is this long, and the answer says why.
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal(20_000), rng.standard_normal(20_000)
    response = await client.post(
        "/similarity", json={"a": encode_embedding(a), "b": encode_embedding(b)}
    )
    assert response.status_code == 422, response.text
    assert (
        f"a has 20000 values read as float32, but this service's embeddings have {DIM}"
        in (response.json()["error"]["message"])
    )


@pytest.mark.parametrize(
    ("queries", "top_k", "expected"),
    [
        (3, 1, "queries x gallery is 3 x 5 = 15 scores, over the limit of 12 "),
        (2, 4, "queries x min(top_k, gallery) is 2 x 4 = 8 matches, over the limit of 6 "),
        (2, 9, "is 2 x 5 = 10 matches"),
    ],
)
async def test_search_products_are_limited_before_decoding(
    tiny_settings: Callable[..., Settings], queries: int, top_k: int, expected: str
) -> None:
    variable = "CLIP_MAX_SEARCH_SCORES" if "scores" in expected else "CLIP_MAX_SEARCH_MATCHES"
    vector = emb([1.0, 0.0])
    settings = tiny_settings(warmup=False, max_search_scores=12, max_search_matches=6)
    async with serve(settings) as (_, client):
        # Garbage embeddings, too: the sizes are refused before anything is decoded.
        for item in (vector, "!!not base64!!"):
            body = {"queries": [item] * queries, "gallery": [item] * 5, "top_k": top_k}
            response = await client.post("/similarity", json=body)
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["code"] == "payload_too_large"
            assert expected in error["message"]
            assert variable in error["message"]
        at_limits = {"queries": [vector] * 2, "gallery": [vector] * 5, "top_k": 3}
        assert (await client.post("/similarity", json=at_limits)).status_code == 200
        at_limits["gallery"] = ["!!not base64!!"] * 5
        refused = await client.post("/similarity", json=at_limits)
    assert refused.status_code == 400
    assert "gallery[0]" in refused.json()["error"]["message"]


async def test_health_stays_fast_during_a_maximal_search(
    tiny_settings: Callable[..., Settings],
) -> None:
    # The search that made /health wait 723 ms when it ran on the event loop: 800 queries
    # x 2200 gallery, top_k 1000, at this app's limits (800,000 matches).
    settings = tiny_settings(
        warmup=False, max_search_scores=800 * 2200, max_search_matches=800 * 1000
    )
    rng = np.random.default_rng(6)
    queries = rng.standard_normal((800, 16)).astype(np.float32)
    gallery = rng.standard_normal((2200, 16)).astype(np.float32)
    content = json.dumps(search_body(queries, gallery, 1000)).encode()
    gc.collect()  # a full collection of the suite's heap is a pause that is not the app's
    async with serve(settings) as (_, client):

        async def search() -> tuple[httpx.Response, float]:
            began = time.perf_counter()
            response = await client.post(
                "/similarity", content=content, headers={"content-type": "application/json"}
            )
            return response, time.perf_counter() - began

        task = asyncio.create_task(search())
        latencies = []
        while not task.done():
            # From the moment a poll is due: the loop may be blocked while this task sleeps.
            due = time.perf_counter() + 0.01
            await asyncio.sleep(0.01)
            assert (await client.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - due)
        response, took = await task
    assert response.status_code == 200, response.text[:200]
    assert response.content.count(b'{"index":') == 800 * 1000
    print(f"search {took:.2f}s; /health max {max(latencies) * 1000:.0f} ms of {len(latencies)}")
    assert len(latencies) >= 5, f"the search took only {took:.2f}s"
    # Relative to the search, as the machine's speed scales both: on the loop, /health
    # waited more than half of it. Threads that hold the GIL still cost the loop a few
    # 5 ms switch intervals per call (11-76 ms here), which a fixed bound made flaky.
    assert max(latencies) < took / 4, f"/health waited {max(latencies) * 1000:.0f} ms"


async def test_a_full_search_queue_answers_503(tiny_settings: Callable[..., Settings]) -> None:
    vector = emb([1.0, 0.0])
    body = {"queries": [vector], "gallery": [vector], "top_k": 1}
    async with serve(tiny_settings(warmup=False)) as (app, client):
        executor: SearchExecutor = app.state.searches
        release = threading.Event()
        blockers = [
            asyncio.create_task(executor.run(partial(release.wait, 10), 30))
            for _ in range(executor.max_pending)
        ]
        await asyncio.sleep(0)  # each admitted: one running, the rest queued
        assert executor.pending == executor.max_pending
        refused = await client.post("/similarity", json=body)
        # A small pair needs no thread, so it is still answered.
        pair = await client.post("/similarity", json={"a": vector, "b": vector})
        release.set()
        await asyncio.gather(*blockers)
        again = await client.post("/similarity", json=body)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert pair.status_code == 200
    assert again.status_code == 200
    assert executor.pending == 0


async def test_a_search_waiting_past_the_timeout_answers_504(
    tiny_settings: Callable[..., Settings],
) -> None:
    vector = emb([1.0, 0.0])
    body = {"queries": [vector], "gallery": [vector], "top_k": 1}
    async with serve(tiny_settings(warmup=False, request_timeout_s=0.2)) as (app, client):
        executor: SearchExecutor = app.state.searches
        release = threading.Event()
        blocker = asyncio.create_task(executor.run(partial(release.wait, 10), 30))
        await asyncio.sleep(0)
        response = await client.post("/similarity", json=body)
        release.set()
        await blocker
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout"
    assert executor.pending == 0  # the queued search was dropped, not left to run


@pytest.mark.parametrize(
    "prefix",
    ["data:application/octet-stream;base64,", "data:;base64,", "DATA:text/plain;x=1;base64,"],
)
async def test_embeddings_may_come_as_data_urls(client: httpx.AsyncClient, prefix: str) -> None:
    a, b = emb([1.0, 0.0]), emb([1.0, 1.0])
    response = await client.post("/similarity", json={"a": prefix + a, "b": b})
    assert response.status_code == 200, response.text
    assert response.json()["similarity"] == pytest.approx(2**-0.5, abs=1e-6)
    search = await client.post(
        "/similarity", json={"queries": [prefix + a], "gallery": [prefix + b, a]}
    )
    assert search.status_code == 200, search.text
    assert [m["index"] for m in search.json()["matches"][0]] == [1, 0]


async def test_body_fields_in_the_url_are_refused_not_ignored(client: httpx.AsyncClient) -> None:
    query, gallery = emb([1.0, 0.0]), [emb([1.0, 0.0]), emb([0.0, 1.0]), emb([1.0, 1.0])]
    response = await client.post(
        "/similarity?top_k=1", json={"queries": [query], "gallery": gallery, "top_k": 3}
    )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "unexpected query parameter(s) top_k" in message
    assert "`dtype`" in message
    allowed = await client.post("/similarity?dtype=float32", json={"a": query, "b": query})
    assert allowed.status_code == 200


async def test_a_search_over_the_upload_limit_is_told_how_to_shrink_a_search(
    tiny_settings: Callable[..., Settings],
) -> None:
    gallery = [emb(unit(np.random.default_rng(i).normal(size=64))) for i in range(64)]
    body = {"queries": gallery[:1], "gallery": gallery, "top_k": 1}
    async with serve(tiny_settings(max_upload_bytes=8_000, warmup=False)) as (_, client):
        searched = await client.post("/similarity", json=body)
        embedded = await client.post("/embed", json={"image": "A" * 9_000})
    assert searched.status_code == embedded.status_code == 413
    assert "gallery embeddings" in searched.json()["error"]["message"]
    assert "crops" in embedded.json()["error"]["message"]
