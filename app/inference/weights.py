"""Find the model's weights before open_clip is asked to build it, and fail fast.

open_clip downloads on demand through huggingface_hub, which retries a dead network for
about a minute before it gives up. A service that takes a minute to say "no network" is
a service an orchestrator restarts in a loop, so we resolve the files ourselves: the local
cache first, a short reachability probe next, and a download only when the hub answers.
Every failure names the setting to change.

Files are opened here as the loader will open them, because the loaders misreport what
they may not read: os.path.isfile() and glob() answer "no" for what permissions hide, and
safetensors reports a file it may not open as "No such file or directory". A checkpoint
mounted with the wrong owner would otherwise read as a missing one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# open_clip is imported where it is used: its import takes seconds (torch, torchvision),
# which the re-ID tools' --help and option checks, importing this module, should not pay.

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
PROBE_TIMEOUT_S = 3.0


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be had; the message says which setting to change."""


class WeightsUnreadable(WeightsUnavailable):
    """A model file is there but this process may not read it: permissions, not the setting."""


@dataclass(frozen=True)
class ModelSource:
    """What to hand to open_clip: a name it can build and, optionally, a weights file."""

    model_name: str  # a built-in name or `local-dir:<path>`
    checkpoint: str | None  # weights file for a built-in name
    display_name: str  # e.g. ViT-B-32/openai, for /info and responses
    open_clip_kwargs: dict[str, Any] = field(default_factory=dict)

    def weights_files(self) -> list[str]:
        """The weights file(s) open_clip may load, links resolved: the paths a mapping of
        them shows in /proc/self/maps (the Hugging Face cache links to its blobs)."""
        if self.checkpoint:
            return [str(Path(self.checkpoint).resolve())]
        folder = Path(self.model_name.removeprefix(LOCAL_DIR))
        found = (p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))
        return [str(p.resolve()) for p in found]


def reported_model_id(model: str) -> str:
    """The id /info reports for a CLIP_MODEL of `local-dir:<path>`: the folder's name
    alone (where it lies is the deployment's business, not the API's); other spellings
    as given."""
    if model.startswith(LOCAL_DIR):
        return f"{LOCAL_DIR}{Path(model[len(LOCAL_DIR) :]).expanduser().name}"
    return model


def resolve_model_source(model: str, pretrained: str) -> ModelSource:
    if model.startswith(LOCAL_DIR):
        return _resolve_local_dir(model[len(LOCAL_DIR) :])
    if model.startswith(HF_HUB):
        return _resolve_hf_hub(model[len(HF_HUB) :])
    return _resolve_builtin(model, pretrained)


def _resolve_local_dir(path_text: str) -> ModelSource:
    path = Path(path_text).expanduser()
    setting = f"CLIP_MODEL=local-dir:{path_text}"
    if not _readable_dir(path, setting, "the model folder"):
        found = "is a file, not a folder" if path.is_file() else "directory not found"
        raise WeightsUnavailable(
            f"{setting}: {found}. Point CLIP_MODEL at a "
            "folder holding open_clip_config.json and the weights (python -m "
            "app.tools.random_model writes one for testing)."
        )
    if not _readable_file(path / "open_clip_config.json", setting, "the model config"):
        raise WeightsUnavailable(f"{setting}: no open_clip_config.json in that folder.")
    # Only what open_clip's local-dir loader looks for: a folder holding just a *.pt
    # would pass here and then be served with random weights (open_clip only logs it).
    weights = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in path.glob(ext)]
    if not weights:
        stray = sorted(p.name for p in path.glob("*.pt"))
        hint = f" ({', '.join(stray)} is not read by open_clip: rename it to .pth)" if stray else ""
        raise WeightsUnavailable(
            f"{setting}: no weights file (*.safetensors, *.bin, *.pth) in that folder{hint}."
        )
    for checkpoint in _checkpoints_open_clip_loads(path, weights):
        _readable_file(checkpoint, setting, "the weights file")
    return ModelSource(
        model_name=f"{LOCAL_DIR}{path}",
        checkpoint=None,
        display_name=reported_model_id(f"{LOCAL_DIR}{path_text}"),
    )


def _checkpoints_open_clip_loads(folder: Path, found: list[Path]) -> list[Path]:
    """The weights file(s) open_clip will load from `folder`, so that a stray unreadable
    file beside them does not stop the service. Every file found, should open_clip's
    (private) chooser ever be gone."""
    import open_clip

    choose = getattr(getattr(open_clip, "factory", None), "_find_checkpoint_in_dir", None)
    if len(found) > 1 and callable(choose):
        chosen = choose(folder)
        if isinstance(chosen, str):
            return [Path(chosen)]
    return found


def _resolve_builtin(model: str, pretrained: str) -> ModelSource:
    import open_clip

    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise WeightsUnavailable(
            f"CLIP_MODEL={model} is not an open_clip model name. Use one of "
            "open_clip.list_models() (e.g. ViT-B-32), local-dir:/path or hf-hub:org/repo."
        )
    pretrained = pretrained.strip()
    if not pretrained:
        raise WeightsUnavailable(
            "CLIP_PRETRAINED is empty: random weights are never served. Set a pretrained "
            "tag (e.g. openai) or a checkpoint file path."
        )
    if _readable_file(Path(pretrained), f"CLIP_PRETRAINED={pretrained}", "the checkpoint"):
        return ModelSource(
            model_name=name,
            checkpoint=pretrained,
            display_name=f"{name}/{Path(pretrained).name}",
        )
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg and Path(pretrained).is_dir():
        raise WeightsUnavailable(
            f"CLIP_PRETRAINED={pretrained} is a folder; name the checkpoint file in it, or "
            "serve the folder with CLIP_MODEL=local-dir:<folder> (open_clip_config.json "
            "and the weights)"
        )
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise WeightsUnavailable(
            f"CLIP_PRETRAINED={pretrained} is neither a file nor a pretrained tag of {name}. "
            f"Known tags: {', '.join(tags) or 'none'}."
        )
    checkpoint = _fetch_tag_weights(name, pretrained, tag_cfg)
    _readable_file(
        Path(checkpoint), f"CLIP_MODEL={name} CLIP_PRETRAINED={pretrained}", "the cached weights"
    )
    # What open_clip would take from the tag had it downloaded the file itself: the
    # preprocessing the weights were trained with, and QuickGELU for OpenAI's weights
    # (ViT-B-32's built-in config lacks it; without it the features are subtly wrong).
    kwargs: dict[str, Any] = {
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
        "image_mean": tag_cfg.get("mean"),
        "image_std": tag_cfg.get("std"),
        "image_interpolation": tag_cfg.get("interpolation"),
        "image_resize_mode": tag_cfg.get("resize_mode"),
    }
    return ModelSource(
        model_name=name,
        checkpoint=checkpoint,
        display_name=f"{name}/{pretrained}",
        open_clip_kwargs={k: v for k, v in kwargs.items() if v is not None},
    )


def _fetch_tag_weights(name: str, tag: str, tag_cfg: dict[str, Any]) -> str:
    import open_clip

    setting = f"CLIP_MODEL={name} CLIP_PRETRAINED={tag}"
    if "file" in tag_cfg:
        return str(tag_cfg["file"])
    hub_path = tag_cfg.get("hf_hub", "")
    if hub_path:
        repo_id, filename = os.path.split(hub_path)
        candidates = [filename] if filename else []
        candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return _hub_file(repo_id, candidates, setting)
    url = tag_cfg.get("url", "")
    if url:
        _probe(url, setting)
        return str(open_clip.download_pretrained_from_url(url))
    raise WeightsUnavailable(f"{setting}: the tag names no download location.")


def _resolve_hf_hub(repo_id: str) -> ModelSource:
    setting = f"CLIP_MODEL=hf-hub:{repo_id}"
    config = _hub_file(repo_id, ["open_clip_config.json"], setting)
    checkpoint = _hub_file(
        repo_id,
        [
            "open_clip_model.safetensors",
            "open_clip_pytorch_model.bin",
            "open_clip_pytorch_model.pth",
        ],
        setting,
    )
    _readable_file(Path(config), setting, "the cached model config")
    _readable_file(Path(checkpoint), setting, "the cached weights")
    # The hub cache keeps a repo's files side by side in one snapshot folder, which is
    # exactly the layout open_clip's local-dir schema reads.
    return ModelSource(
        model_name=f"{LOCAL_DIR}{Path(config).parent}",
        checkpoint=None,
        display_name=f"hf-hub:{repo_id}",
    )


def _hub_file(repo_id: str, filenames: list[str], setting: str) -> str:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for filename in filenames:
        try:
            return str(hf_hub_download(repo_id, filename, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            continue
    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailable(
            f"{setting}: weights are not in the local cache and HF_HUB_OFFLINE is set. "
            "Bake the weights into the image, or set CLIP_MODEL=local-dir:/path or "
            "CLIP_PRETRAINED=/path/to/checkpoint."
        )
    _probe(constants.ENDPOINT, setting)
    last_error: Exception | None = None
    for filename in filenames:
        try:
            return str(hf_hub_download(repo_id, filename))
        except Exception as exc:  # hub errors are many; the last one is reported
            last_error = exc
    raise WeightsUnavailable(
        f"{setting}: could not download {filenames[0]} from {repo_id}: {last_error}"
    )


def _probe(url: str, setting: str) -> None:
    """One TCP connect with a short timeout instead of a minute of HTTP retries."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return
    except OSError as exc:
        raise WeightsUnavailable(
            f"{setting}: weights are not cached and {host} cannot be reached ({exc}). "
            "Without network, set CLIP_MODEL=local-dir:/path (a folder with "
            "open_clip_config.json and weights) or CLIP_PRETRAINED=/path/to/checkpoint, "
            "or pre-fill the Hugging Face cache (HF_HOME)."
        ) from None


def _readable_file(path: Path, setting: str, what: str) -> bool:
    """Whether the file `path` is there, found by opening it as the loader will.

    False when it is not there (or is a folder); WeightsUnreadable when it may be there but
    this process may not read it.
    """
    try:
        with path.open("rb"):
            return True
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    except PermissionError:
        raise _unreadable(path, setting, what) from None


def _readable_dir(path: Path, setting: str, what: str) -> bool:
    """Whether the folder `path` is there, found by listing it as the loader's glob will."""
    try:
        os.listdir(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise _unreadable(path, setting, what) from None


def _unreadable(path: Path, setting: str, what: str) -> WeightsUnreadable:
    try:
        path.stat()
        problem = f"{what} {path} exists but cannot be read (permission denied)"
    except OSError:  # a folder above it may not be entered: whether it exists is unknown
        problem = f"{what} {path} cannot be reached (permission denied on a folder above it)"
    return WeightsUnreadable(
        f"{setting}: {problem} for the user the service runs as (uid {os.geteuid()}). "
        "Make it readable by that user (chmod a+r on files and a+rx on folders, or chown "
        "them), or run the container as a user that may read it."
    )
