"""The ASGI application: `create_app(settings)` for tests and tools, `app` for uvicorn.

    python -m app --host 0.0.0.0 --port 8000      # production: graceful SIGTERM, exit 0
    uvicorn app.main:app --host 0.0.0.0 --port 8000

The model loads once, in the lifespan, before the server accepts connections; if it
cannot be loaded the process exits with a message naming the setting to change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.analysis.analyzer import OutfitAnalyzer
from app.analysis.garments import GarmentClassifiers, Vocabulary, VocabularyError
from app.analysis.service import AnalysisService
from app.api.body_limit import BodyLimitMiddleware
from app.api.concurrency import ConcurrencyLimitMiddleware
from app.api.errors import install_error_handlers
from app.api.head import HeadAsGetMiddleware
from app.api.media_types import declared_media_types
from app.api.openapi import install_openapi
from app.api.routes import analyze, embed, frame, similarity, system
from app.api.security import require_api_key
from app.config import Settings, load_settings
from app.inference.encoder import ImageEncoder
from app.inference.memory import (
    GPU_LIBRARIES,
    keep_large_blocks_mmapped,
    page_out_files,
    release_freed_memory,
)
from app.inference.model import ClipImageEncoder
from app.inference.projection import Projection, ProjectionError
from app.inference.service import EmbeddingService
from app.inference.weights import WeightsUnavailable
from app.observability import (
    Metrics,
    RequestObservability,
    configure_logging,
    lifecycle_log,
    set_log_level,
)
from app.search import SearchExecutor

logger = logging.getLogger("app")
# The routes that take work, behind the API keys where they are set.
_WORK_ROUTES = (embed, frame, analyze, similarity)

# (settings, the texts to embed while the text tower is at hand) -> the encoder
EncoderFactory = Callable[[Settings, Sequence[str]], ImageEncoder]

# Startup failures whose message names the setting to change: the message is the report,
# and a traceback after it would only bury it.
STARTUP_ERRORS: tuple[type[Exception], ...] = (WeightsUnavailable, VocabularyError, ProjectionError)

DESCRIPTION = """
Appearance embeddings of person crops for re-identification across cameras.

Post a crop (multipart file or JSON base64), get an L2-normalised CLIP image embedding
as base64 of little-endian float32. Concurrent requests share forward passes.
Every error is `{"error": {"code": "...", "message": "..."}}`.
"""


def create_app(
    settings: Settings | None = None, encoder_factory: EncoderFactory | None = None
) -> FastAPI:
    settings = settings or load_settings()
    load_encoder: EncoderFactory = encoder_factory or ClipImageEncoder.load

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        # Before loading, so that the startup peak is spared them too, and so that
        # what a conversion frees goes back at once instead of into the heaps.
        keep_large_blocks_mmapped()
        on_cpu_only = settings.device == "cpu" or not torch.cuda.is_available()
        if on_cpu_only:
            page_out_files(GPU_LIBRARIES)
        try:
            # Both before the seconds of loading: a bad file fails the start at once.
            vocabulary = Vocabulary.load(settings.garment_vocab)
            projection_file = Projection.read(settings.projection) if settings.projection else None
            # The prompts are embedded before the image tower is converted, so that
            # the text tower is gone by then (a lower startup peak).
            encoder = await asyncio.to_thread(load_encoder, settings, vocabulary.prompts())
            info = encoder.info
            projection = fitted_projection(
                projection_file,
                settings,
                info.model,
                info.dim,
                info.weights_sha256,
                (info.precision, info.backend),
            )
        except STARTUP_ERRORS as exc:
            logger.error("startup failed: %s", exc)
            raise  # ConciseStartupFailure keeps the server from printing its traceback
        if settings.warmup:
            await asyncio.to_thread(encoder.warm_up)
        classifiers = await asyncio.to_thread(build_garment_classifiers, encoder, vocabulary)
        release_freed_memory()
        if on_cpu_only:
            page_out_files(GPU_LIBRARIES)  # what loading touched again
        service = EmbeddingService(
            encoder, settings, observer=metrics.observe_batch, projection=projection
        )
        metrics.model_info.labels(info.model, info.backend, info.precision, info.device).set(1)
        metrics.queue_depth.set_function(lambda: service.batcher.queue_depth)
        metrics.images_in_flight.set_function(lambda: service.admission.images_in_flight)
        metrics.pixels_in_flight.set_function(lambda: service.admission.pixels_in_flight)
        await service.start()
        app.state.service = service
        analyzer = OutfitAnalyzer(
            classifiers, encoder.preprocess, settings.region_bounds, max(encoder.info.image_size)
        )
        analysis = AnalysisService(service, analyzer)
        app.state.analysis = analysis
        searches = app.state.searches = SearchExecutor()
        lifecycle_log.info(
            "ready: %s on %s, %s %s, %d dims, %d forward stream(s); API keys: %s",
            info.model,
            info.device,
            info.backend,
            info.precision,
            service.output_dim,
            info.streams,
            f"required ({len(settings.api_keys)} set)"
            if settings.api_keys
            else "none (every caller is served; set CLIP_API_KEYS to require one)",
        )
        try:
            yield
        finally:
            app.state.service = app.state.analysis = app.state.searches = None
            await service.stop(drain_timeout_s=min(settings.request_timeout_s, 10.0))
            analysis.stop()
            searches.shutdown()

    # Swagger UI and ReDoc assets from the fastapi-offline package, not a CDN: CCTV
    # networks are often closed, and /docs must still work there.
    app = FastAPIOffline(
        title="CLIP person re-ID embeddings",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # /embed/ is a 404 naming /embed, not a 307 with an empty body: clients that do not
        # follow redirects saw nothing to act on, and behind a TLS proxy the Location
        # Starlette builds says http://.
        redirect_slashes=False,
    )
    metrics = Metrics.create()
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.api_keys = [key.get_secret_value().encode() for key in settings.api_keys]
    app.state.service = None
    app.state.analysis = None
    app.state.searches = None
    app.state.draining = False  # set on SIGTERM by `python -m app`
    install_error_handlers(app)
    install_openapi(app, settings)
    # Lifespan only (every HTTP request passes straight through), so innermost.
    app.add_middleware(ConciseStartupFailure)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        read_timeout_s=settings.request_timeout_s,
        media_types=declared_media_types(m.router for m in _WORK_ROUTES),
    )
    # Before the body limit reads anything: a refusal costs no body bytes at all.
    app.add_middleware(ConcurrencyLimitMiddleware, max_requests=settings.max_concurrent_requests)
    app.add_middleware(HeadAsGetMiddleware)
    # Outermost: sees every response, the body limit's 413s included.
    app.add_middleware(RequestObservability, metrics=metrics)
    # Only when keys are set: the schema then shows the security scheme, and never
    # claims one the service does not enforce.
    protected = [Depends(require_api_key)] if settings.api_keys else []
    for module in _WORK_ROUTES:
        app.include_router(module.router, dependencies=protected)
    app.include_router(system.open_router)  # /health and /ready: orchestrators hold no keys
    app.include_router(system.router, dependencies=protected)
    return app


class ConciseStartupFailure:
    """Leaves a startup failure of a known cause (STARTUP_ERRORS) at the lifespan's
    one-line message, for whichever server runs the app.

    Starlette reports a failed startup with the traceback as its text, which uvicorn logs
    whole: some 40 lines repeating the message. Whether the cause is known is learnt only
    when the lifespan raises, just after that report; so the report is held until then,
    and sent without its text when the cause is known. Other causes keep their traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        known = False
        try:
            await self.app(scope, receive, hold_startup_failure)
        except STARTUP_ERRORS:
            known = True
            raise
        finally:
            for message in held:
                await send({**message, "message": ""} if known else message)


def fitted_projection(
    projection: Projection | None,
    settings: Settings,
    model: str,
    dim: int,
    weights: str = "",
    runs: tuple[str, str] | None = None,
) -> Projection | None:
    """CLIP_PROJECTION's file, read before the model loaded, checked against the model;
    `runs` is the (precision, backend) the service runs, which the file's fit is
    compared with."""
    if projection is None:
        return None
    where = f"CLIP_PROJECTION={settings.projection}"
    projection.check_fitted_for(model, weights or None, where)
    if projection.input_dim != dim:
        raise ProjectionError(
            f"{where} maps {projection.input_dim} dims, but the model gives {dim}"
        )
    fitted = (projection.metadata.get("precision"), projection.metadata.get("backend"))
    if runs is not None and None not in fitted and fitted != runs:
        # Served, as it works; but its directions were fitted on slightly other embeddings
        # (the README: fit and evaluate at the precision you serve).
        logger.warning(
            "CLIP_PROJECTION=%s was fitted on %s (%s) embeddings, and this service runs %s "
            "(%s): it is served, but refit it at the served precision for the closest "
            "match (python -m app.reid.fit_projection --precision %s --backend %s)",
            settings.projection, *fitted, *runs, *runs,
        )  # fmt: skip
    return projection


def build_garment_classifiers(encoder: ImageEncoder, vocabulary: Vocabulary) -> GarmentClassifiers:
    """Embed the garment vocabulary's prompts once, then free the text tower."""
    classifiers = GarmentClassifiers.build(vocabulary, encoder.embed_texts, encoder.logit_scale)
    encoder.release_text_tower()
    return classifiers


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app` builds the app on first access, so importing this module
    # (tests, tools) never reads the environment or loads a model.
    if name == "app":
        configure_logging()
        settings = load_settings()
        set_log_level(settings.log_level)
        return create_app(settings)
    raise AttributeError(name)
