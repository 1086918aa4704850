"""Typed dependencies the routes declare instead of reaching into app.state.

All `async def`: FastAPI runs plain `def` dependencies in a worker thread, a thread hop
per dependency per request that a profile of /embed showed costing ~5 ms on 2 cores.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.analysis.service import AnalysisService
from app.config import Settings
from app.errors import NotReady, ShuttingDown
from app.inference.service import EmbeddingService
from app.search import SearchExecutor


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _serving(request: Request, name: str) -> Any:
    """app.state.<name>, or the 503 that says why there is none to serve with."""
    if getattr(request.app.state, "draining", False):
        raise ShuttingDown("the service is shutting down; retry on another replica")
    value = getattr(request.app.state, name, None)
    if value is None:
        raise NotReady("the model is not loaded yet; retry once /ready answers 200")
    return value


async def get_service(request: Request) -> EmbeddingService:
    service: EmbeddingService = _serving(request, "service")
    return service


async def get_search_executor(request: Request) -> SearchExecutor:
    executor: SearchExecutor = _serving(request, "searches")
    return executor


async def get_analysis(request: Request) -> AnalysisService:
    analysis: AnalysisService = _serving(request, "analysis")
    return analysis


SettingsDep = Annotated[Settings, Depends(get_settings)]
AnalysisDep = Annotated[AnalysisService, Depends(get_analysis)]
ServiceDep = Annotated[EmbeddingService, Depends(get_service)]
SearchExecutorDep = Annotated[SearchExecutor, Depends(get_search_executor)]
