"""Zero-shot prompts run over the context they use, and give open_clip's own rows."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import open_clip
import pytest
import torch

from app.analysis.garments import Vocabulary
from app.inference.texts import context_cut_to, encode_texts, used_context


@pytest.fixture(scope="module")
def clip(tiny_model_dir: Path) -> Any:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return open_clip.get_tokenizer("ViT-B-32")


def full_context_rows(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        features = model.encode_text(tokenizer(texts)).float()
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_prompts_give_the_rows_of_the_full_context(clip: Any, tokenizer: Any) -> None:
    texts = list(dict.fromkeys(Vocabulary.load().prompts()))
    texts.append("a photo of a person in " + "a long striped woollen coat, " * 20)  # truncated
    rows = encode_texts(clip, tokenizer, texts)
    expected = full_context_rows(clip, tokenizer, texts)
    assert rows.shape == expected.shape == (len(texts), clip.text_projection.shape[1])
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_a_pass_runs_up_to_its_last_end_of_text_only(
    clip: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    widths: list[int] = []
    encode = clip.encode_text

    def recording(tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        widths.append(int(tokens.shape[1]))
        assert clip.positional_embedding.shape[0] == tokens.shape[1]
        return encode(tokens, **kwargs)

    monkeypatch.setattr(clip, "encode_text", recording)
    texts = ["a red shirt", "a photo of a person wearing a long dark blue coat"]
    encode_texts(clip, tokenizer, texts)
    longest = max(len(tokenizer.encode(text)) for text in texts) + 2  # start and end
    assert widths == [longest]
    assert longest < clip.positional_embedding.shape[0] == 77  # put back afterwards


def test_the_context_is_put_back_when_the_pass_fails(clip: Any) -> None:
    positions, mask = clip.positional_embedding, clip.attn_mask
    seen: list[tuple[int, ...]] = []

    def failing_pass() -> None:
        with context_cut_to(clip, 5):
            seen.extend([tuple(clip.positional_embedding.shape), tuple(clip.attn_mask.shape)])
            raise RuntimeError("the forward pass failed")

    with pytest.raises(RuntimeError):
        failing_pass()
    assert seen == [(5, clip.positional_embedding.shape[1]), (5, 5)]
    assert clip.positional_embedding is positions
    assert clip.attn_mask is mask


def test_two_callers_never_run_inside_each_others_cut(
    clip: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []  # (tokens' width, positions the model adds)
    first_inside, let_first_go = threading.Event(), threading.Event()
    encode = clip.encode_text

    def held(tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        seen.append((int(tokens.shape[1]), int(clip.positional_embedding.shape[0])))
        if not first_inside.is_set():
            first_inside.set()
            let_first_go.wait(10)
        return encode(tokens, **kwargs)

    monkeypatch.setattr(clip, "encode_text", held)
    long_text = ["a photo of a person wearing a long dark blue coat"]
    second_rows: list[np.ndarray] = []
    first = threading.Thread(target=encode_texts, args=(clip, tokenizer, ["a red shirt"]))
    second = threading.Thread(
        target=lambda: second_rows.append(encode_texts(clip, tokenizer, long_text))
    )
    first.start()
    assert first_inside.wait(10)
    second.start()
    second.join(0.5)
    assert len(seen) == 1  # the second waits for the first pass to end
    let_first_go.set()
    first.join(10)
    second.join(10)
    assert [width for width, _ in seen] == [5, len(tokenizer.encode(long_text[0])) + 2]
    assert all(width == positions for width, positions in seen)
    monkeypatch.undo()
    np.testing.assert_allclose(
        second_rows[0], full_context_rows(clip, tokenizer, long_text), atol=1e-5
    )


@pytest.mark.parametrize(
    ("pool", "mask"),
    [
        ("argmax", None),  # attends both ways: every position reaches the pooled one
        ("argmax", torch.zeros(77, 77)),
        ("last", torch.full((77, 77), float("-inf")).triu(1)),
        ("eos", torch.full((77, 77), float("-inf")).triu(1)),
    ],
)
def test_a_tower_that_is_not_causal_with_argmax_pooling_runs_the_whole_context(
    pool: str, mask: torch.Tensor | None, tokenizer: Any
) -> None:
    tower = SimpleNamespace(text_pool_type=pool, attn_mask=mask)
    assert used_context(tower, tokenizer(["a red shirt"])) == 77


def test_a_causal_argmax_tower_runs_to_the_end_of_text(clip: Any, tokenizer: Any) -> None:
    assert used_context(clip, tokenizer(["a red shirt"])) == 5  # start, 3 words, end
