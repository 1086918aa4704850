"""Garment vocabulary and zero-shot classification, with a fake text embedder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from app.analysis.garments import GarmentClassifiers, Vocabulary, VocabularyError


def fake_embedder(texts: Sequence[str]) -> np.ndarray:
    """Deterministic unit vectors per text: a hash-seeded direction."""
    rows = []
    for text in texts:
        rng = np.random.default_rng(sum(map(ord, text)) * 7919 + len(text))
        vector = rng.normal(size=16)
        rows.append(vector / np.linalg.norm(vector))
    return np.array(rows, dtype=np.float32)


def test_default_vocabulary_ships_with_the_package() -> None:
    vocabulary = Vocabulary.load()
    assert {"t-shirt", "shirt", "sweater", "hoodie", "jacket", "coat", "tank top", "dress"} <= set(
        vocabulary.top
    )
    assert {"jeans", "trousers", "shorts", "skirt", "dress", "leggings"} <= set(vocabulary.bottom)
    assert all("{}" in template for template in vocabulary.templates)


def test_predictions_are_probabilities_over_the_parts_own_labels() -> None:
    vocabulary = Vocabulary.load()
    classifiers = GarmentClassifiers.build(vocabulary, fake_embedder, scale=100.0)
    target = classifiers.bottom.class_embeddings[classifiers.bottom.labels.index("skirt")]
    prediction = classifiers.bottom.predict(target)
    assert prediction.label == "skirt"
    assert 0.0 < prediction.score <= 1.0
    top = classifiers.top.predict(target)
    assert top.label in vocabulary.top
    assert classifiers.top.predict(target) == top  # reproducible


def test_a_vocabulary_file_overrides_the_default(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(
        json.dumps(
            {
                "templates": ["a photo of {}."],
                "top": {"vest": ["a vest"], "poncho": ["a poncho"]},
                "bottom": {"kilt": ["a kilt"], "sarong": ["a sarong"]},
            }
        )
    )
    vocabulary = Vocabulary.load(str(path))
    assert list(vocabulary.top) == ["vest", "poncho"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "must be JSON"),
        ('{"templates": ["x {}"], "top": {}}', "must be JSON"),
        (
            '{"templates": ["no placeholder"], "top": {"a": ["a"], "b": ["b"]}, '
            '"bottom": {"a": ["a"], "b": ["b"]}}',
            "placeholder",
        ),
        (
            '{"templates": ["{}"], "top": {"a": ["a"]}, "bottom": {"a": ["a"], "b": ["b"]}}',
            "two or more",
        ),
    ],
)
def test_bad_vocabulary_files_name_the_setting(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(VocabularyError, match=reason) as caught:
        Vocabulary.load(str(path))
    assert "CLIP_GARMENT_VOCAB" in str(caught.value)


def test_missing_vocabulary_file_names_the_setting() -> None:
    with pytest.raises(VocabularyError, match=r"CLIP_GARMENT_VOCAB=/no/such\.json"):
        Vocabulary.load("/no/such.json")


def test_the_prompts_are_every_text_the_classifiers_embed() -> None:
    vocabulary = Vocabulary.load()
    asked: list[str] = []

    def recording(texts: Sequence[str]) -> np.ndarray:
        asked.extend(texts)
        return fake_embedder(texts)

    GarmentClassifiers.build(vocabulary, recording, scale=100.0)
    assert vocabulary.prompts() == asked
