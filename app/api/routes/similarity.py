"""POST /similarity: cosine of a pair, or top-k gallery matches for each query.

The numbers are app.search's; this route checks sizes (before decoding anything), then
hands the work to the app's SearchExecutor (one thread of its own), so decoding, scoring
and writing the JSON of a search never run on the event loop.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from app.api.deps import SearchExecutorDep, ServiceDep, SettingsDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_responses
from app.api.media_types import JSON_ONLY
from app.api.schemas import (
    PairSimilarityResponse,
    SearchSimilarityResponse,
    SimilarityRequest,
    WireDtype,
)
from app.api.strict import StrictRoute, refuse_unknown_query_parameters
from app.errors import ValidationFailed
from app.search import SearchLimits, check_search_size, pair_similarity, search_json

router = APIRouter(tags=["similarity"], route_class=StrictRoute)

# A pair this small (two 512-dim float32 embeddings are 5.5 kB) is decoded in microseconds,
# less than the thread hop would cost; larger ones go to the executor like a search.
INLINE_PAIR_CHARS = 64 * 1024

_SIMILARITY_ERRORS = {
    400: (
        "An embedding that is not base64, of a byte length no dtype makes, or with NaN or "
        "infinite values; or a body that is not JSON.",
        "invalid_embedding",
        "gallery[3]: embedding contains NaN or infinite values",
    ),
    422: (
        "Well-formed request that fails validation: a dimension that is not the "
        "service's, both or neither form, top_k < 1.",
        "validation_error",
        "a has 256 values, b has 512; this service's embeddings have 512 (dim in /info)",
    ),
}


@router.post(
    "/similarity",
    response_model=PairSimilarityResponse | SearchSimilarityResponse,
    summary="Compare embeddings",
    description="Send `a` and `b` for the cosine similarity of a pair, or `queries`, "
    "`gallery` and `top_k` for each query's best gallery matches. Embeddings need not be "
    "normalised; all must have this service's dimension (`dim` in /info). A search is "
    "bounded by its counts "
    "(CLIP_MAX_QUERIES, CLIP_MAX_GALLERY, CLIP_MAX_TOP_K) and by the work they imply: "
    "queries x gallery scores (CLIP_MAX_SEARCH_SCORES) and queries x min(top_k, gallery) "
    "matches (CLIP_MAX_SEARCH_MATCHES); past any of them the answer is 413.",
    responses=error_responses(
        400, 401, 408, 413, 415, 422, 503, 504, 500, specific=_SIMILARITY_ERRORS
    ),
    dependencies=[Depends(JSON_ONLY)],
)
async def similarity(
    request: Request,
    body: SimilarityRequest,
    settings: SettingsDep,
    executor: SearchExecutorDep,
    service: ServiceDep,
    dtype: Annotated[
        WireDtype | None,
        Query(
            description="Encoding of all the embeddings sent, as the body's `dtype` (which "
            "it must not contradict): for clients that pass /embed's `?dtype=` along."
        ),
    ] = None,
) -> PairSimilarityResponse | Response:
    refuse_unknown_query_parameters(
        request, {"dtype"}, "`a` and `b`, or `queries`, `gallery` and `top_k`, and `dtype`"
    )
    if dtype is not None and body.dtype is not None and body.dtype != dtype:
        raise ValidationFailed(
            f'?dtype={dtype} contradicts the body\'s "dtype": "{body.dtype}"; send one'
        )
    wire_dtype = dtype or body.dtype or "float32"
    # Lengths alone cannot tell float16 from float32: the model's dimension can.
    dim = service.output_dim
    pair = body.a is not None or body.b is not None
    search = body.queries is not None or body.gallery is not None
    if pair and search:
        raise ValidationFailed("send either `a` and `b`, or `queries` and `gallery`, not both")
    if not pair and not search:
        raise ValidationFailed(
            "send `a` and `b` for the similarity of a pair, or `queries` and `gallery` for a search"
        )
    if pair:
        if body.a is None or body.b is None:
            absent = "a" if body.a is None else "b"
            how = "null" if absent in body.model_fields_set else "missing"
            raise ValidationFailed(f"a pair needs both `a` and `b`; `{absent}` is {how}")
        if "top_k" in body.model_fields_set:
            # Validated with the rest, then unused: the client meant a search.
            raise ValidationFailed(
                "`top_k` belongs to a search (`queries` and `gallery`); a pair (`a` and `b`) "
                "takes only `dtype` besides"
            )
        work = partial(pair_similarity, body.a, body.b, wire_dtype, dim)
        if len(body.a) + len(body.b) <= INLINE_PAIR_CHARS:
            return PairSimilarityResponse(similarity=work())
        similarity = await unless_disconnected(
            request, executor.run(work, settings.request_timeout_s)
        )
        return PairSimilarityResponse(similarity=similarity)
    if body.queries is None or body.gallery is None:
        raise ValidationFailed("a search needs both `queries` and `gallery`")
    check_search_size(
        len(body.queries), len(body.gallery), body.top_k, SearchLimits.from_settings(settings)
    )
    job = partial(search_json, body.queries, body.gallery, body.top_k, wire_dtype, dim)
    content = await unless_disconnected(request, executor.run(job, settings.request_timeout_s))
    # Already JSON text: a Response skips FastAPI's validation and encoding of the model.
    return Response(content=content, media_type="application/json")
