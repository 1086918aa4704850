"""The text tower at startup: zero-shot prompts to L2-normalised rows.

CLIP's text transformer is causal and reads each prompt's features at its end-of-text
token, so no position after the longest prompt's end can change a row. open_clip still
runs every prompt over all 77 positions of the context; the default garment prompts end
by the 19th, so cutting the context there gives the same rows (up to float rounding) for
about a sixth of the work. On a 2-core AVX2 CPU that took ViT-B-32's 165 default prompts
from ~15 s to ~2.5 s of every start. Towers that pool otherwise, or attend both ways, run the
full context as open_clip does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

# Prompts per pass: the whole default vocabulary in three, without one huge activation.
TEXT_BATCH = 64

# The cut changes the model for the length of a pass: two callers must not interleave.
_one_pass_at_a_time = threading.Lock()


def encode_texts(
    model: Any, tokenizer: Callable[[Sequence[str]], torch.Tensor], texts: Sequence[str]
) -> npt.NDArray[np.float32]:
    """One L2-normalised fp32 row per text, as open_clip's `encode_text` gives it."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = tokenizer(list(texts[start : start + TEXT_BATCH]))
            with _one_pass_at_a_time:  # used_context reads the mask a cut replaces
                length = used_context(model, tokens)
                with context_cut_to(model, length):
                    features = model.encode_text(tokens[:, :length]).float()
            rows.append(torch.nn.functional.normalize(features, dim=-1).numpy())
    return np.concatenate(rows).astype(np.float32)


def used_context(model: Any, tokens: torch.Tensor) -> int:
    """How many leading positions can change these prompts' rows: up to the last
    end-of-text token for a causal tower that pools it, else the whole context."""
    full = int(tokens.shape[1])
    if getattr(model, "text_pool_type", None) != "argmax" or not _is_causal(
        getattr(model, "attn_mask", None), full
    ):
        return full
    # argmax pooling reads the highest token id, which is end-of-text, in every row.
    return int(tokens.argmax(dim=-1).max()) + 1


def _is_causal(mask: Any, length: int) -> bool:
    """A (length, length) additive mask that hides exactly the positions ahead."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (length, length):
        return False
    ahead = torch.ones(length, length, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[ahead]).all()) and bool((mask[~ahead] == 0).all())


@contextlib.contextmanager
def context_cut_to(model: Any, length: int) -> Iterator[None]:
    """The model's positional embedding and causal mask cut to `length` positions while
    the block runs, then put back: `encode_text` adds and applies them whole."""
    positions, mask = model.positional_embedding, model.attn_mask
    if length >= positions.shape[0]:
        yield
        return
    try:
        model.positional_embedding = torch.nn.Parameter(positions[:length], requires_grad=False)
        model.attn_mask = mask[:length, :length]
        yield
    finally:
        model.positional_embedding, model.attn_mask = positions, mask
