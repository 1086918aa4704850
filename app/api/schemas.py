"""Request and response bodies, with the descriptions and examples /docs shows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from app.codec import encode_embedding

# A whole 512-value, unit-length vector: beside `dim: 512`, a shorter one would decode to
# fewer values than the example says, and a client checking its decoder on it would fail.
_EXAMPLE_DIM = 512
_EXAMPLE_EMBEDDING = encode_embedding([(-1) ** i / _EXAMPLE_DIM**0.5 for i in range(_EXAMPLE_DIM)])
# A whole, valid image (an 8x16 PNG: red top, blue bottom), so "Try it out" in /docs and
# schema-driven clients get a 200 from the examples as they stand.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAQCAIAAACk6KkqAAAAHElEQVR42mM8YWPEgA0wMeAAg1OCJYErajj4AwCW"
    "ZgIck9HrmwAAAABJRU5ErkJggg=="
)

WireDtype = Literal["float32", "float16"]

EMBEDDING_DESCRIPTION = (
    "Standard base64 (with padding) of little-endian float32 values (float16 with "
    "`?dtype=float16`), L2-normalised; `dim` values, 4 (or 2) bytes each."
)


# Said in the schema only: the service answers an empty string with its own 400, which
# names the field ("image: image is empty (0 bytes)"), rather than a generic 422.
_NOT_EMPTY: dict[str, JsonValue] = {"minLength": 1}
_NONE_EMPTY: dict[str, JsonValue] = {"items": {"type": "string", "minLength": 1}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedJSONRequest(_Strict):
    image: str = Field(
        ...,
        json_schema_extra=_NOT_EMPTY,
        description="Base64 of the image file (JPEG, PNG, WebP, BMP, GIF, TIFF). "
        "A `data:image/...;base64,` prefix is accepted.",
        examples=[EXAMPLE_IMAGE],
    )


class EmbedBatchJSONRequest(_Strict):
    images: list[str] = Field(
        ...,
        min_length=1,
        json_schema_extra=_NONE_EMPTY,
        description="Base64 of each image file; results come back in this order.",
        examples=[[EXAMPLE_IMAGE, EXAMPLE_IMAGE]],
    )


class EmbedResponse(BaseModel):
    embedding: str = Field(..., description=EMBEDDING_DESCRIPTION, examples=[_EXAMPLE_EMBEDDING])
    dim: int = Field(..., description="Number of values in the embedding.", examples=[_EXAMPLE_DIM])
    model: str = Field(..., description="The model that made it.", examples=["ViT-B-32/openai"])
    dtype: WireDtype = Field("float32", description="Encoding of the values: 4 or 2 bytes each.")


class EmbedBatchResponse(BaseModel):
    embeddings: list[str] = Field(
        ...,
        description=f"One embedding per input image, in input order. {EMBEDDING_DESCRIPTION}",
        examples=[[_EXAMPLE_EMBEDDING, _EXAMPLE_EMBEDDING]],
    )
    dim: int = Field(..., examples=[_EXAMPLE_DIM])
    model: str = Field(..., examples=["ViT-B-32/openai"])
    dtype: WireDtype = Field("float32", description="Encoding of the values: 4 or 2 bytes each.")


# No default in the schema: a generated client sends a field's default, which would
# then contradict a `?dtype=float16` in the URL.
_SIMILARITY_DTYPE = (
    "Encoding of all the embeddings sent: float32 unless this or the URL's `?dtype=` "
    "says float16 (the two must not contradict each other)."
)


class SimilarityRequest(_Strict):
    """Either a pair (`a`, `b`) or a search (`queries`, `gallery`, `top_k`)."""

    a: str | None = Field(None, description="First embedding (base64 float32).")
    b: str | None = Field(None, description="Second embedding (base64 float32).")
    queries: list[str] | None = Field(
        None,
        min_length=1,
        description="Query embeddings (base64 float32). At most CLIP_MAX_QUERIES, and "
        "queries x gallery at most CLIP_MAX_SEARCH_SCORES.",
    )
    gallery: list[str] | None = Field(
        None,
        min_length=1,
        description="Gallery embeddings to rank for each query. At most CLIP_MAX_GALLERY.",
    )
    top_k: int = Field(
        5,
        ge=1,
        strict=True,  # 5, not "5" or true: a client sending those has a bug to hear about
        description="Matches returned per query, best first; capped at the gallery size. "
        "At most CLIP_MAX_TOP_K, and queries x min(top_k, gallery) at most "
        "CLIP_MAX_SEARCH_MATCHES.",
    )
    dtype: WireDtype | None = Field(None, description=_SIMILARITY_DTYPE)

    # Examples of the model's own dimension are added to the schema at startup (openapi.py).
    model_config = ConfigDict(extra="forbid")


class PairSimilarityRequest(_Strict):
    """The pair form of /similarity (documentation: the route reads SimilarityRequest)."""

    a: str = Field(..., description="First embedding (base64).", json_schema_extra=_NOT_EMPTY)
    b: str = Field(..., description="Second embedding (base64).", json_schema_extra=_NOT_EMPTY)
    dtype: WireDtype | None = Field(None, description=_SIMILARITY_DTYPE)


class SearchSimilarityRequest(_Strict):
    """The search form of /similarity (documentation: the route reads SimilarityRequest)."""

    queries: list[str] = Field(
        ..., min_length=1, description="Query embeddings (base64).", json_schema_extra=_NONE_EMPTY
    )
    gallery: list[str] = Field(
        ..., min_length=1, description="Gallery embeddings (base64).", json_schema_extra=_NONE_EMPTY
    )
    top_k: int = Field(5, ge=1, strict=True, description="Matches returned per query.")
    dtype: WireDtype | None = Field(None, description=_SIMILARITY_DTYPE)


class Match(BaseModel):
    index: int = Field(..., description="Position of the item in `gallery`.")
    similarity: float = Field(..., description="Cosine similarity, -1 to 1.")


class PairSimilarityResponse(BaseModel):
    similarity: float = Field(..., description="Cosine similarity of a and b, -1 to 1.")


class SearchSimilarityResponse(BaseModel):
    matches: list[list[Match]] = Field(
        ...,
        description="One list per query, in query order; each holds min(top_k, gallery "
        "size) matches, best first, equal similarities in gallery order.",
    )


class ErrorDetail(BaseModel):
    code: str = Field(
        ..., description="Stable snake_case code to branch on.", examples=["invalid_image"]
    )
    message: str = Field(
        ...,
        description="What went wrong and what to change.",
        examples=["images[2]: image data is truncated or corrupt"],
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatcherInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    queue_depth: int
    decode_workers: int = Field(..., description="Threads decoding and preprocessing images.")
    decode_processes: int = Field(
        ..., description="Processes preparing /embed images beside the threads (0: none)."
    )
    forward_streams: int = Field(
        ...,
        description="Forward passes run at once (OpenVINO CPU streams, one batch each; 1 on "
        "torch and ONNX Runtime).",
    )
    batches: int = Field(..., description="Forward passes run since startup.")
    mean_batch_size: float = Field(..., description="Images per forward pass, on average.")


class LimitsInfo(BaseModel):
    """Every bound the service enforces, as configured (the CLIP_* variable of each)."""

    max_upload_bytes: int
    max_image_pixels: int
    max_request_pixels: int
    max_pixels_in_flight: int
    max_batch_images: int
    max_queue: int
    max_concurrent_requests: int
    request_timeout_s: float
    max_queries: int
    max_gallery: int
    max_top_k: int
    max_search_scores: int
    max_search_matches: int


class InfoResponse(BaseModel):
    model: str = Field(..., examples=["ViT-B-32/openai"])
    dim: int = Field(..., examples=[_EXAMPLE_DIM])
    device: str = Field(..., examples=["cpu"])
    precision: str = Field(..., examples=["fp32"])
    backend: str = Field(
        ...,
        description="Runtime of the image tower: torch, openvino or onnxruntime.",
        examples=["openvino"],
    )
    projection: str | None = Field(
        None, description="Kind of CLIP_PROJECTION applied (pca, pca-whiten, centre, linear)."
    )
    image_size: list[int] = Field(..., examples=[[224, 224]])
    resize_mode: str = Field(..., examples=["shortest"])
    batcher: BatcherInfo
    limits: LimitsInfo
    version: str


class StatusResponse(BaseModel):
    status: str = Field(..., examples=["ok"])


class AnalyzeJSONRequest(_Strict):
    image: str = Field(
        ...,
        json_schema_extra=_NOT_EMPTY,
        description="Base64 of one person crop (JPEG, PNG, WebP, BMP, GIF, TIFF).",
        examples=[EXAMPLE_IMAGE],
    )
    include_embedding: bool = Field(
        False,
        strict=True,  # true or false, not 0 or "yes": JSON has booleans
        description="Also return the crop's embedding (one more image in the forward pass).",
    )


class ColorShareModel(BaseModel):
    name: str = Field(..., description="One of the 11 basic colour terms.", examples=["blue"])
    rgb: str = Field(..., description="Mean colour of this share, #rrggbb.", examples=["#2a4f9c"])
    fraction: float = Field(
        ..., description="Share of the region's garment pixels, 0 to 1.", examples=[0.71]
    )


class Garment(BaseModel):
    type: str = Field(..., description="Garment label from the vocabulary.", examples=["t-shirt"])
    type_score: float = Field(
        ..., description="Zero-shot probability of `type` among the labels.", examples=[0.62]
    )
    color: str = Field(..., description="Dominant colour name.", examples=["blue"])
    colors: list[ColorShareModel] = Field(..., description="Named colours, largest share first.")


class AnalyzeResponse(BaseModel):
    top: Garment = Field(..., description="Upper-body garment.")
    bottom: Garment = Field(..., description="Lower-body garment.")
    embedding: str | None = Field(
        None, description=f"The crop's embedding when asked for, else null. {EMBEDDING_DESCRIPTION}"
    )
    dtype: WireDtype = Field("float32", description="Encoding of `embedding`.")


_BOX_ITEMS: dict[str, JsonValue] = {
    "type": "array",
    "items": {"type": "number"},
    "minItems": 4,
    "maxItems": 4,
    "description": "[x1, y1, x2, y2]: left, top, right, bottom in the frame's pixels.",
}
BOXES_DESCRIPTION = (
    "The detector's person boxes, `[[x1, y1, x2, y2], ...]`, in pixels of the frame as "
    "decoded (EXIF orientation applied); floats are widened to whole pixels (x1, y1 "
    "floored, x2, y2 ceiled) and clipped to the frame. At most CLIP_MAX_BATCH_IMAGES. An "
    "empty list is a frame with nobody in it."
)


class EmbedFrameJSONRequest(_Strict):
    image: str = Field(
        ...,
        json_schema_extra=_NOT_EMPTY,
        description="Base64 of the whole frame (JPEG, PNG, WebP, BMP, GIF, TIFF). "
        "A `data:image/...;base64,` prefix is accepted.",
        examples=[EXAMPLE_IMAGE],
    )
    # Checked box by box by the service (app/inference/frames.py), so that JSON and
    # multipart clients get the same message naming the box; the schema says the shape.
    boxes: list[Any] = Field(
        ...,
        description=BOXES_DESCRIPTION,
        json_schema_extra={"items": _BOX_ITEMS},
        examples=[[[0, 0, 8, 16]]],
    )
    analyze: bool = Field(
        False,
        strict=True,
        description="Also describe each box's outfit (`descriptors`); costs two more "
        "images per box in the shared forward pass.",
    )


class OutfitDescriptor(BaseModel):
    top: Garment = Field(..., description="Upper-body garment.")
    bottom: Garment = Field(..., description="Lower-body garment.")


class EmbedFrameResponse(BaseModel):
    embeddings: list[str] = Field(
        ...,
        description=f"One embedding per box, in box order. {EMBEDDING_DESCRIPTION}",
        examples=[[_EXAMPLE_EMBEDDING]],
    )
    boxes: list[list[int]] = Field(
        ...,
        description="Each box as used: whole pixels, clipped to the frame, in box order.",
        examples=[[[0, 0, 8, 16]]],
    )
    dim: int = Field(..., examples=[_EXAMPLE_DIM])
    model: str = Field(..., examples=["ViT-B-32/openai"])
    dtype: WireDtype = Field("float32", description="Encoding of the values: 4 or 2 bytes each.")
    descriptors: list[OutfitDescriptor] | None = Field(
        None, description="Each box's outfit, in box order, when `analyze` was true; else null."
    )
