"""Garment types by CLIP zero-shot classification with prompt ensembles.

The vocabulary (labels, their names, prompt templates) is data: the default ships as
`data/garments.json`, and CLIP_GARMENT_VOCAB points at a replacement of the same shape.
Text embeddings are computed once at startup; per request only the image side runs,
through the shared batcher.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

TextEmbedder = Callable[[Sequence[str]], npt.NDArray[np.float32]]


class VocabularyError(ValueError):
    """The garment vocabulary file is missing or malformed."""


@dataclass(frozen=True)
class Vocabulary:
    templates: list[str]
    top: dict[str, list[str]]
    bottom: dict[str, list[str]]

    def prompts(self) -> list[str]:
        """Every prompt the classifiers embed, in the order they ask for them."""
        return [
            template.format(name)
            for labels in (self.top, self.bottom)
            for names in labels.values()
            for name in names
            for template in self.templates
        ]

    @classmethod
    def load(cls, path: str = "") -> Vocabulary:
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise VocabularyError(
                    f"CLIP_GARMENT_VOCAB={path}: cannot read it ({exc})"
                ) from None
            origin = f"CLIP_GARMENT_VOCAB={path}"
        else:
            text = resources.files("app.analysis").joinpath("data/garments.json").read_text("utf-8")
            origin = "the default garment vocabulary"
        try:
            document: Any = json.loads(text)
            vocabulary = cls(
                templates=[str(t) for t in document["templates"]],
                top={str(k): [str(n) for n in v] for k, v in document["top"].items()},
                bottom={str(k): [str(n) for n in v] for k, v in document["bottom"].items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise VocabularyError(
                f"{origin} must be JSON with `templates` (list of strings with '{{}}'), "
                f"`top` and `bottom` (label -> list of names): {exc!r}"
            ) from None
        if not vocabulary.templates or not all("{}" in t for t in vocabulary.templates):
            raise VocabularyError(f"{origin}: every template needs a '{{}}' placeholder")
        for part in ("top", "bottom"):
            labels = getattr(vocabulary, part)
            if len(labels) < 2 or not all(labels.values()):
                raise VocabularyError(f"{origin}: `{part}` needs two or more labels, each named")
        return vocabulary


@dataclass(frozen=True)
class GarmentPrediction:
    label: str
    score: float  # softmax probability over the part's labels


class ZeroShotClassifier:
    """One set of labels: class embeddings are the normalised mean of each label's
    prompt embeddings (CLIP's prompt ensembling)."""

    def __init__(self, labels: list[str], class_embeddings: npt.NDArray[np.float32], scale: float):
        self.labels = labels
        self.class_embeddings = class_embeddings
        self.scale = scale

    @classmethod
    def build(
        cls,
        labels: dict[str, list[str]],
        templates: list[str],
        embed_texts: TextEmbedder,
        scale: float,
    ) -> ZeroShotClassifier:
        rows = []
        for names in labels.values():
            prompts = [template.format(name) for name in names for template in templates]
            mean = embed_texts(prompts).astype(np.float64).mean(axis=0)
            rows.append(mean / np.linalg.norm(mean))
        return cls(list(labels), np.array(rows, dtype=np.float32), scale)

    def predict(self, image_embedding: npt.NDArray[np.float32]) -> GarmentPrediction:
        logits = self.scale * (self.class_embeddings.astype(np.float64) @ image_embedding)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = int(np.argmax(probabilities))
        return GarmentPrediction(self.labels[best], float(probabilities[best]))


@dataclass(frozen=True)
class GarmentClassifiers:
    top: ZeroShotClassifier
    bottom: ZeroShotClassifier

    @classmethod
    def build(
        cls, vocabulary: Vocabulary, embed_texts: TextEmbedder, scale: float
    ) -> GarmentClassifiers:
        return cls(
            top=ZeroShotClassifier.build(vocabulary.top, vocabulary.templates, embed_texts, scale),
            bottom=ZeroShotClassifier.build(
                vocabulary.bottom, vocabulary.templates, embed_texts, scale
            ),
        )
