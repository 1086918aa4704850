"""POST /analyze: the outfit descriptor of one person crop."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.analysis.analyzer import GarmentDescription
from app.api.deps import AnalysisDep, SettingsDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_responses
from app.api.inputs import image_request_body, read_images
from app.api.media_types import BodyMediaTypes
from app.api.routes.embed import DtypeQuery
from app.api.schemas import AnalyzeJSONRequest, AnalyzeResponse, ColorShareModel, Garment
from app.api.strict import StrictRoute
from app.codec import encode_embedding

router = APIRouter(tags=["analysis"], route_class=StrictRoute)

_INCLUDE_EMBEDDING = {
    "include_embedding": {
        "type": "boolean",
        "default": False,
        "description": "Also return the crop's embedding.",
    }
}


@router.post(
    "/analyze",
    response_model=AnalyzeResponse,
    summary="Describe a person's outfit",
    description="Upper and lower garment: type by CLIP zero-shot, dominant colour and "
    "named colour shares. Input as /embed, plus `include_embedding`. Costs two images in "
    "the shared forward pass (three with the embedding).",
    responses=error_responses(400, 401, 408, 413, 415, 422, 503, 504, 500),
    openapi_extra=image_request_body(
        "image", many=False, json_model=AnalyzeJSONRequest, extra=_INCLUDE_EMBEDDING
    ),
    dependencies=[Depends(BodyMediaTypes("image", optional=("include_embedding",)))],
)
async def analyze(
    request: Request, analysis: AnalysisDep, settings: SettingsDep, dtype: DtypeQuery = "float32"
) -> AnalyzeResponse:
    payload = await read_images(
        request,
        settings,
        field_name="image",
        many=False,
        json_model=AnalyzeJSONRequest,
        options={"include_embedding": bool},
    )
    include = bool(payload.options.get("include_embedding", False))
    work = analysis.analyze(payload.images[0], payload.locations[0], include)
    outfit = await unless_disconnected(request, work)
    return AnalyzeResponse(
        top=garment_model(outfit.top),
        bottom=garment_model(outfit.bottom),
        embedding=None if outfit.embedding is None else encode_embedding(outfit.embedding, dtype),
        dtype=dtype,
    )


def garment_model(description: GarmentDescription) -> Garment:
    return Garment(
        type=description.type,
        type_score=description.type_score,
        color=description.color,
        colors=[
            ColorShareModel(name=c.name, rgb=c.rgb, fraction=c.fraction) for c in description.colors
        ],
    )
