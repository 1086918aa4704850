from __future__ import annotations

import json

import numpy as np
import pytest

from app.codec import encode_embedding
from app.errors import InvalidEmbedding, PayloadTooLarge, ValidationFailed
from app.search import (
    CHUNK_SCORES,
    MAX_CHUNK_QUERIES,
    SearchLimits,
    check_search_size,
    matches_json,
    pair_similarity,
    queries_per_chunk,
    search_json,
    top_k,
    unit_rows,
    wrong_dim_message,
)

LIMITS = SearchLimits(max_queries=10, max_gallery=100, max_top_k=20, max_scores=500, max_matches=60)


def reference(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: every score, a full sort by (-score, index), the first k."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    columns = np.arange(gallery.shape[0])
    order = np.stack([np.lexsort((columns, -row)) for row in scores])[:, :k]
    return order, np.clip(np.take_along_axis(scores, order, axis=1), -1.0, 1.0)


def exact_rows(rng: np.random.Generator, count: int, dim: int = 24, spread: int = 3) -> np.ndarray:
    """Rows of small integers over 64: float32 dot products of these are exact, whatever
    the summation order, so the reference's ranking (ties included) is the true one."""
    return (rng.integers(-spread, spread + 1, size=(count, dim)) / 64).astype(np.float32)


@pytest.mark.parametrize("chunk_scores", [1, 5 * 37, 64 * 37, CHUNK_SCORES])
@pytest.mark.parametrize("k", [1, 4, 36, 37, 100])
def test_top_k_equals_brute_force(chunk_scores: int, k: int) -> None:
    rng = np.random.default_rng(k * 1000 + chunk_scores % 997)
    queries, gallery = exact_rows(rng, 150, spread=2), exact_rows(rng, 37, spread=2)
    indices, similarities = top_k(queries, gallery, k, chunk_scores=chunk_scores)
    expected_indices, expected_similarities = reference(queries, gallery, min(k, 37))
    assert indices.shape == (150, min(k, 37))
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(similarities, expected_similarities.astype(np.float32))


def test_random_unit_rows_rank_like_float64() -> None:
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((70, 32)).astype(np.float32)
    gallery = rng.standard_normal((500, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    indices, similarities = top_k(queries, gallery, 10, chunk_scores=3 * 500)
    expected_indices, expected_similarities = reference(queries, gallery, 10)
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-6)
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    # Near-equal scores may swap in float32; each match still has its claimed score.
    np.testing.assert_allclose(np.take_along_axis(scores, indices, axis=1), similarities, atol=1e-6)
    assert (indices == expected_indices).mean() > 0.99


def test_ties_go_to_the_lower_index_at_the_cut_off_too() -> None:
    values = np.array([0.2, 0.5, 0.9, 0.5, 0.5, 0.9, 0.1, 0.5], dtype=np.float32)
    gallery = values[:, None]
    query = np.ones((1, 1), dtype=np.float32)
    for k, expected in [(1, [2]), (2, [2, 5]), (3, [2, 5, 1]), (5, [2, 5, 1, 3, 4])]:
        indices, similarities = top_k(query, gallery, k)
        assert indices[0].tolist() == expected
        assert similarities[0].tolist() == values[expected].tolist()
    identical = np.ones((10, 3), dtype=np.float32) / np.sqrt(np.float32(3))
    indices, _ = top_k(identical[:2], identical, 4)
    assert indices.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_similarities_are_clipped() -> None:
    big = np.array([[2.0, 0.0], [-3.0, 0.0]], dtype=np.float32)
    _, similarities = top_k(big[:1], big, 2)
    assert similarities.tolist() == [[1.0, -1.0]]


def test_chunks_stay_small() -> None:
    assert queries_per_chunk(10) == MAX_CHUNK_QUERIES
    assert queries_per_chunk(100_000) * 100_000 <= CHUNK_SCORES
    assert queries_per_chunk(10 * CHUNK_SCORES) == 1


def test_unit_rows_normalise_and_name_the_bad_item() -> None:
    rows = unit_rows([encode_embedding([3.0, 4.0]), encode_embedding([0.0, -2.0])], "gallery")
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, -1.0]])
    huge = unit_rows([encode_embedding([3e38] * 8)], "a", indexed=False)
    np.testing.assert_allclose(np.linalg.norm(huge), 1.0, rtol=1e-6)
    with pytest.raises(InvalidEmbedding, match=r"^gallery\[2\]: embedding is not valid"):
        unit_rows([encode_embedding([1.0])] * 2 + ["!!"], "gallery")
    with pytest.raises(InvalidEmbedding, match=r"^a has no direction"):
        unit_rows([encode_embedding([0.0, 0.0])], "a", indexed=False)
    with pytest.raises(ValidationFailed, match=r"queries\[1\] has 3 dims but queries\[0\] has 2"):
        unit_rows([encode_embedding([1.0, 0.0]), encode_embedding([1.0, 0.0, 0.0])], "queries")


def test_the_first_bad_item_is_reported_whatever_its_fault() -> None:
    zero, good = encode_embedding([0.0, 0.0]), encode_embedding([1.0, 0.0])
    with pytest.raises(InvalidEmbedding, match=r"^gallery\[1\] has no direction"):
        unit_rows([good, zero, good, "!!"], "gallery")
    with pytest.raises(InvalidEmbedding, match=r"^gallery\[1\] has no direction"):
        unit_rows([good, zero, encode_embedding([1.0])], "gallery")
    with pytest.raises(InvalidEmbedding, match=r"^gallery\[3\]: "):
        unit_rows([good, good, good, "!!", zero], "gallery")


def test_float16_embeddings_decode() -> None:
    rows = unit_rows([encode_embedding([1.0, 1.0], "float16")], "queries", "float16")
    np.testing.assert_allclose(rows, [[2**-0.5, 2**-0.5]], rtol=1e-6)


def test_pair_similarity() -> None:
    a, b = encode_embedding([1.0, 0.0]), encode_embedding([1.0, 1.0])
    assert pair_similarity(a, b) == pytest.approx(2**-0.5)
    assert pair_similarity(a, a) == 1.0
    with pytest.raises(ValidationFailed, match="a has 2 dims but b has 1"):
        pair_similarity(a, encode_embedding([1.0]))
    with pytest.raises(InvalidEmbedding, match=r"^b: "):
        pair_similarity(a, "@@")


@pytest.mark.parametrize(
    ("queries", "gallery", "k", "expected"),
    [
        (11, 1, 1, "queries is 11, over the limit of 10 (CLIP_MAX_QUERIES)"),
        (1, 101, 1, "gallery is 101, over the limit of 100 (CLIP_MAX_GALLERY)"),
        (1, 1, 21, "top_k is 21, over the limit of 20 (CLIP_MAX_TOP_K)"),
        (6, 100, 1, "6 x 100 = 600 scores, over the limit of 500 (CLIP_MAX_SEARCH_SCORES)"),
        (
            10,
            50,
            7,
            "queries x min(top_k, gallery) is 10 x 7 = 70 matches, over the limit of 60 "
            "(CLIP_MAX_SEARCH_MATCHES)",
        ),
    ],
)
def test_sizes_over_a_limit_are_refused(queries: int, gallery: int, k: int, expected: str) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        check_search_size(queries, gallery, k, LIMITS)
    assert expected in caught.value.message


def test_sizes_at_the_limits_pass() -> None:
    check_search_size(5, 100, 12, LIMITS)  # 500 scores, 60 matches
    check_search_size(10, 6, 20, LIMITS)  # top_k above the gallery counts as the gallery


def test_json_parses_back_to_the_same_numbers() -> None:
    rng = np.random.default_rng(5)
    indices = rng.integers(0, 1000, size=(3, 4)).astype(np.intp)
    similarities = rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)
    similarities[0, :3] = [1e-7, -0.0, 1.0]
    parsed = json.loads(matches_json(indices, similarities))
    assert list(parsed) == ["matches"]
    assert [[m["index"] for m in row] for row in parsed["matches"]] == indices.tolist()
    got = [[m["similarity"] for m in row] for row in parsed["matches"]]
    assert got == similarities.tolist()  # exactly: the float64 value of each float32
    assert all(type(m["similarity"]) is float for row in parsed["matches"] for m in row)


def test_search_json_is_the_whole_search() -> None:
    rng = np.random.default_rng(9)
    gallery = exact_rows(rng, 90)
    queries = exact_rows(rng, 70)
    text = search_json(
        [encode_embedding(q) for q in queries], [encode_embedding(g) for g in gallery], 5
    )
    parsed = json.loads(text)["matches"]
    unit_q = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    unit_g = gallery / np.linalg.norm(gallery.astype(np.float64), axis=1, keepdims=True)
    expected_indices, expected_similarities = reference(unit_q, unit_g, 5)
    got_similarities = np.array([[m["similarity"] for m in row] for row in parsed])
    np.testing.assert_allclose(got_similarities, expected_similarities, atol=1e-6)
    got_indices = np.array([[m["index"] for m in row] for row in parsed])
    assert (got_indices == expected_indices).mean() > 0.99
    with pytest.raises(ValidationFailed, match="queries has 2 dims but gallery has 3"):
        search_json([encode_embedding([1.0, 0.0])], [encode_embedding([1.0, 0.0, 0.0])], 1)


def test_an_embedding_is_exactly_as_similar_to_itself_as_can_be() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        vector = rng.standard_normal(512).astype(np.float32)
        text = encode_embedding(vector / np.linalg.norm(vector))
        assert pair_similarity(text, text) == 1.0
        assert pair_similarity(text, encode_embedding(-vector)) == -1.0


def test_the_wrong_length_message_counts_in_words_that_agree() -> None:
    assert "has 1 value read as float32" in wrong_dim_message("b", 1, 512, "float32")
    assert "has 3 values read as float32" in wrong_dim_message("b", 3, 512, "float32")
