"""Weights resolution fails within seconds and names the setting to change."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from app.inference import weights
from app.inference.weights import WeightsUnavailable, resolve_model_source


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


def test_checkpoint_path_is_taken_as_is(tmp_path: Path) -> None:
    checkpoint = tmp_path / "reid-finetune.pt"
    checkpoint.write_bytes(b"x")
    source = resolve_model_source("ViT-B-32", str(checkpoint))
    assert source.checkpoint == str(checkpoint)
    assert source.display_name == "ViT-B-32/reid-finetune.pt"
