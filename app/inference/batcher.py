"""Dynamic batching: many concurrent requests, one forward pass.

Requests put their items in one queue and await a future per item. A single loop on the
event loop takes up to `max_batch_size` items and hands the batch to `process` in a
dedicated thread, so the event loop never runs the model. While one batch is in the
forward pass the next one gathers. When a pass could start, a queued item waits for
companions at most `max_wait_s`, counted from when both it and a forward slot were
there: time spent queued behind a running pass is not spent waiting for companions,
so items that gathered during a pass may still wait for the ones on their way (being
decoded, or the callers a pass just answered, who tend to come straight back). A
longer `max_wait_s` then turns closed-loop clients' alternating half batches into full
ones, which pays on runtimes much faster per image at larger batches; waiting stops as
soon as no more items are on their way. A runtime that
runs several forward passes at once (OpenVINO's CPU streams: one thread each, so a
thread preempted by the HTTP side stalls only its own pass) gets `concurrency` > 1:
up to that many batches run at the same time, each in its own thread.

A failure of `process` fails exactly the items of that batch (every waiting request gets
it) and the loop goes on. Items whose requester gave up (timeout, disconnect) are skipped
before they cost a forward pass. Knows nothing of HTTP or of models: the unit tests drive
it with plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.errors import InferenceFailed, Overloaded, RequestTimedOut, ShuttingDown

logger = logging.getLogger(__name__)

# How long the callers a pass answered count as on their way back: a loopback or LAN
# round trip and the request's parsing, not its decoding (that is companions_expected).
RETURN_GRACE_S = 0.002

In = TypeVar("In")
Out = TypeVar("Out")


class BatchFailed(InferenceFailed):
    """`process` raised for the batch this item was in; the cause is chained, not shown."""


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    skipped_items: int = 0  # requester gone before its batch was formed
    consecutive_failures: int = 0
    last_success_at: float = 0.0  # time.monotonic() of the last forward pass that worked
    batch_sizes: Counter[int] = field(default_factory=Counter)


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued_at: float


class DynamicBatcher(Generic[In, Out]):
    def __init__(
        self,
        process: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        executor: Executor | None = None,
        name: str = "batcher",
        companions_expected: Callable[[], bool] | None = None,
        observer: Callable[[int, list[float], float], None] | None = None,
        concurrency: int = 1,
        return_grace_s: float = RETURN_GRACE_S,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._process = process
        # Waiting for companions only pays when some are on their way (e.g. requests
        # still decoding); a lone client should not pay max_wait on every request.
        self._companions_expected = companions_expected
        # Told (batch size, each item's seconds in the queue, forward seconds) per batch.
        self._observer = observer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._owns_executor = executor is None
        # One thread per concurrent pass; with one, passes run one after another, which
        # is what a single device does anyway, and torch's own threads do not fight.
        self.concurrency = concurrency
        self._executor = executor or ThreadPoolExecutor(
            concurrency, thread_name_prefix=f"{name}-forward"
        )
        self._name = name
        self._queue: deque[_Pending[In, Out]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._slots = asyncio.Semaphore(concurrency)
        self._passes: set[asyncio.Task[None]] = set()
        self._in_forward: dict[int, list[_Pending[In, Out]]] = {}
        # When the last pass ended and how many items it answered: their callers are
        # likely on their way back, for a moment (return_grace_s), as companions.
        self._return_grace_s = return_grace_s
        self._freed_at = 0.0
        self._answered = 0
        self._queued_since_freed = 0
        self.stats = BatcherStats()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def submit(self, items: Sequence[In], timeout_s: float | None = None) -> list[Out]:
        """Queue all items of one request and wait for their results, in order.

        Raises Overloaded when the queue cannot take them all, ShuttingDown after stop()
        began, RequestTimedOut past `timeout_s`, and BatchFailed when a forward pass that
        held one of them raised.
        """
        if self._closing or not self.running:
            raise ShuttingDown("the service is shutting down; retry on another replica")
        if not items:
            return []
        if len(self._queue) + len(items) > self.max_queue:
            raise Overloaded(
                f"the queue holds {len(self._queue)} of {self.max_queue} images; retry shortly",
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._queued_since_freed += len(pending)
        self._wakeup.set()
        futures = [p.future for p in pending]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))
        except TimeoutError:
            raise RequestTimedOut(
                f"the request waited over {timeout_s:g}s for the model; the service is "
                "overloaded or the timeout too short"
            ) from None
        finally:
            # A timed-out or cancelled request leaves futures behind: cancelling them
            # lets the loop skip those items instead of computing them for nobody.
            for future in futures:
                if not future.done():
                    future.cancel()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new work, finish what is queued within the bound, fail the rest."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                logger.warning(
                    "%s: drain timed out; failing %d items", self._name, len(self._queue)
                )
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        # Whatever is still unanswered (queued, or in a forward pass that overran the
        # bound) gets an answer now: nobody waits on a batcher that is gone.
        unanswered = [*(p for batch in self._in_forward.values() for p in batch), *self._queue]
        self._queue.clear()
        for waiting in unanswered:
            if not waiting.future.done():
                waiting.future.set_exception(ShuttingDown("the service stopped before this ran"))
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        try:
            while True:
                # A free slot first, then the batch: items keep gathering while every
                # slot is busy, so each pass takes all that waited.
                await self._slots.acquire()
                batch = await self._next_batch()
                if not batch:
                    self._slots.release()
                    if batch is None:
                        break
                    continue
                number = self.stats.batches
                self._in_forward[number] = batch
                task = asyncio.create_task(self._run(number, batch))
                self._passes.add(task)
                task.add_done_callback(self._passes.discard)
            if self._passes:  # closing: the passes under way still answer their items
                await asyncio.gather(*self._passes, return_exceptions=True)
        except asyncio.CancelledError:
            for task in self._passes:
                task.cancel()
            raise

    async def _run(self, number: int, batch: list[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        waits = [started - p.enqueued_at for p in batch]
        try:
            results = await loop.run_in_executor(
                self._executor, self._process, [p.item for p in batch]
            )
            forward_s = time.monotonic() - started
            if self._observer is not None:
                self._observer(len(batch), waits, forward_s)
            # CLIP_LOG_LEVEL=debug: how batches form, pass by pass (the metrics' histograms
            # say it in aggregate).
            logger.debug(
                "%s: pass %d, %d item(s), %.1f ms; queued up to %.1f ms, %d waiting after",
                self._name, number, len(batch), forward_s * 1000, max(waits) * 1000,
                len(self._queue),
            )  # fmt: skip
            if len(results) != len(batch):
                raise RuntimeError(
                    f"process returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            raise  # stop() gave up on the drain: it answers this batch
        except Exception as exc:
            self.stats.failed_batches += 1
            self.stats.consecutive_failures += 1
            # The one traceback of this failure: requests log their refusal without it.
            logger.exception(
                "%s: forward pass %d (%d items) failed", self._name, number, len(batch)
            )
            for waiting in batch:
                if not waiting.future.done():
                    failure = BatchFailed(
                        f"the forward pass (number {number}, {len(batch)} images) "
                        "failed; the service log has the cause"
                    )
                    failure.__cause__ = exc
                    waiting.future.set_exception(failure)
        else:
            self.stats.consecutive_failures = 0
            self.stats.last_success_at = time.monotonic()
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)
        self._in_forward.pop(number, None)
        self._freed_at, self._answered, self._queued_since_freed = time.monotonic(), len(batch), 0
        self._slots.release()

    def _expecting_companions(self, now: float) -> bool:
        """More items are on their way: requests being prepared, or, just after a pass,
        fewer items queued since than it answered (its callers coming back)."""
        if self._companions_expected is not None and self._companions_expected():
            return True
        return self._callers_returning(now)

    def _callers_returning(self, now: float) -> bool:
        """Within the grace after a pass, fewer items queued since than it answered."""
        returning = now < self._freed_at + self._return_grace_s
        return returning and self._queued_since_freed < self._answered

    async def _next_batch(self) -> list[_Pending[In, Out]] | None:
        """The next batch to run; None when closing with nothing left; [] to loop again."""
        while not self._queue:
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        # Wait for companions at most max_wait after the oldest item could have run:
        # queued behind a pass it was waiting for the model, not for companions.
        deadline = max(self._queue[0].enqueued_at, self._freed_at) + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closing:
            now = time.monotonic()
            if now >= deadline or not self._expecting_companions(now):
                break
            timeout = deadline - now
            if self._callers_returning(now):  # re-check when their grace ends
                timeout = min(timeout, self._freed_at + self._return_grace_s - now)
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                continue
        # Free slots share what waits: with every client in one batch the other streams
        # would idle until it returns, and closed-loop clients would never spread out.
        idle_slots = self.concurrency - len(self._in_forward)
        limit = min(self.max_batch_size, max(1, -(-len(self._queue) // max(1, idle_slots))))
        batch: list[_Pending[In, Out]] = []
        while self._queue and len(batch) < limit:
            waiting = self._queue.popleft()
            if waiting.future.done():  # cancelled: its requester is gone
                self.stats.skipped_items += 1
                continue
            batch.append(waiting)
        if batch:
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.batch_sizes[len(batch)] += 1
        return batch
