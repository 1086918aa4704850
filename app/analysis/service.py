"""/analyze's pipeline on top of the embedding service's admission, decode pool and
batcher, with the colour analysis in a thread of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

from app.analysis.analyzer import Colors, Outfit, OutfitAnalyzer, PreparedCrop
from app.config import ANALYZE_IMAGES
from app.errors import PayloadTooLarge
from app.inference.frames import Box, FloatBox
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

    async def analyze_frame(
        self, frame: bytes, boxes: Sequence[FloatBox]
    ) -> tuple[list[Box], list[Outfit]]:
        """Each box's outfit and embedding, in box order, with the boxes as used. The
        embedding is the third model input of each box (the whole crop), so it shares
        the forward pass with the garment regions."""
        service = self.embeddings
        model_inputs = ANALYZE_IMAGES * len(boxes)
        if model_inputs > service.settings.max_queue:
            raise PayloadTooLarge(
                f"{len(boxes)} boxes with analyze are {model_inputs} model inputs, more than "
                f"the service ever holds at once ({service.settings.max_queue}, "
                "CLIP_MAX_QUEUE); send fewer boxes per request"
            )
        prepare = partial(self.analyzer.prepare, include_embedding=True)
        async with service.admitted(model_inputs) as ticket:
            used, prepared = await service.prepare_frame(frame, boxes, ticket, prepare)
            if not prepared:
                return used, []
            colors: asyncio.Future[list[Colors]] = run_in(
                self._color_pool, lambda: [self.analyzer.colors(crop) for crop in prepared]
            )
            try:
                rows = await service.forward([x for crop in prepared for x in crop.model_inputs])
                per_box = await colors
            finally:
                colors.cancel()
        outfits = [
            self.analyzer.finish(
                crop, list(rows[i * ANALYZE_IMAGES : (i + 1) * ANALYZE_IMAGES]), box_colors
            )
            for i, (crop, box_colors) in enumerate(zip(prepared, per_box, strict=True))
        ]
        # Each box's third input is its whole crop: the rows /embed would give.
        embeddings = service.project(rows[ANALYZE_IMAGES - 1 :: ANALYZE_IMAGES])
        return used, [
            replace(outfit, embedding=row) for outfit, row in zip(outfits, embeddings, strict=True)
        ]

    def stop(self) -> None:
        self._color_pool.shutdown(wait=False, cancel_futures=True)
