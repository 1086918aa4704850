"""The batcher's grouping, error fan-out, backpressure and shutdown, with plain functions."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import pytest

from app.errors import Overloaded, RequestTimedOut, ShuttingDown
from app.inference.batcher import BatchFailed, DynamicBatcher


class Recorder:
    """A fake encoder: doubles its inputs and remembers each batch and its thread."""

    def __init__(self, fail_when: int | None = None, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.fail_when = fail_when
        self.gate = gate

    def __call__(self, items: Sequence[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if self.fail_when is not None and self.fail_when in items:
            raise RuntimeError("simulated CUDA out of memory")
        return [item * 2 for item in items]


async def started(process: Recorder, **kwargs: float) -> DynamicBatcher[int, int]:
    options = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue": 64, **kwargs}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process,
        max_batch_size=int(options["max_batch_size"]),
        max_wait_s=options["max_wait_s"],
        max_queue=int(options["max_queue"]),
    )
    await batcher.start()
    return batcher


async def test_concurrent_requests_share_one_forward_pass() -> None:
    process = Recorder()
    batcher = await started(process, max_wait_s=0.5)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
    await batcher.stop()
    assert results == [[0], [2], [4], [6], [8]]
    assert len(process.batches) == 1
    assert sorted(process.batches[0]) == [0, 1, 2, 3, 4]


async def test_batches_never_exceed_the_maximum_and_keep_request_order() -> None:
    process = Recorder()
    batcher = await started(process, max_batch_size=4, max_wait_s=0.2)
    result = await batcher.submit(list(range(10)))
    await batcher.stop()
    assert result == [i * 2 for i in range(10)]
    assert [len(b) for b in process.batches] == [4, 4, 2]


async def test_a_lone_request_is_served_without_waiting_for_a_full_batch() -> None:
    process = Recorder()
    batcher = await started(process, max_batch_size=32, max_wait_s=0.01)
    assert await asyncio.wait_for(batcher.submit([21]), timeout=5) == [42]
    await batcher.stop()
    assert process.batches == [[21]]


async def test_forward_runs_off_the_event_loop_thread() -> None:
    process = Recorder()
    batcher = await started(process)
    await batcher.submit([1])
    await batcher.stop()
    assert threading.get_ident() not in process.threads


async def test_a_failing_batch_fails_only_its_requests_and_the_loop_goes_on() -> None:
    process = Recorder(fail_when=13)
    batcher = await started(process, max_wait_s=0.3)
    outcomes = await asyncio.gather(
        batcher.submit([1]), batcher.submit([13]), batcher.submit([2]), return_exceptions=True
    )
    assert all(isinstance(o, BatchFailed) for o in outcomes), outcomes
    assert isinstance(outcomes[0].__cause__, RuntimeError)
    assert "simulated" not in str(outcomes[0])  # internals stay in the log
    assert await batcher.submit([3]) == [6]
    await batcher.stop()
    assert batcher.stats.failed_batches == 1


async def test_a_full_queue_refuses_at_once() -> None:
    gate = threading.Event()
    process = Recorder(gate=gate)
    batcher = await started(process, max_batch_size=1, max_wait_s=0, max_queue=3)
    first = asyncio.create_task(batcher.submit([1]))  # taken into the forward pass, blocked
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(batcher.submit([2, 3, 4]))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await batcher.submit([5])
    gate.set()
    assert await first == [2]
    assert await queued == [4, 6, 8]
    await batcher.stop()


async def test_timed_out_requests_are_dropped_before_the_forward_pass() -> None:
    gate = threading.Event()
    process = Recorder(gate=gate)
    batcher = await started(process, max_batch_size=1, max_wait_s=0)
    blocker = asyncio.create_task(batcher.submit([1]))
    await asyncio.sleep(0.05)
    with pytest.raises(RequestTimedOut):
        await batcher.submit([7], timeout_s=0.05)
    gate.set()
    await blocker
    assert await batcher.submit([8]) == [16]
    await batcher.stop()
    assert [7] not in process.batches
    assert batcher.stats.skipped_items == 1


async def test_stop_drains_queued_work_and_refuses_new_work() -> None:
    process = Recorder()
    batcher = await started(process, max_batch_size=2, max_wait_s=0.05)
    pending = [asyncio.create_task(batcher.submit([i])) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.stop(drain_timeout_s=5)
    assert [await p for p in pending] == [[0], [2], [4], [6], [8], [10]]
    with pytest.raises(ShuttingDown):
        await batcher.submit([1])


async def test_stop_fails_work_it_cannot_finish_in_time_without_hanging() -> None:
    gate = threading.Event()
    process = Recorder(gate=gate)
    batcher = await started(process, max_batch_size=1, max_wait_s=0)
    stuck = asyncio.create_task(batcher.submit([1]))
    waiting = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(batcher.stop(drain_timeout_s=0.1), timeout=5)
    gate.set()
    for request in (stuck, waiting):
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(request, timeout=5)


async def test_no_wait_for_companions_when_none_are_on_their_way() -> None:
    process = Recorder()
    expected = {"more": False}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process,
        max_batch_size=8,
        max_wait_s=30.0,  # would stall the test if it were waited out
        max_queue=64,
        companions_expected=lambda: expected["more"],
    )
    await batcher.start()
    assert await asyncio.wait_for(batcher.submit([1]), timeout=5) == [2]
    expected["more"] = True
    late = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0.05)
    assert not late.done()  # companions announced: it waits for them
    joined = asyncio.create_task(batcher.submit([3]))
    await asyncio.sleep(0.01)
    expected["more"] = False
    extra = await asyncio.wait_for(batcher.submit([4]), timeout=5)  # wakes the loop
    assert extra == [8]
    assert await late == [4]
    assert await joined == [6]
    await batcher.stop()
    assert sorted(process.batches[-1]) == [2, 3, 4]


class Overlap:
    """Counts how many calls run at once; each call holds until `release` is set."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: Sequence[int]) -> list[int]:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.release.wait(timeout=10)
        with self.lock:
            self.running -= 1
        if self.fail_on in items:
            raise RuntimeError("one stream failed")
        return [item + 100 for item in items]


@pytest.mark.parametrize("concurrency", [1, 2, 3])
async def test_concurrent_passes_never_exceed_the_slots(concurrency: int) -> None:
    process = Overlap()
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process, max_batch_size=2, max_wait_s=0.0, max_queue=64, concurrency=concurrency
    )
    await batcher.start()
    requests = [asyncio.create_task(batcher.submit([i])) for i in range(12)]
    await asyncio.sleep(0.2)  # every slot takes a batch and blocks in it
    running_while_blocked = process.running
    process.release.set()
    results = await asyncio.gather(*requests)
    await batcher.stop()
    assert running_while_blocked == process.most_at_once == concurrency
    assert results == [[i + 100] for i in range(12)]
    assert batcher.stats.items == 12


async def test_a_failed_pass_fails_only_its_items_while_another_runs() -> None:
    process = Overlap(fail_on=0)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process, max_batch_size=1, max_wait_s=0.0, max_queue=8, concurrency=2
    )
    await batcher.start()
    first, second = (asyncio.create_task(batcher.submit([i])) for i in range(2))
    await asyncio.sleep(0.1)
    assert process.running == 2
    process.release.set()
    with pytest.raises(BatchFailed):
        await first
    assert await second == [101]
    await batcher.stop()
    assert batcher.stats.failed_batches == 1


async def test_stop_answers_every_pass_still_running_when_the_drain_times_out() -> None:
    process = Overlap()
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process, max_batch_size=1, max_wait_s=0.0, max_queue=8, concurrency=2
    )
    await batcher.start()
    requests = [asyncio.create_task(batcher.submit([i])) for i in range(3)]
    await asyncio.sleep(0.1)
    await batcher.stop(drain_timeout_s=0.1)
    outcomes = await asyncio.gather(*requests, return_exceptions=True)
    process.release.set()
    assert all(isinstance(outcome, ShuttingDown) for outcome in outcomes)


async def test_free_slots_share_the_waiting_items() -> None:
    process = Overlap()
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process, max_batch_size=32, max_wait_s=0.2, max_queue=64, concurrency=2
    )
    await batcher.start()
    requests = asyncio.create_task(batcher.submit(list(range(16))))
    await asyncio.sleep(0.3)
    process.release.set()
    assert await requests == [i + 100 for i in range(16)]
    await batcher.stop()
    assert batcher.stats.batch_sizes == {8: 2}  # not one pass of 16 and an idle stream


async def test_items_queued_behind_a_pass_still_wait_for_companions_on_their_way() -> None:
    """Time queued behind a running pass is not time spent waiting for companions: once
    the pass ends, items that gathered during it wait (up to max_wait) for the requests
    still being prepared, so closed-loop clients end up in one full batch instead of
    alternating half batches."""
    gate = threading.Event()
    process = Recorder(gate=gate)
    preparing = {"requests": 0}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process,
        max_batch_size=8,
        max_wait_s=2.0,
        max_queue=64,
        companions_expected=lambda: preparing["requests"] > 0,
        return_grace_s=0.0,
    )
    await batcher.start()
    first = asyncio.create_task(batcher.submit([1]))
    await asyncio.sleep(0.05)  # pass 1 runs, held by the gate
    queued = [asyncio.create_task(batcher.submit([n])) for n in (2, 3)]
    await asyncio.sleep(0.05)  # 2 and 3 have waited longer than any max_wait of old
    preparing["requests"] = 1  # one more request is decoding
    gate.set()
    assert await first == [2]
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in queued)  # waiting for the one on its way
    preparing["requests"] = 0
    assert await asyncio.wait_for(batcher.submit([4]), timeout=5) == [8]
    assert [await task for task in queued] == [[4], [6]]
    await batcher.stop()
    assert process.batches == [[1], [2, 3, 4]]


async def test_the_wait_for_companions_is_bounded_by_max_wait_after_the_pass() -> None:
    gate = threading.Event()
    process = Recorder(gate=gate)
    announced = {"companions": False}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process,
        max_batch_size=8,
        max_wait_s=0.2,
        max_queue=64,
        companions_expected=lambda: announced["companions"],
        return_grace_s=0.0,
    )
    await batcher.start()
    first = asyncio.create_task(batcher.submit([1]))
    await asyncio.sleep(0.05)
    announced["companions"] = True  # announced from now on, never arriving
    queued = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0.3)  # longer than max_wait, but behind the held pass
    gate.set()
    await first
    loop = asyncio.get_running_loop()
    freed = loop.time()
    assert await asyncio.wait_for(queued, timeout=5) == [4]
    waited = loop.time() - freed
    await batcher.stop()
    assert 0.1 <= waited <= 1.0  # it waited for companions after the pass, within bound


async def test_callers_a_pass_answered_are_waited_for_until_they_are_back() -> None:
    """Closed-loop callers come straight back after their answer: for the return grace
    the next pass waits for as many items as the last one answered, then goes at once
    (no waiting out max_wait once they are all back)."""
    gate = threading.Event()
    process = Recorder(gate=gate)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process,
        max_batch_size=8,
        max_wait_s=30.0,  # would stall the test if it were waited out
        max_queue=64,
        companions_expected=lambda: False,
        return_grace_s=10.0,
    )
    await batcher.start()

    async def caller(first: int, then: int) -> list[int]:
        answer = await batcher.submit([first])
        await asyncio.sleep(0.05)  # the round trip of a client that comes back
        return answer + await batcher.submit([then])

    callers = [asyncio.create_task(caller(n, n + 10)) for n in (1, 2)]
    await asyncio.sleep(0.05)  # pass 1 holds 1 and 2
    waiting = asyncio.create_task(batcher.submit([3]))
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*callers, waiting), timeout=5)
    await batcher.stop()
    assert answers == [[2, 22], [4, 24], [6]]
    assert process.batches == [[1, 2], [3, 11, 12]]


async def test_each_pass_is_told_in_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    """CLIP_LOG_LEVEL=debug shows how batches form, pass by pass."""
    process = Recorder()
    batcher = await started(process, max_wait_s=0.5)
    with caplog.at_level(logging.DEBUG, logger="app.inference.batcher"):
        await asyncio.gather(*(batcher.submit([i]) for i in range(3)))
    await batcher.stop()
    passes = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(passes) == 1
    assert passes[0].startswith("batcher: pass 1, 3 item(s), ")
    assert passes[0].endswith("0 waiting after")
