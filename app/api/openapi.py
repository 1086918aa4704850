"""The OpenAPI document, completed with what route decorators cannot say.

Limits are settings, read at startup, so the maxima a client may send (images per
batch, queries, gallery, top_k) are written into the schema here, from the settings
the app runs with. The error body is registered once for every error response, and
/similarity's two forms are documented as the `oneOf` they are.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.api.schemas import (
    ErrorDetail,
    ErrorResponse,
    PairSimilarityRequest,
    SearchSimilarityRequest,
)
from app.codec import encode_embedding
from app.config import Settings

DEFAULT_DIM = 512  # ViT-B-32's, for a schema asked for before the model has loaded

_COMPONENTS: tuple[type[BaseModel], ...] = (
    ErrorDetail,
    ErrorResponse,
    PairSimilarityRequest,
    SearchSimilarityRequest,
)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # Built on first request, after startup: the model's dimension is known then.
            service = getattr(app.state, "service", None)
            complete(document, settings, service.output_dim if service else DEFAULT_DIM)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], settings: Settings, dim: int = DEFAULT_DIM) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in _COMPONENTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    _limit_search(schemas, settings)
    _similarity_examples(schemas, dim)
    paths = document.get("paths", {})
    # Both forms of /embed/batch are written inline by image_request_body (no $ref).
    batch = paths.get("/embed/batch", {}).get("post", {}).get("requestBody", {}).get("content", {})
    for form in batch.values():
        form["schema"]["properties"]["images"]["maxItems"] = settings.max_batch_images
    frame = paths.get("/embed/frame", {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in frame:
        boxes = frame["application/json"]["schema"]["properties"]["boxes"]
        boxes["maxItems"] = settings.max_batch_images
    search = paths.get("/similarity", {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in search:
        search["application/json"]["schema"] = {
            "oneOf": [
                {"$ref": "#/components/schemas/PairSimilarityRequest"},
                {"$ref": "#/components/schemas/SearchSimilarityRequest"},
            ]
        }
        # The model the route reads both forms with, referenced by nothing now: a
        # generated client would carry a third request class nobody sends.
        if '"#/components/schemas/SimilarityRequest"' not in json.dumps(document):
            schemas.pop("SimilarityRequest", None)


def _similarity_examples(schemas: dict[str, Any], dim: int) -> None:
    """Examples of the service's own dimension: /similarity refuses any other, so a
    shorter example would only demonstrate a 422."""
    first, second = np.zeros(dim, np.float32), np.zeros(dim, np.float32)
    first[0], second[:2] = 1.0, (0.6, 0.8)  # cosine 0.6
    a, b = encode_embedding(first), encode_embedding(second)
    pair = {"a": a, "b": b}
    search = {"queries": [a], "gallery": [a, b], "top_k": 1}
    examples = {
        "PairSimilarityRequest": [pair],
        "SearchSimilarityRequest": [search],
        "SimilarityRequest": [pair, search],
    }
    for name, values in examples.items():
        if name in schemas:
            schemas[name]["examples"] = values


def _limit_search(schemas: dict[str, Any], settings: Settings) -> None:
    for name in ("SimilarityRequest", "SearchSimilarityRequest"):
        properties = schemas.get(name, {}).get("properties", {})
        if "top_k" in properties:
            properties["top_k"]["maximum"] = settings.max_top_k
        for field, limit in (("queries", settings.max_queries), ("gallery", settings.max_gallery)):
            target = properties.get(field)
            if target is None:
                continue
            # Optional in SimilarityRequest (anyOf [array, null]); required in the form.
            for option in target.get("anyOf", [target]):
                if option.get("type") == "array":
                    option["maxItems"] = limit
