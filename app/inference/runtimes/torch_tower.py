"""The image tower on torch: cast, or dynamically quantised, in place."""

from __future__ import annotations

import warnings

import torch

from app.config import Backend, Precision
from app.inference.runtimes.tower import Tower, Turns

# torch's own choice of threads, read before any pass here sets a count (each pass sets
# its own, below, and the count stays with the thread that ran it): a tower built later
# on such a thread (a benchmark's next configuration, a test's next app, loaded on a
# reused executor thread the warm-up's stream pass had run on) read a stream's share,
# and took one stream on one thread.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


class TorchTower:
    """torch's tower; with `streams` > 1 (CPU), that many passes at once under load,
    each on `threads / streams` of torch's threads, on the same weights: a pass no
    longer waits for a thread the HTTP side preempted, and the cores do not idle while
    the next batch is gathered. A lone request runs alone over every thread (Turns)."""

    backend = Backend.TORCH

    def __init__(
        self, visual: torch.nn.Module, dtype: torch.dtype, streams: int = 1, threads: int = 0
    ) -> None:
        self._visual = visual
        self._dtype = dtype
        self.concurrency = max(1, streams)
        self._threads = threads or _TORCH_DEFAULT_THREADS
        self._stream_threads = max(1, self._threads // self.concurrency)
        self._turns = Turns(self.concurrency)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # Each pass sets its own thread count: whatever ran on this thread before (another
        # tower's stream, a load tool's probe) cannot leave this pass on a stream's share.
        if self.concurrency == 1:
            torch.set_num_threads(self._threads)
            return self._forward(pixels)
        with self._turns.turn(len(pixels)) as solo:
            torch.set_num_threads(self._threads if solo else self._stream_threads)
            return self._forward(pixels)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self._visual(pixels.to(self._dtype))
        return features

    def settle(self) -> None:
        pass


def torch_tower(
    visual: torch.nn.Module,
    precision: Precision,
    device: torch.device,
    streams: int = 1,
    threads: int = 0,
) -> Tower:
    dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(
        precision, torch.float32
    )
    # Casting weights (not autocast) is what measured fastest on CPU and GPU alike.
    visual = visual.to(device=device, dtype=dtype)
    if precision == Precision.INT8:
        with warnings.catch_warnings():
            # Deprecated in favour of torchao, which is not a dependency.
            warnings.simplefilter("ignore", DeprecationWarning)
            visual = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                visual, {torch.nn.Linear}, dtype=torch.qint8
            )
    if device.type != "cpu":
        streams = 1  # a GPU runs one pass at a time
    elif streams > 0:
        # A stream needs a thread of its own: more only take turns on the same cores.
        streams = min(streams, threads or _TORCH_DEFAULT_THREADS)
    elif streams == 0:
        # Two passes at once, each on half the threads: on 2 cores 1.06-1.07x the crops/s
        # (fp32, bf16) and 1.34x (int8) under 16 clients, a lone client's latency kept
        # by the solo turn (README, Performance). The weights are shared: no memory cost.
        streams = 2 if (threads or _TORCH_DEFAULT_THREADS) >= 2 else 1
    return TorchTower(visual, dtype, streams, threads)
