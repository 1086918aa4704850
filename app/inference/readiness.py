"""Readiness that exercises the model, and recovers from failures without traffic.

/ready answers from here. While forward passes work, a recent success is enough; with
no recent traffic, a one-image probe goes through the batcher. After FAILING_AFTER
failed passes in a row the service is unready, and a background task probes the model
with exponential backoff until a probe passes, so one transient fault (a CUDA
out-of-memory) never takes a replica out of rotation for good, even when the
orchestrator, seeing it unready, sends it no traffic. No HTTP in here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.errors import ServiceError
from app.inference.batcher import DynamicBatcher
from app.inference.encoder import ModelInput

logger = logging.getLogger(__name__)

FAILING_AFTER = 3  # consecutive failed forward passes before /ready says 503


class ReadinessMonitor:
    fresh_s = 10.0  # a forward pass that worked this recently needs no probe
    probe_timeout_s = 5.0
    first_backoff_s = 1.0
    max_backoff_s = 30.0

    def __init__(
        self,
        batcher: DynamicBatcher[ModelInput, Any],
        make_probe: Callable[[], Awaitable[ModelInput]],
    ) -> None:
        self._batcher = batcher
        self._make_probe = make_probe
        self._probe: ModelInput | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._stopped = False
        self.probes = 0  # probes sent, for /info and tests

    @property
    def failing(self) -> bool:
        return self._batcher.stats.consecutive_failures >= FAILING_AFTER

    def check(self) -> None:
        """After a failure: start probing in the background if the model now counts as
        failing and nobody is probing yet."""
        if self._stopped or not self.failing:
            return
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="readiness-recovery")

    async def model_works(self) -> bool:
        if self.failing:
            self.check()
            return False
        last = self._batcher.stats.last_success_at
        if last and time.monotonic() - last < self.fresh_s:
            return True
        return await self.probe()

    async def probe(self) -> bool:
        """One blank crop through the batcher: True when the forward pass worked."""
        if self._probe is None:
            self._probe = await self._make_probe()
        self.probes += 1
        try:
            await self._batcher.submit([self._probe], timeout_s=self.probe_timeout_s)
        except ServiceError:
            return False
        return True

    def stop(self) -> None:
        self._stopped = True
        if self._recovery is not None:
            self._recovery.cancel()

    async def _recover(self) -> None:
        backoff = self.first_backoff_s
        logger.warning(
            "model failing (%d forward passes in a row); probing it every %.0f-%.0f s",
            self._batcher.stats.consecutive_failures,
            self.first_backoff_s,
            self.max_backoff_s,
        )
        while self.failing and not self._stopped:
            await asyncio.sleep(backoff)
            if await self.probe():
                logger.warning("model recovered: a probe forward pass worked; ready again")
                return
            backoff = min(backoff * 2, self.max_backoff_s)
