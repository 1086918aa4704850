"""POST /embed and /embed/batch: crops in, appearance embeddings out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from app.api.deps import ServiceDep, SettingsDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_responses
from app.api.inputs import image_request_body, read_images
from app.api.media_types import BodyMediaTypes
from app.api.schemas import (
    EmbedBatchJSONRequest,
    EmbedBatchResponse,
    EmbedJSONRequest,
    EmbedResponse,
    WireDtype,
)
from app.api.strict import StrictRoute
from app.codec import encode_embedding, encode_embeddings

router = APIRouter(tags=["embeddings"], route_class=StrictRoute)

DtypeQuery = Annotated[
    WireDtype,
    Query(description="float16 halves the bytes (1024 for 512 dims) for clients storing many."),
]

_IMAGE_ERRORS = error_responses(400, 401, 408, 413, 415, 422, 503, 504, 500)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed one person crop",
    description='One image file, as a multipart file field `image` or JSON `{"image": '
    '"<base64>"}`. Returns its L2-normalised CLIP image embedding.',
    responses=_IMAGE_ERRORS,
    openapi_extra=image_request_body("image", many=False, json_model=EmbedJSONRequest),
    dependencies=[Depends(BodyMediaTypes("image"))],
)
async def embed(
    request: Request, service: ServiceDep, settings: SettingsDep, dtype: DtypeQuery = "float32"
) -> EmbedResponse:
    payload = await read_images(
        request, settings, field_name="image", many=False, json_model=EmbedJSONRequest
    )
    rows = await unless_disconnected(request, service.embed(payload.images, payload.locations))
    info = service.encoder.info
    return EmbedResponse(
        embedding=encode_embedding(rows[0], dtype), dim=rows.shape[1], model=info.model, dtype=dtype
    )


@router.post(
    "/embed/batch",
    response_model=EmbedBatchResponse,
    summary="Embed several person crops",
    description='Repeated multipart file field `images`, or JSON `{"images": [...]}`. '
    "Embeddings come back in input order. One bad image fails the request, and the "
    "error names it (`images[3]: ...`).",
    responses=_IMAGE_ERRORS,
    openapi_extra=image_request_body("images", many=True, json_model=EmbedBatchJSONRequest),
    dependencies=[Depends(BodyMediaTypes("images"))],
)
async def embed_batch(
    request: Request, service: ServiceDep, settings: SettingsDep, dtype: DtypeQuery = "float32"
) -> EmbedBatchResponse:
    payload = await read_images(
        request, settings, field_name="images", many=True, json_model=EmbedBatchJSONRequest
    )
    rows = await unless_disconnected(request, service.embed(payload.images, payload.locations))
    return EmbedBatchResponse(
        embeddings=encode_embeddings(rows, dtype),
        dim=rows.shape[1],
        model=service.encoder.info.model,
        dtype=dtype,
    )
