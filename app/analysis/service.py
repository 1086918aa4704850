"""/analyze's pipeline on top of the embedding service's decode pool and batcher."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from app.analysis.analyzer import Outfit, OutfitAnalyzer, PreparedCrop
from app.inference.service import EmbeddingService


class AnalysisService:
    def __init__(self, embeddings: EmbeddingService, analyzer: OutfitAnalyzer) -> None:
        self.embeddings = embeddings
        self.analyzer = analyzer

    async def analyze(self, image: bytes, location: str, include_embedding: bool) -> Outfit:
        prepare = partial(self.analyzer.prepare, include_embedding=include_embedding)
        prepared: PreparedCrop = (
            await self.embeddings.prepare([image], [location], transform=prepare)
        )[0]
        rows = await self.embeddings.forward(prepared.model_inputs)
        outfit = self.analyzer.finish(prepared, list(rows))
        if outfit.embedding is None:
            return outfit
        embedding = self.embeddings.project(outfit.embedding[None, :])[0]
        return replace(outfit, embedding=embedding)
