"""A linear map applied after the image tower: PCA, whitened PCA, centring, or a learned
layer, all in one safetensors file.

    y = normalise(W @ (x - mean))        x: the L2-normalised CLIP embedding

Tensors `weight` (out, in) and `mean` (in,); metadata `model` (the model id it was fitted
for, as /info reports it), `kind`, and `explained_variance` where PCA gives one. Centring
is the identity map with a mean, so it is the same file and the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


class ProjectionError(ValueError):
    """The projection file is unreadable, malformed, or fitted for another model."""


@dataclass(frozen=True)
class Projection:
    weight: npt.NDArray[np.float32]  # (out, in)
    mean: npt.NDArray[np.float32]  # (in,)
    model: str
    kind: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        projected = (rows.astype(np.float64) - self.mean) @ self.weight.T.astype(np.float64)
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        unit: npt.NDArray[np.float32] = (projected / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit

    def save(self, path: str | Path) -> None:
        metadata = {**self.metadata, "model": self.model, "kind": self.kind}
        metadata["output_dim"] = str(self.output_dim)
        save_file(
            {"weight": self.weight.astype(np.float32), "mean": self.mean.astype(np.float32)},
            str(path),
            metadata=metadata,
        )

    @classmethod
    def load(cls, path: str | Path, expected_model: str | None = None) -> Projection:
        where = f"CLIP_PROJECTION={path}"
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="numpy") as handle:
                metadata = dict(handle.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            raise ProjectionError(f"{where}: not a readable safetensors file ({exc})") from None
        if "weight" not in tensors or "mean" not in tensors or "model" not in metadata:
            raise ProjectionError(f"{where}: needs tensors `weight`, `mean` and metadata `model`")
        weight, mean = tensors["weight"], tensors["mean"]
        if weight.ndim != 2 or mean.shape != (weight.shape[1],):
            raise ProjectionError(
                f"{where}: weight {weight.shape} and mean {mean.shape} do not fit together"
            )
        if expected_model is not None and metadata["model"] != expected_model:
            raise ProjectionError(
                f"{where} was fitted for {metadata['model']}, but the service runs "
                f"{expected_model}; fit one for this model (python -m app.reid.fit_projection)"
            )
        return cls(weight, mean, metadata["model"], metadata.get("kind", "linear"), metadata)


def fit_pca(
    embeddings: npt.NDArray[np.float32], dim: int, model: str, whiten: bool = False
) -> tuple[Projection, float]:
    """PCA of the embeddings to `dim` components; returns the projection and the fraction
    of variance it keeps."""
    if not 1 <= dim <= embeddings.shape[1]:
        raise ValueError(f"dim must be between 1 and {embeddings.shape[1]}")
    if len(embeddings) < 2:
        raise ValueError("PCA needs at least two embeddings")
    data = embeddings.astype(np.float64)
    mean = data.mean(axis=0)
    _, singular, components = np.linalg.svd(data - mean, full_matrices=False)
    variance = singular**2 / max(1, len(data) - 1)
    weight = components[:dim]
    if whiten:
        weight = weight / np.sqrt(np.maximum(variance[:dim], 1e-12))[:, None]
    kept = float(variance[:dim].sum() / variance.sum())
    kind = "pca-whiten" if whiten else "pca"
    metadata = {"explained_variance": f"{kept:.6f}", "fitted_on": str(len(data))}
    return Projection(
        weight.astype(np.float32), mean.astype(np.float32), model, kind, metadata
    ), kept


def fit_centring(embeddings: npt.NDArray[np.float32], model: str) -> Projection:
    """Subtract the mean embedding: CLIP's embeddings share a large common offset."""
    dim = embeddings.shape[1]
    mean = embeddings.astype(np.float64).mean(axis=0).astype(np.float32)
    return Projection(np.eye(dim, dtype=np.float32), mean, model, "centre")
