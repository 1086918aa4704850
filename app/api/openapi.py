"""The OpenAPI document, completed with what route decorators cannot say.

Limits are settings, read at startup, so the maxima a client may send (images per
batch, queries, gallery, top_k) are written into the schema here, from the settings
the app runs with. The error body is registered once for every error response, and
/similarity's two forms are documented as the `oneOf` they are.
"""

from __future__ import annotations

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
    for path, item in document.get("paths", {}).items():
        for operation in item.values():
            body = operation.get("requestBody", {}).get("content", {})
            form = body.get("multipart/form-data", {}).get("schema")
            if form is not None and path == "/embed/batch":
                form["properties"]["images"]["maxItems"] = settings.max_batch_images
            batch_json = body.get("application/json", {}).get("schema", {})
            if path == "/embed/batch":
                _set_max_items(batch_json, schemas, "images", settings.max_batch_images)
            if path == "/similarity" and "application/json" in body:
                body["application/json"]["schema"] = {
                    "oneOf": [
                        {"$ref": "#/components/schemas/PairSimilarityRequest"},
                        {"$ref": "#/components/schemas/SearchSimilarityRequest"},
                    ]
                }


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


def _set_max_items(schema: dict[str, Any], schemas: dict[str, Any], field: str, limit: int) -> None:
    reference = schema.get("$ref", "")
    target = schemas.get(reference.rsplit("/", 1)[-1], schema) if reference else schema
    properties = target.get("properties", {})
    if field in properties:
        properties[field]["maxItems"] = limit
