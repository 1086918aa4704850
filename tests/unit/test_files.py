"""Files we write are readable by the container's user, as the umask allows."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.inference.projection import Projection
from app.tools.random_model import write_random_model


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_random_model_weights_are_readable_by_others(tmp_path: Path, umask_022: None) -> None:
    folder = write_random_model(tmp_path / "model", arch="tiny", seed=1)
    for file in folder.iterdir():
        assert mode(file) == 0o644, file  # safetensors alone writes 0600


def test_projection_files_are_readable_by_others(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "p.safetensors"
    Projection(np.eye(4, 8, dtype=np.float32), np.zeros(8, np.float32), "m", "pca").save(path)
    assert mode(path) == 0o644


def test_a_stricter_umask_is_kept(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        path = tmp_path / "p.safetensors"
        Projection(np.eye(4, 8, dtype=np.float32), np.zeros(8, np.float32), "m", "pca").save(path)
    finally:
        os.umask(previous)
    assert mode(path) == 0o600
