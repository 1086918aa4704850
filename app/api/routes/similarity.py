"""POST /similarity: cosine of a pair, or top-k gallery matches for each query."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends

from app.api.deps import SettingsDep, require_json
from app.api.errors import error_responses
from app.api.schemas import (
    Match,
    PairSimilarityResponse,
    SearchSimilarityResponse,
    SimilarityRequest,
)
from app.codec import EmbeddingDecodeError, decode_embedding
from app.errors import InvalidEmbedding, PayloadTooLarge, ValidationFailed

router = APIRouter(tags=["similarity"])


@router.post(
    "/similarity",
    response_model=PairSimilarityResponse | SearchSimilarityResponse,
    summary="Compare embeddings",
    description="Send `a` and `b` for the cosine similarity of a pair, or `queries`, "
    "`gallery` and `top_k` for each query's best gallery matches. Embeddings need not be "
    "normalised; all must have the same dimension.",
    responses=error_responses(400, 401, 413, 415, 422, 500),
    dependencies=[Depends(require_json)],
)
def similarity(
    body: SimilarityRequest, settings: SettingsDep
) -> PairSimilarityResponse | SearchSimilarityResponse:
    pair = body.a is not None or body.b is not None
    search = body.queries is not None or body.gallery is not None
    if pair == search:
        raise ValidationFailed("send either `a` and `b`, or `queries` and `gallery`, not both")
    if pair:
        if body.a is None or body.b is None:
            raise ValidationFailed("a pair needs both `a` and `b`")
        a, b = _unit_rows([body.a], "a", body.dtype), _unit_rows([body.b], "b", body.dtype)
        _same_dim(a, b, "a", "b")
        return PairSimilarityResponse(similarity=_clip(float(a[0] @ b[0])))
    if body.queries is None or body.gallery is None:
        raise ValidationFailed("a search needs both `queries` and `gallery`")
    for name, count, limit, setting in (
        ("queries", len(body.queries), settings.max_queries, "CLIP_MAX_QUERIES"),
        ("gallery", len(body.gallery), settings.max_gallery, "CLIP_MAX_GALLERY"),
        ("top_k", body.top_k, settings.max_top_k, "CLIP_MAX_TOP_K"),
    ):
        if count > limit:
            raise PayloadTooLarge(f"{name} is {count}, over the limit of {limit} ({setting})")
    queries = _unit_rows(body.queries, "queries", body.dtype, indexed=True)
    gallery = _unit_rows(body.gallery, "gallery", body.dtype, indexed=True)
    _same_dim(queries, gallery, "queries", "gallery")
    scores = queries @ gallery.T
    k = min(body.top_k, gallery.shape[0])
    # argpartition then sort of the k best: O(n) per query rather than a full sort.
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    matches = []
    for row, candidates in zip(scores, best, strict=True):
        ordered = candidates[np.argsort(-row[candidates], kind="stable")]
        matches.append([Match(index=int(i), similarity=_clip(float(row[i]))) for i in ordered])
    return SearchSimilarityResponse(matches=matches)


def _unit_rows(
    texts: list[str], name: str, dtype: str, indexed: bool = False
) -> npt.NDArray[np.float32]:
    rows: list[npt.NDArray[np.float32]] = []
    for i, text in enumerate(texts):
        where = f"{name}[{i}]" if indexed else name
        try:
            vector = decode_embedding(text, dtype)
        except EmbeddingDecodeError as exc:
            raise InvalidEmbedding(f"{where}: {exc}") from None
        if indexed and rows and vector.shape != rows[0].shape:
            raise ValidationFailed(
                f"{where} has {vector.shape[0]} dims but {name}[0] has {rows[0].shape[0]}; "
                "all embeddings must come from the same model"
            )
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if norm == 0.0 or not np.isfinite(norm):
            raise InvalidEmbedding(f"{where} has no direction (zero or overflowing norm)")
        rows.append((vector / norm).astype(np.float32))
    return np.stack(rows)


def _same_dim(
    left: npt.NDArray[np.float32], right: npt.NDArray[np.float32], a: str, b: str
) -> None:
    if left.shape[1] != right.shape[1]:
        raise ValidationFailed(
            f"{a} has {left.shape[1]} dims but {b} has {right.shape[1]}; both must come from "
            "the same model"
        )


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))
