"""Build a model straight onto its checkpoint's tensors instead of copying them in.

open_clip builds the whole CLIP with random weights, then copies the checkpoint over
them, so for a moment both copies are resident (ViT-B-32 in fp32: 2 x 600 MB, which was
the service's startup peak) and the random init costs seconds of CPU that are thrown
away. Inside `onto_checkpoint_tensors()` torch's initialisers do nothing, and
`load_state_dict` takes the checkpoint's tensors as the parameters (`assign=True`, cast
to the dtype the module was built with) instead of copying them. A safetensors
checkpoint is mapped, not read, so its pages come in as the weights are first used.

A parameter the checkpoint lacks would keep uninitialised memory: open_clip loads
checkpoints with `strict=True`, which refuses missing keys, and `loaded_into` tells the
caller whether the model was loaded at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

_INITIALISERS = [
    name
    for name in dir(torch.nn.init)
    if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.nn.init, name))
]


@contextmanager
def onto_checkpoint_tensors() -> Iterator[list[torch.nn.Module]]:
    """While open: torch.nn.init's in-place initialisers are no-ops and every
    load_state_dict assigns. Yields the list of modules a state dict was loaded into.
    Not thread-safe: for building a model at startup, with nothing else building one."""
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INITIALISERS}
    copy_in = torch.nn.Module.load_state_dict
    loaded_into: list[torch.nn.Module] = []

    def leave_as_is(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    def assign(
        module: torch.nn.Module,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        assign: bool = False,
    ) -> Any:
        own = module.state_dict(keep_vars=True)
        fitted = {
            key: _like(value, own[key]) if key in own else value
            for key, value in state_dict.items()
        }
        result = copy_in(module, fitted, strict=strict, assign=True)
        loaded_into.append(module)
        return result

    try:
        for name in _INITIALISERS:
            setattr(init, name, leave_as_is)
        torch.nn.Module.load_state_dict = assign  # type: ignore[method-assign,assignment]
        yield loaded_into
    finally:
        for name, initialiser in saved.items():
            setattr(init, name, initialiser)
        torch.nn.Module.load_state_dict = copy_in  # type: ignore[method-assign]


def _like(value: Any, own: torch.Tensor) -> Any:
    # A copy into the module's tensor would have cast an fp16 checkpoint to the fp32
    # the model was built in; assigning keeps the checkpoint's dtype unless told.
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != own.dtype:
        return value.to(own.dtype)
    return value
