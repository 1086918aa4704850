"""Projection files: PCA and centring fit, save, load, apply; wrong files refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.codec import decode_embedding, encode_embedding
from app.inference.projection import (
    WEIGHTS_KEY,
    Projection,
    ProjectionError,
    fit_centring,
    fit_pca,
)


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


def test_pca_past_the_data_rank_is_refused_whitened_or_not() -> None:
    # 20 crops span at most 19 dimensions once centred: a 24-d PCA has no 24 components,
    # and whitening would blow the zero-variance ones up until they swamp the rest.
    data = embeddings(n=20)
    for whiten in (False, True):
        with pytest.raises(ValueError, match="span only 19 dimensions"):
            fit_pca(data, 24, "m", whiten=whiten)
    projection, _ = fit_pca(data, 19, "m", whiten=True)
    assert projection.output_dim == 19
    assert float(np.abs(projection.weight).max()) < 1e3  # no direction scaled by ~1e6


def test_a_file_with_other_weights_is_refused_though_the_model_id_is_the_same(
    tmp_path: Path,
) -> None:
    path = tmp_path / "p.safetensors"
    projection, _ = fit_pca(embeddings(), 4, "local-dir:model")
    replace(projection, metadata={**projection.metadata, WEIGHTS_KEY: "a" * 64}).save(path)
    with pytest.raises(ProjectionError, match="with other weights"):
        Projection.load(path, expected_model="local-dir:model", expected_weights="b" * 64)
    # The hash decides: the same weights in a renamed folder are the same model.
    loaded = Projection.load(path, expected_model="local-dir:renamed", expected_weights="a" * 64)
    assert loaded.weights_sha256 == "a" * 64


def test_files_without_a_weights_hash_still_load_checked_by_model_id(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    fit_pca(embeddings(), 4, "ViT-B-32/openai")[0].save(path)  # as files were written before
    assert Projection.load(path, "ViT-B-32/openai", expected_weights="c" * 64).weights_sha256 == ""
    with pytest.raises(ProjectionError, match="fitted for ViT-B-32/openai"):
        Projection.load(path, "ViT-L-14/openai", expected_weights="c" * 64)


@pytest.mark.parametrize("tensor", ["weight", "mean"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_values_are_refused_at_load(
    tmp_path: Path, tensor: str, bad: float
) -> None:
    path = tmp_path / "nan.safetensors"
    tensors = {"weight": np.eye(4, dtype=np.float32), "mean": np.zeros(4, np.float32)}
    tensors[tensor].reshape(-1)[0] = bad  # one value
    save_file(tensors, str(path), metadata={"model": "m", "kind": "pca"})
    with pytest.raises(ProjectionError, match=rf"CLIP_PROJECTION={path}: {tensor} holds 1 NaN"):
        Projection.load(path, expected_model="m")


def test_a_projection_with_nan_is_never_written(tmp_path: Path) -> None:
    weight = np.eye(4, dtype=np.float32)
    weight[1, 2] = np.nan
    with pytest.raises(ProjectionError, match="NaN"):
        Projection(weight, np.zeros(4, np.float32), "m", "pca").save(tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize(
    ("weight", "fault"),
    [
        # From --from-linear: a layer of 0 outputs served "dim": 0 and empty embeddings,
        # one of zeros a zero vector for every crop; both exited 0 and were served.
        (np.zeros((0, 4), np.float32), r"weight \(0, 4\) maps to or from 0 dimensions"),
        (np.zeros((2, 4), np.float32), "weight is all zeros"),
    ],
)
def test_a_projection_that_maps_to_nothing_is_neither_written_nor_loaded(
    tmp_path: Path, weight: np.ndarray, fault: str
) -> None:
    path = tmp_path / "p.safetensors"
    with pytest.raises(ProjectionError, match=fault):
        Projection(weight, np.zeros(4, np.float32), "m", "linear").save(path)
    assert not path.exists()
    save_file(
        {"weight": weight, "mean": np.zeros(4, np.float32)}, str(path), metadata={"model": "m"}
    )
    with pytest.raises(ProjectionError, match=rf"CLIP_PROJECTION={path}: {fault}"):
        Projection.load(path, expected_model="m")


def test_errors_name_the_option_the_caller_gives(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    fit_pca(embeddings(), 4, "ViT-L-14/openai")[0].save(path)
    with pytest.raises(ProjectionError) as caught:
        Projection.load(path, "ViT-B-32/openai", option="--projection", runs="--model is")
    message = str(caught.value)
    assert message.startswith(f"--projection={path} was fitted for ViT-L-14/openai, but --model")
    assert "CLIP_PROJECTION" not in message
    assert "service" not in message
