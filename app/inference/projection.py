"""A linear map applied after the image tower: PCA, whitened PCA, centring, or a learned
layer, all in one safetensors file.

    y = normalise(W @ (x - mean))        x: the L2-normalised CLIP embedding

Tensors `weight` (out, in) and `mean` (in,); metadata `model` (the model id it was fitted
for, as /info reports it), `kind`, `explained_variance` where PCA gives one, and
`weights_sha256`: the hash of the image tower's weights (app.inference.runtimes.
weights_digest), which tells apart two models whose readable ids are the same (two
`local-dir:` folders of one name). Centring is the identity map with a mean, so it is the
same file and the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from app.files import as_umask_allows

WEIGHTS_KEY = "weights_sha256"


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
    def weights_sha256(self) -> str:
        """Hash of the weights it was fitted on; empty for files written before it existed."""
        return self.metadata.get(WEIGHTS_KEY, "")

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
        fault = unusable(self.weight, self.mean)
        if fault is not None:
            raise ProjectionError(f"{path}: not written, {fault}")
        metadata = {**self.metadata, "model": self.model, "kind": self.kind}
        metadata["output_dim"] = str(self.output_dim)
        save_file(
            {"weight": self.weight.astype(np.float32), "mean": self.mean.astype(np.float32)},
            str(path),
            metadata=metadata,
        )
        as_umask_allows(path)  # the service may run as another user (the image's uid 10001)

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected_model: str | None = None,
        expected_weights: str | None = None,
        option: str = "CLIP_PROJECTION",
        runs: str = "the service runs",
    ) -> Projection:
        """Read and check a projection file. `expected_model` is the readable model id,
        `expected_weights` its weights' hash, where known; `option` and `runs` word the
        errors for whoever reads them (the service's setting, or a command-line option)."""
        projection = cls.read(path, option)
        projection.check_fitted_for(expected_model, expected_weights, f"{option}={path}", runs)
        return projection

    @classmethod
    def read(cls, path: str | Path, option: str = "CLIP_PROJECTION") -> Projection:
        """A projection file's contents, checked for use but not yet against a model: the
        service reads it before the seconds of loading one, so a bad file fails at once."""
        where = f"{option}={path}"
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="numpy") as handle:
                metadata = dict(handle.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            raise ProjectionError(f"{where}: not a readable safetensors file ({exc})") from None
        if "weight" not in tensors or "mean" not in tensors or "model" not in metadata:
            raise ProjectionError(f"{where}: needs tensors `weight`, `mean` and metadata `model`")
        weight, mean = tensors["weight"], tensors["mean"]
        fault = unusable(weight, mean)
        if fault is not None:
            raise ProjectionError(f"{where}: {fault}; refit it (python -m app.reid.fit_projection)")
        return cls(weight, mean, metadata["model"], metadata.get("kind", "linear"), metadata)

    def check_fitted_for(
        self,
        expected_model: str | None,
        expected_weights: str | None,
        where: str = "CLIP_PROJECTION",
        runs: str = "the service runs",
    ) -> None:
        """ProjectionError unless this was fitted for the model: by the weights' hash where
        both are known, else by the readable model id (None: not checked)."""
        fitted_for, fitted_weights = self.model, self.weights_sha256
        if expected_weights and fitted_weights:
            # The hash decides: readable ids repeat (local-dir: names only the folder).
            if fitted_weights != expected_weights:
                raise ProjectionError(
                    f"{where} was fitted for {fitted_for} (weights {fitted_weights[:12]}), "
                    f"but {runs} {expected_model or 'a model'} with other weights "
                    f"({expected_weights[:12]}); fit one for this model "
                    "(python -m app.reid.fit_projection)"
                )
        elif expected_model is not None and fitted_for != expected_model:
            # Files written before weights_sha256 existed (or a caller that knows no hash)
            # are checked by the readable id alone: old files keep loading.
            raise ProjectionError(
                f"{where} was fitted for {fitted_for}, but {runs} "
                f"{expected_model}; fit one for this model (python -m app.reid.fit_projection)"
            )


def unusable(weight: npt.NDArray[Any], mean: npt.NDArray[Any]) -> str | None:
    """Why a weight and mean make no projection to serve, or None. One NaN turns every
    served embedding into NaNs; a weight with no rows, or of zeros, every one into an
    empty or zero vector: refused where the message can name the file."""
    if weight.ndim != 2 or mean.shape != (weight.shape[1],):
        return f"weight {weight.shape} and mean {mean.shape} do not fit together"
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        return f"weight {weight.shape} maps to or from 0 dimensions"
    for name, tensor in (("weight", weight), ("mean", mean)):
        bad = int(np.size(tensor) - np.count_nonzero(np.isfinite(tensor)))
        if bad:
            return f"{name} holds {bad} NaN or infinite value(s)"
    if not np.any(weight):
        return "weight is all zeros: every embedding would project to nothing"
    return None


def data_rank(centred: npt.NDArray[np.float64], singular: npt.NDArray[np.float64]) -> int:
    """Dimensions the centred rows span: singular values above float32 rounding (the
    embeddings are float32), as numpy's matrix_rank reckons for float32."""
    if not len(singular):
        return 0
    tolerance = float(singular.max()) * max(centred.shape) * float(np.finfo(np.float32).eps)
    return int(np.count_nonzero(singular > tolerance))


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
    rank = data_rank(data - mean, singular)
    if dim > rank:
        # Past the rank there are no components (n rows give at most n - 1), or only ones of
        # zero variance, which whitening scales by ~1e6 until they swamp the rest.
        raise ValueError(
            f"{len(data)} embeddings span only {rank} dimensions once centred, fewer than "
            f"the {dim} asked for; ask for {rank} or fewer, or fit on more crops "
            f"(at least {dim + 1}, more is better)"
        )
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
