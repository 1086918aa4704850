"""POST /embed/frame: a whole camera frame and the detector's boxes in, one embedding (and
optionally one outfit descriptor) per box out."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from app.api.deps import AnalysisDep, ServiceDep, SettingsDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_responses
from app.api.inputs import image_request_body, read_images
from app.api.media_types import BodyMediaTypes
from app.api.routes.analyze import garment_model
from app.api.routes.embed import DtypeQuery
from app.api.schemas import (
    BOXES_DESCRIPTION,
    EmbedFrameJSONRequest,
    EmbedFrameResponse,
    OutfitDescriptor,
)
from app.api.strict import StrictRoute, json_error
from app.codec import encode_embeddings
from app.errors import ValidationFailed
from app.inference.frames import read_boxes

router = APIRouter(tags=["embeddings"], route_class=StrictRoute)

_FRAME_FIELDS: dict[str, Any] = {
    "boxes": {
        "type": "string",
        "contentMediaType": "application/json",
        "description": f"JSON text. {BOXES_DESCRIPTION}",
        "examples": ["[[0, 0, 8, 16]]"],
    },
    "analyze": {
        "type": "boolean",
        "default": False,
        "description": "Also describe each box's outfit (`descriptors`).",
    },
}


_ERRORS = {
    400: (
        "The frame is not a decodable image, bad base64 or JSON, or a malformed body.",
        "invalid_image",
        "image: file is not a decodable image; send JPEG, PNG, WebP, BMP, GIF or TIFF",
    ),
    413: (
        "Upload bytes or frame pixels over the limit, more boxes than CLIP_MAX_BATCH_IMAGES, "
        "or, with analyze, boxes x 3 model inputs over CLIP_MAX_QUEUE.",
        "payload_too_large",
        "70 boxes in one frame, over the limit of 64 (CLIP_MAX_BATCH_IMAGES); split them "
        "over several requests",
    ),
    422: (
        "A box that is not four numbers, is empty or reversed, lies outside the frame or is "
        "under 8x16 pixels once clipped (named by its index); a missing or unexpected field.",
        "validation_error",
        "boxes[3] [1900, 40, 2100, 300] lies entirely outside the 1920x1080 frame "
        "(coordinates are pixels of the frame as decoded, EXIF orientation applied)",
    ),
}


def _frame_request_body() -> dict[str, Any]:
    body = image_request_body(
        "image", many=False, json_model=EmbedFrameJSONRequest, extra=_FRAME_FIELDS
    )
    body["requestBody"]["content"]["multipart/form-data"]["schema"]["required"].append("boxes")
    return body


@router.post(
    "/embed/frame",
    response_model=EmbedFrameResponse,
    summary="Embed the people boxed in a whole frame",
    description="A camera frame as multipart file field `image` with the detector's boxes "
    'as form field `boxes` (JSON text), or JSON `{"image": "<base64>", "boxes": [...]}`. '
    "One embedding per box, in box order, equal to what /embed gives for the same pixels "
    "cut out; the frame is decoded once. Bad boxes get 422 naming the box; boxes partly "
    "outside the frame are clipped, and `boxes` in the answer says how each was used.",
    responses=error_responses(400, 401, 408, 413, 415, 422, 503, 504, 500, specific=_ERRORS),
    openapi_extra=_frame_request_body(),
    dependencies=[Depends(BodyMediaTypes("image", ("boxes",), ("analyze",)))],
)
async def embed_frame(
    request: Request,
    service: ServiceDep,
    analysis: AnalysisDep,
    settings: SettingsDep,
    dtype: DtypeQuery = "float32",
) -> EmbedFrameResponse:
    payload = await read_images(
        request,
        settings,
        field_name="image",
        many=False,
        json_model=EmbedFrameJSONRequest,
        options={"boxes": str, "analyze": bool},
    )
    boxes = read_boxes(_boxes_field(payload.options.get("boxes")), settings.max_batch_images)
    descriptors: list[OutfitDescriptor] | None = None
    if payload.options.get("analyze", False):
        used, outfits = await unless_disconnected(
            request, analysis.analyze_frame(payload.images[0], boxes)
        )
        rows = np.array([outfit.embedding for outfit in outfits], np.float32)
        descriptors = [
            OutfitDescriptor(top=garment_model(o.top), bottom=garment_model(o.bottom))
            for o in outfits
        ]
    else:
        used, rows = await unless_disconnected(
            request, service.embed_frame(payload.images[0], boxes)
        )
    return EmbedFrameResponse(
        embeddings=encode_embeddings(rows.reshape(len(used), service.output_dim), dtype),
        boxes=[list(box) for box in used],
        dim=service.output_dim,
        model=service.encoder.info.model,
        dtype=dtype,
        descriptors=descriptors,
    )


def _boxes_field(value: Any) -> Any:
    """`boxes` as sent: already a list from a JSON body, JSON text from a form."""
    if value is None:
        raise ValidationFailed(
            "field `boxes` is missing: send the detector's boxes as JSON text, "
            "-F 'boxes=[[x1, y1, x2, y2], ...]' (\"[]\" for a frame with nobody in it)"
        )
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except RecursionError:
        raise ValidationFailed(
            "`boxes` is nested too deeply; send [[x1, y1, x2, y2], ...]"
        ) from None
    except ValueError as exc:  # not JSON, or an integer of over 4300 digits
        raise ValidationFailed(
            f"`boxes` is not valid JSON ({json_error(exc)}); send [[x1, y1, x2, y2], ...]"
        ) from None
