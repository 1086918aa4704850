"""Weights resolution fails within seconds and names the setting to change."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.inference import weights
from app.inference.weights import (
    ModelSource,
    WeightsUnavailable,
    WeightsUnreadable,
    resolve_model_source,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-cache")

    def nothing_cached(*args: object, **kwargs: object) -> str:
        if kwargs.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        raise AssertionError("a download was attempted without network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", nothing_cached)


def test_a_tag_without_network_fails_fast_naming_the_settings(no_network: None) -> None:
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_model_source("ViT-B-32", "openai")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "CLIP_PRETRAINED=openai" in message
    assert "local-dir" in message


def test_hf_hub_without_network_fails_fast(no_network: None) -> None:
    with pytest.raises(WeightsUnavailable, match="CLIP_MODEL=hf-hub:org/repo"):
        resolve_model_source("hf-hub:org/repo", "ignored")


def test_offline_mode_is_honoured_without_probing(
    no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE"):
        resolve_model_source("ViT-B-32", "openai")


def test_cached_weights_are_used_without_network(
    no_network: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"x")
    monkeypatch.setattr(weights, "_hub_file", lambda repo, names, setting: str(cached))
    source = resolve_model_source("ViT-B-32", "openai")
    assert source.checkpoint == str(cached)
    assert source.display_name == "ViT-B-32/openai"
    # OpenAI's weights were trained with QuickGELU; the built-in config lacks it.
    assert source.open_clip_kwargs["force_quick_gelu"] is True


@pytest.mark.parametrize(
    ("model", "pretrained", "setting"),
    [
        ("ViT-B-32", "no-such-tag", "CLIP_PRETRAINED=no-such-tag"),
        ("ViT-B-32", "", "CLIP_PRETRAINED is empty"),
        ("NoSuchNet", "openai", "CLIP_MODEL=NoSuchNet"),
        ("local-dir:/no/such/dir", "", "CLIP_MODEL=local-dir:/no/such/dir"),
    ],
)
def test_bad_settings_are_named(model: str, pretrained: str, setting: str) -> None:
    with pytest.raises(WeightsUnavailable, match=setting.replace("/", ".")):
        resolve_model_source(model, pretrained)


def test_local_dir_needs_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match=r"open_clip_config\.json"):
        resolve_model_source(f"local-dir:{tmp_path}", "")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(WeightsUnavailable, match="no weights file"):
        resolve_model_source(f"local-dir:{tmp_path}", "")


def test_a_local_dir_with_only_a_pt_file_is_refused_not_served_random(tmp_path: Path) -> None:
    """open_clip's local-dir loader reads .safetensors, .bin and .pth only: a lone .pt
    would leave the model randomly initialised with nothing but a log line."""
    (tmp_path / "open_clip_config.json").write_text("{}")
    (tmp_path / "weights.pt").write_bytes(b"not read")
    with pytest.raises(WeightsUnavailable, match=r"weights\.pt is not read by open_clip"):
        resolve_model_source(f"local-dir:{tmp_path}", "")


def test_checkpoint_path_is_taken_as_is(tmp_path: Path) -> None:
    checkpoint = tmp_path / "reid-finetune.pt"
    checkpoint.write_bytes(b"x")
    source = resolve_model_source("ViT-B-32", str(checkpoint))
    assert source.checkpoint == str(checkpoint)
    assert source.display_name == "ViT-B-32/reid-finetune.pt"


Deny = Callable[[Path], None]


@pytest.fixture(params=["chmod", "simulated"])
def deny_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deny]:
    """Takes away this process's right to read a file or folder: for real with chmod, and
    simulated (opening and listing raise PermissionError), which runs even as root."""
    if request.param == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root reads whatever the mode; the simulated variant stands in")
        denied: list[Path] = []

        def chmod_000(path: Path) -> None:
            path.chmod(0)
            denied.append(path)

        yield chmod_000
        for path in denied:
            path.chmod(0o755 if path.is_dir() else 0o644)  # so tmp_path can be cleaned up
        return
    simulated: set[Path] = set()
    real_open, real_listdir = Path.open, os.listdir

    def refuse(path: object) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self in simulated:
            raise refuse(self)
        return real_open(self, *args, **kwargs)

    def listdir(path: Any = ".") -> list[str]:
        if Path(path) in simulated:
            raise refuse(path)
        return real_listdir(path)

    monkeypatch.setattr(Path, "open", open_)
    monkeypatch.setattr(os, "listdir", listdir)
    yield simulated.add


def local_model_dir(folder: Path) -> Path:
    """A local-dir layout: resolution reads no file's content, so any bytes do."""
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text("{}")
    (folder / "open_clip_model.safetensors").write_bytes(b"x")
    return folder


def assert_reported_as_unreadable(error: WeightsUnavailable, setting: str, path: Path) -> None:
    message = str(error)
    assert isinstance(error, WeightsUnreadable)
    assert setting in message
    assert f"{path} exists but cannot be read (permission denied)" in message
    assert "chmod" in message
    assert "the user the service runs as" in message
    assert "No such file" not in message
    assert "not found" not in message


def test_an_unreadable_checkpoint_is_not_reported_missing(
    deny_reading: Deny, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "reid-finetune.safetensors"
    checkpoint.write_bytes(b"x")
    deny_reading(checkpoint)
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_model_source("ViT-B-32", str(checkpoint))
    assert_reported_as_unreadable(caught.value, f"CLIP_PRETRAINED={checkpoint}", checkpoint)


@pytest.mark.parametrize(
    "unreadable", ["open_clip_model.safetensors", "open_clip_config.json", "."]
)
def test_an_unreadable_local_dir_is_not_reported_missing(
    deny_reading: Deny, tmp_path: Path, unreadable: str
) -> None:
    folder = local_model_dir(tmp_path / "model")
    denied = folder / unreadable if unreadable != "." else folder
    deny_reading(denied)
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_model_source(f"local-dir:{folder}", "")
    assert_reported_as_unreadable(caught.value, f"CLIP_MODEL=local-dir:{folder}", denied)


def test_an_unreadable_file_open_clip_would_not_load_is_ignored(
    deny_reading: Deny, tmp_path: Path
) -> None:
    folder = local_model_dir(tmp_path)
    stray = folder / "old-finetune.bin"
    stray.write_bytes(b"x")
    deny_reading(stray)
    assert resolve_model_source(f"local-dir:{folder}", "").model_name == f"local-dir:{folder}"


def test_weights_files_are_named_as_the_kernel_maps_them(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "3f2a"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "open_clip_model.safetensors").symlink_to(blob)  # as the Hugging Face cache
    (snapshot / "open_clip_config.json").write_text("{}")
    from_folder = ModelSource(model_name=f"local-dir:{snapshot}", checkpoint=None, display_name="x")
    from_file = ModelSource(
        model_name="ViT-B-32", checkpoint=str(snapshot / "open_clip_model.safetensors"),
        display_name="y",
    )  # fmt: skip
    assert from_folder.weights_files() == [str(blob)]
    assert from_file.weights_files() == [str(blob)]
