"""Liveness, readiness and what is being served."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__
from app.api.deps import ServiceDep
from app.api.errors import error_response, error_responses
from app.api.schemas import BatcherInfo, InfoResponse, LimitsInfo, StatusResponse

open_router = APIRouter(tags=["service"])
router = APIRouter(tags=["service"])


@open_router.get("/health", response_model=StatusResponse, summary="Liveness")
async def health() -> StatusResponse:
    """200 while the process serves requests. Never touches the model."""
    return StatusResponse(status="ok")


@open_router.get(
    "/ready",
    response_model=StatusResponse,
    summary="Readiness",
    responses=error_responses(
        503,
        specific={
            503: (
                "Not ready: the model is not loaded or warmed up yet, the service is "
                "stopping, or its forward passes keep failing; retry after `Retry-After`.",
                "not_ready",
                "the model is not loaded or the service is stopping",
            )
        },
    ),
)
async def ready(request: Request) -> StatusResponse | JSONResponse:
    """200 once the model is loaded and warmed up and the batcher runs; 503 otherwise
    (loading, shutting down)."""
    service = getattr(request.app.state, "service", None)
    if getattr(request.app.state, "draining", False):
        return error_response(
            503, "shutting_down", "the service is shutting down", {"Retry-After": "5"}
        )
    if service is not None and service.batcher.running and not await service.model_works():
        return error_response(
            503,
            "model_failing",
            "the model's recent forward passes failed; see the service log",
            {"Retry-After": "5"},
        )
    if service is None or not service.batcher.running:
        return error_response(
            503,
            "not_ready",
            "the model is not loaded or the service is stopping",
            {"Retry-After": "5"},
        )
    return StatusResponse(status="ready")


@router.get(
    "/info",
    response_model=InfoResponse,
    summary="Model and settings",
    responses=error_responses(401, 503),
)
async def info(service: ServiceDep) -> InfoResponse:
    model = service.encoder.info
    settings = service.settings
    return InfoResponse(
        model=model.model,
        dim=service.output_dim,
        projection=service.projection.kind if service.projection else None,
        device=model.device,
        precision=model.precision,
        backend=model.backend,
        image_size=list(model.image_size),
        resize_mode=model.resize_mode,
        batcher=BatcherInfo(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            queue_depth=service.batcher.queue_depth,
            decode_workers=service.decode_workers,
            decode_processes=service.decode_processes,
            forward_streams=service.batcher.concurrency,
            batches=service.batcher.stats.batches,
            mean_batch_size=service.batcher.stats.items / max(1, service.batcher.stats.batches),
        ),
        limits=LimitsInfo.model_validate(settings.model_dump(include=set(LimitsInfo.model_fields))),
        version=__version__,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    # One media type, without parameters: CONTENT_TYPE_LATEST's "; version=...; charset"
    # as a second key was a media type generated clients could not read.
    responses={
        200: {"description": f"Prometheus text format ({CONTENT_TYPE_LATEST})."},
        **error_responses(401),
    },
)
async def metrics(request: Request) -> Response:
    """Requests by endpoint and status, request latency, time queued and in the forward
    pass, batch sizes, queue depth and rejections by reason, in Prometheus text format."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
