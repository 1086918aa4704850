"""Projection files: PCA and centring fit, save, load, apply; wrong files refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.codec import decode_embedding, encode_embedding
from app.inference.projection import Projection, ProjectionError, fit_centring, fit_pca


def embeddings(n: int = 200, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(n, dim)) * np.linspace(3, 0.1, dim) + 2.0  # off-centre, like CLIP
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_pca_round_trip_matches_numpy_by_hand(tmp_path: Path) -> None:
    data = embeddings()
    projection, kept = fit_pca(data, 8, "ViT-B-32/openai")
    assert 0.5 < kept <= 1.0
    path = tmp_path / "pca8.safetensors"
    projection.save(path)
    loaded = Projection.load(path, expected_model="ViT-B-32/openai")
    assert (loaded.kind, loaded.input_dim, loaded.output_dim) == ("pca", 32, 8)
    assert float(loaded.metadata["explained_variance"]) == pytest.approx(kept, abs=1e-6)
    by_hand = (data - data.mean(axis=0)) @ np.linalg.svd(data - data.mean(axis=0))[2][:8].T
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    applied = loaded.apply(data)
    np.testing.assert_allclose(np.abs(np.sum(applied * by_hand, axis=1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(applied, axis=1), 1.0, atol=1e-6)


def test_whitening_equalises_component_variance() -> None:
    data = embeddings()
    projection, _ = fit_pca(data, 4, "m", whiten=True)
    unnormalised = (data - projection.mean) @ projection.weight.T
    np.testing.assert_allclose(unnormalised.var(axis=0, ddof=1), 1.0, rtol=1e-3)
    assert projection.kind == "pca-whiten"


def test_centring_is_the_identity_with_a_mean() -> None:
    data = embeddings()
    projection = fit_centring(data, "m")
    np.testing.assert_array_equal(projection.weight, np.eye(32))
    centred = projection.apply(data)
    assert abs(float(np.mean(centred @ centred.T))) < abs(float(np.mean(data @ data.T)))


def test_a_projection_for_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    fit_pca(embeddings(), 4, "ViT-L-14/openai")[0].save(path)
    with pytest.raises(ProjectionError, match="fitted for ViT-L-14/openai"):
        Projection.load(path, expected_model="ViT-B-32/openai")


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(ProjectionError, match="CLIP_PROJECTION"):
        Projection.load(path)


def test_float16_transport_round_trip() -> None:
    vector = np.random.default_rng(1).normal(size=512).astype(np.float32)
    vector /= np.linalg.norm(vector)
    text = encode_embedding(vector, "float16")
    assert len(__import__("base64").b64decode(text)) == 1024
    decoded = decode_embedding(text, "float16")
    assert decoded.dtype == np.float32
    assert decoded.shape == (512,)
    np.testing.assert_allclose(decoded, vector, atol=1e-3)
    assert decode_embedding(encode_embedding(vector)).shape == (512,)
