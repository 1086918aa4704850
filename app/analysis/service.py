"""/analyze's pipeline on top of the embedding service's admission, decode pool and
batcher, with the colour analysis in a thread of its own."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

from app.analysis.analyzer import Colors, Outfit, OutfitAnalyzer, PreparedCrop
from app.config import ANALYZE_IMAGES
from app.inference.service import EmbeddingService, run_in


class AnalysisService:
    def __init__(self, embeddings: EmbeddingService, analyzer: OutfitAnalyzer) -> None:
        self.embeddings = embeddings
        self.analyzer = analyzer
        # One thread: colour analysis is a small, steady cost per request; more threads
        # would only take cores from the forward pass.
        self._color_pool = ThreadPoolExecutor(1, thread_name_prefix="colors")

    async def analyze(self, image: bytes, location: str, include_embedding: bool) -> Outfit:
        model_inputs = ANALYZE_IMAGES if include_embedding else ANALYZE_IMAGES - 1
        service = self.embeddings
        async with service.admitted(model_inputs) as ticket:
            opened = service.open([image], [location], ticket)
            prepare = partial(self.analyzer.prepare, include_embedding=include_embedding)
            prepared: PreparedCrop = (await service.prepare(opened, [location], prepare))[0]
            colors: asyncio.Future[Colors] = run_in(
                self._color_pool, self.analyzer.colors, prepared
            )
            try:
                rows = await service.forward(prepared.model_inputs)
                outfit = self.analyzer.finish(prepared, list(rows), await colors)
            finally:
                colors.cancel()
        if outfit.embedding is None:
            return outfit
        embedding = service.project(outfit.embedding[None, :])[0]
        return replace(outfit, embedding=embedding)

    def stop(self) -> None:
        self._color_pool.shutdown(wait=False, cancel_futures=True)
