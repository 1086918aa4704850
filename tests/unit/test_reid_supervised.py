"""The supervised (LDA) projection and the labelled-crop layouts it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.inference.projection import Projection, fit_pca
from app.reid.dataset import DatasetError, labelled_crops
from app.reid.metrics import evaluate
from app.reid.supervised import fit_supervised


def people(identities: int, per_person: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows where identity lives in 4 low-variance dimensions and 12 others carry
    large nuisance (view, light): PCA keeps the nuisance, LDA should keep the identity."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, 4)) * 0.5
    ids = np.repeat(np.arange(identities), per_person)
    rows = np.concatenate(
        [centres[ids] + rng.normal(size=(len(ids), 4)) * 0.1,
         rng.normal(size=(len(ids), 12)) * 2.0],
        axis=1,
    ) + 3.0  # fmt: skip
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), ids


def mean_ap(projection: Projection, rows: np.ndarray, ids: np.ndarray) -> float:
    projected = projection.apply(rows)
    # Every crop a query against all the others; alternate cameras, so that each has
    # matches left once its own camera (itself included) is excluded.
    cams = np.arange(len(ids)) % 2
    people = ids + 1  # Market-1501's numbering: 0 is a distractor, not a person
    return evaluate(projected @ projected.T, people, cams, people, cams).mean_ap


def test_lda_keeps_identity_where_pca_keeps_the_nuisance() -> None:
    train, train_ids = people(30, 6, seed=0)
    test, test_ids = people(20, 4, seed=1)  # other people: it must generalise
    lda, kept = fit_supervised(train, train_ids, 4, "m")
    pca, _ = fit_pca(train, 4, "m")
    assert lda.kind == "lda"
    assert (lda.output_dim, lda.input_dim) == (4, 16)
    assert 0.0 < kept <= 1.0
    assert mean_ap(lda, test, test_ids) > mean_ap(pca, test, test_ids) + 0.15


def test_lda_asks_for_no_more_directions_than_identities_give() -> None:
    rows, ids = people(5, 4, seed=0)
    with pytest.raises(ValueError, match="5 identities give at most 4 directions"):
        fit_supervised(rows, ids, 8, "m")
    with pytest.raises(ValueError, match="at least two identities"):
        fit_supervised(rows, np.zeros(len(rows), np.int64), 1, "m")


def test_lda_is_saved_and_served_as_any_projection(tmp_path: Path) -> None:
    rows, ids = people(10, 4, seed=2)
    lda, _ = fit_supervised(rows, ids, 3, "m")
    lda.save(tmp_path / "lda.safetensors")
    loaded = Projection.load(tmp_path / "lda.safetensors", expected_model="m")
    np.testing.assert_allclose(loaded.apply(rows), lda.apply(rows), atol=1e-6)
    assert loaded.metadata["identities"] == "10"


def test_labels_from_market_names_drop_junk_and_distractors(tmp_path: Path) -> None:
    for name in [
        "0002_c1s1_000001_00.jpg",
        "0002_c2s1_000002_00.jpg",
        "0007_c1s1_000003_00.jpg",
        "-1_c1s1_000004_00.jpg",
        "0000_c2s1_000005_00.jpg",
    ]:
        (tmp_path / name).write_bytes(b"")  # fmt: skip
    crops = labelled_crops(tmp_path)
    assert crops.layout == "market1501"
    assert [p.name[:4] for p in crops.paths] == ["0002", "0002", "0007"]
    assert crops.identities.tolist() == [0, 0, 1]
    assert crops.names == ["2", "7"]


def test_labels_from_one_folder_per_identity(tmp_path: Path) -> None:
    for person, count in (("alice", 2), ("bob", 3)):
        (tmp_path / person / "cam1").mkdir(parents=True)
        for i in range(count):
            (tmp_path / person / "cam1" / f"{i}.png").write_bytes(b"")
    crops = labelled_crops(tmp_path)
    assert crops.layout == "folders"
    assert crops.names == ["alice", "bob"]
    assert crops.identities.tolist() == [0, 0, 1, 1, 1]
    (tmp_path / "stray.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="one sub-folder per identity"):
        labelled_crops(tmp_path)


def test_a_few_market_names_among_folders_are_noted_not_silently_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for person in ("alice", "bob"):
        (tmp_path / person).mkdir()
        for i in range(3):
            (tmp_path / person / f"{i}.png").write_bytes(b"")
    (tmp_path / "bob" / "0002_c1s1_000001_00.jpg").write_bytes(b"")
    crops = labelled_crops(tmp_path)
    assert crops.layout == "folders"
    assert crops.names == ["alice", "bob"]
    note = capsys.readouterr().err
    assert "1 of the 7 crops have Market-1501 names" in note
    assert "labelled by its sub-folder" in note
