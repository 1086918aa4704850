"""A projection learned from labelled crops without training: regularised LDA.

    W = V^T Sw^(-1/2)      Sw: within-identity covariance, shrunk toward a scaled identity
                           V: top directions of the between-identity covariance after it

Within-identity whitening (Sw^(-1/2)) turns down what changes between crops of one person
(view, light, background, pose) and turns up what stays; the between-identity PCA that
follows keeps the directions along which people differ most. Mahalanobis-style metric
learning of the KISSME family (Koestinger et al., CVPR 2012; XQDA, Liao et al., CVPR 2015)
rests on the same within-class covariance; this is its closed-form, projection-shaped
member, so it is written in the same file format and served by the same code as PCA
(app.inference.projection). The shrinkage keeps Sw invertible when there are fewer
crops than dimensions, as there usually are.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.inference.projection import Projection

DEFAULT_SHRINKAGE = 0.1


def fit_supervised(
    embeddings: npt.NDArray[np.float32],
    identities: npt.NDArray[np.integer],
    dim: int,
    model: str,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> tuple[Projection, float]:
    """LDA of the embeddings by identity to `dim` directions; returns the projection and
    the fraction of between-identity variance (after within-identity whitening) it keeps."""
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], not {shrinkage}")
    data = embeddings.astype(np.float64)
    classes, inverse, counts = np.unique(identities, return_inverse=True, return_counts=True)
    if len(classes) < 2 or len(data) <= len(classes):
        raise ValueError(
            f"{len(data)} crops of {len(classes)} identities: a supervised fit needs at least "
            "two identities and some with more than one crop"
        )
    if not 1 <= dim <= len(classes) - 1:
        # The between-identity covariance has rank (identities - 1): directions past it
        # carry no identity at all.
        raise ValueError(
            f"{len(classes)} identities give at most {len(classes) - 1} directions that "
            f"tell people apart, fewer than the {dim} asked for; ask for "
            f"{len(classes) - 1} or fewer, or label more identities"
        )
    features = data.shape[1]
    mean = data.mean(axis=0)
    class_means = np.zeros((len(classes), features))
    np.add.at(class_means, inverse, data)
    class_means /= counts[:, None]
    within = data - class_means[inverse]
    scatter = within.T @ within / (len(data) - len(classes))
    shrunk = (1 - shrinkage) * scatter + shrinkage * (np.trace(scatter) / features) * np.eye(
        features
    )
    values, vectors = np.linalg.eigh(shrunk)
    whiten = vectors @ np.diag(1 / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T
    between = (class_means - mean) * np.sqrt(counts / len(data))[:, None]
    whitened_between = whiten @ between.T @ between @ whiten
    spread, directions = np.linalg.eigh(whitened_between)
    top = np.argsort(spread)[::-1][:dim]
    weight = directions[:, top].T @ whiten
    kept = float(spread[top].sum() / max(spread.sum(), 1e-300))
    metadata = {
        "between_variance_kept": f"{kept:.6f}",
        "fitted_on": str(len(data)),
        "identities": str(len(classes)),
        "shrinkage": f"{shrinkage:g}",
    }
    projection = Projection(
        weight.astype(np.float32), mean.astype(np.float32), model, "lda", metadata
    )
    return projection, kept
