"""The image tower behind a narrow interface: load, preprocess, forward, postprocess.

Everything above this module sees images in and float32 rows out; torch, devices and
precisions stay in here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import open_clip
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize

from app.config import Backend, Precision, ResizeMode, Settings
from app.inference.encoder import EncoderInfo, ModelInput
from app.inference.runtimes import (
    BackendUnavailable,
    Tower,
    build_tower,
    default_cache_dir,
    pick_backend,
)
from app.inference.weights import ModelSource, WeightsUnavailable, resolve_model_source

logger = logging.getLogger(__name__)

# Beyond this aspect ratio a CLIP "shortest side" resize of a sliver (a 10000x2 strip)
# would allocate hundreds of megabytes for pixels the centre crop throws away. Ordinary
# person crops (1:2, 1:3) stay far below it, so they go through the exact reference path.
_MAX_ASPECT_BEFORE_PRECROP = 4.0


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeightsUnavailable(
            f"CLIP_DEVICE={requested} but CUDA is not available here; use CLIP_DEVICE=cpu or auto."
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise WeightsUnavailable(
            f"CLIP_DEVICE={requested} but only {torch.cuda.device_count()} CUDA device(s) exist."
        )
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 run bf16 matmuls several times faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(requested: Precision, device: torch.device) -> Precision:
    if requested != Precision.AUTO:
        if requested == Precision.FP16 and device.type == "cpu":
            raise WeightsUnavailable(
                "CLIP_PRECISION=fp16 is for GPUs; on CPU use fp32, bf16, int8 or auto."
            )
        if requested == Precision.INT8 and device.type != "cpu":
            raise WeightsUnavailable("CLIP_PRECISION=int8 runs on CPU only; use fp16 on GPUs.")
        return requested
    if device.type == "cuda":
        return Precision.FP16
    return Precision.BF16 if cpu_has_fast_bf16() else Precision.FP32


class SplitPreprocess:
    """open_clip's transform cut in two at its ToTensor step.

    The geometric part (resize, crop or pad, mode) runs per image in the decode threads
    and yields uint8 pixels; ToTensor's scaling and Normalize run once per batch in the
    forward thread (on the GPU when there is one). Same arithmetic as open_clip's, but no
    torch kernels in the decode threads: on a 2-core CPU their thread pools otherwise spin
    against the forward pass's, which measured as a doubling of single-request latency.
    Also sends 4x fewer bytes to the device.
    """

    def __init__(self, geometry: Callable[[Image.Image], Image.Image], normalize: Normalize):
        self.geometry = geometry
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_transform(cls, transform: Callable[[Image.Image], Any]) -> SplitPreprocess | None:
        steps = list(getattr(transform, "transforms", []))
        names = [type(step).__name__ for step in steps]
        if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor"):
            return None
        if not isinstance(steps[-1], Normalize):
            return None
        return cls(Compose(steps[:-2]), steps[-1])

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Geometry only: a (C, H, W) uint8 view of the resized image."""
        resized = self.geometry(image)
        # np.array copies (224x224x3 bytes): torch wants a writable buffer it can own.
        array = np.array(resized.convert("RGB") if resized.mode != "RGB" else resized)
        return torch.from_numpy(array).permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) on any device to normalised float32, as ToTensor + Normalize."""
        values = batch.to(torch.float32).div_(255)
        return values.sub_(self.mean.to(values.device)).div_(self.std.to(values.device))


class ClipImageEncoder:
    """An open_clip image tower ready for batched, inference-only use, on whichever
    runtime (torch, OpenVINO, ONNX Runtime) the settings pick."""

    def __init__(
        self,
        tower: Tower,
        preprocess: Callable[[Image.Image], torch.Tensor],
        info: EncoderInfo,
        device: torch.device,
        text_model: Any = None,
        tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None,
        logit_scale: float = 100.0,
    ) -> None:
        self._tower = tower
        self._text_model = text_model
        self._tokenizer = tokenizer
        self.logit_scale = logit_scale
        self._preprocess = preprocess
        self._split = SplitPreprocess.from_transform(preprocess)
        self._device = device
        self.info = info

    @classmethod
    def load(cls, settings: Settings) -> ClipImageEncoder:
        started = time.perf_counter()
        device = pick_device(settings.device)
        precision = pick_precision(settings.precision, device)
        backend = pick_backend(settings.backend, device, precision)
        source = resolve_model_source(settings.model, settings.pretrained)
        model, preprocess = _build(source, settings.resize_mode, device)
        model.eval().requires_grad_(False)
        visual: torch.nn.Module = model.visual  # type: ignore[assignment]
        logit_scale = float(model.logit_scale.exp().item())  # type: ignore[operator]
        cfg: dict[str, Any] = dict(getattr(visual, "preprocess_cfg", {}) or {})
        image_size = _as_pair(cfg.get("size", getattr(visual, "image_size", 224)))
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        try:
            tower = build_tower(
                visual, backend, precision, device, image_size, cache_dir, settings.torch_threads
            )
        except Exception as exc:
            if backend == Backend.TORCH:
                raise
            if settings.backend != Backend.AUTO:
                raise BackendUnavailable(
                    f"CLIP_BACKEND={backend} could not convert or load this model ({exc}); "
                    "use CLIP_BACKEND=torch or auto"
                ) from exc
            # auto promised the fastest path that works: torch always runs the model.
            logger.warning("%s could not run this model (%s); serving with torch", backend, exc)
            backend = Backend.TORCH
            tower = build_tower(
                visual, backend, precision, device, image_size, cache_dir, settings.torch_threads
            )
        if backend != Backend.TORCH:
            # The runtime holds its own copy of the weights; the text tower still needs
            # `model` until the garment prompts are embedded, then all of it goes.
            model.visual = torch.nn.Identity()
        dim = _output_dim(tower, visual, image_size, device)
        info = EncoderInfo(
            model=source.display_name,
            dim=dim,
            device=str(device),
            precision=precision.value,
            backend=backend.value,
            image_size=image_size,
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            mean=tuple(cfg.get("mean", ())),
            std=tuple(cfg.get("std", ())),
        )
        logger.info(
            "loaded %s on %s (%s, %s, %d dims) in %.1fs",
            info.model,
            info.device,
            info.backend,
            info.precision,
            info.dim,
            time.perf_counter() - started,
        )
        tokenizer = open_clip.get_tokenizer(source.model_name)
        return cls(tower, preprocess, info, device, model, tokenizer, logit_scale)

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """L2-normalised text embeddings, for zero-shot labels at startup. Runs the text
        tower on the CPU in fp32: it is used once, and then released."""
        if self._text_model is None or self._tokenizer is None:
            raise RuntimeError("the text tower was released; embed texts before that")
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                tokens = self._tokenizer(list(texts[start : start + 64]))
                features = self._text_model.encode_text(tokens).float()
                rows.append(torch.nn.functional.normalize(features, dim=-1).numpy())
        return np.concatenate(rows).astype(np.float32)

    def release_text_tower(self) -> None:
        """Drop the text tower (about a third of the weights) once labels are embedded."""
        self._text_model = None
        self._tokenizer = None

    def preprocess(self, image: Image.Image) -> ModelInput:
        """RGB image to one model input (C, H, W) on the CPU: uint8 pixels that forward()
        normalises, or (for transforms of unknown shape) open_clip's float tensor."""
        if self.info.resize_mode == "shortest":
            image = _precrop_extreme_aspect(image)
        elif self.info.resize_mode == "longest":
            image = _shrink_extreme_aspect(image, max(self.info.image_size))
        if self._split is not None:
            return self._split.pixels(image)
        return self._preprocess(image)

    def forward(self, batch: Sequence[ModelInput]) -> torch.Tensor:
        """Stacked inputs through the image tower; raw (unnormalised) features."""
        with torch.inference_mode():
            stacked = torch.stack(list(batch)).to(self._device, non_blocking=True)
            if stacked.dtype == torch.uint8 and self._split is not None:
                stacked = self._split.normalize(stacked)
            return self._tower(stacked.to(torch.float32))

    def postprocess(self, features: torch.Tensor) -> npt.NDArray[np.float32]:
        """Features to L2-normalised float32 rows, computed in float32 whatever the precision."""
        with torch.inference_mode():
            features = features.float()
            features = torch.nn.functional.normalize(features, dim=-1)
            return features.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, batch: Sequence[ModelInput]) -> npt.NDArray[np.float32]:
        return self.postprocess(self.forward(batch))

    def warm_up(self) -> None:
        blank = Image.new("RGB", (128, 256), (127, 127, 127))
        self.encode([self.preprocess(blank)])


def _build(
    source: ModelSource, resize_mode: ResizeMode, device: torch.device
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    kwargs: dict[str, Any] = dict(source.open_clip_kwargs)
    if resize_mode != ResizeMode.MODEL:
        kwargs["image_resize_mode"] = resize_mode.value
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.model_name,
            pretrained=source.checkpoint,
            device="cpu",  # moved after the precision cast, to avoid two copies on the GPU
            **kwargs,
        )
    except WeightsUnavailable:
        raise
    except Exception as exc:
        raise WeightsUnavailable(
            f"open_clip could not build {source.display_name} (CLIP_MODEL / CLIP_PRETRAINED): {exc}"
        ) from exc
    return model, preprocess


def _output_dim(
    tower: Tower, visual: torch.nn.Module, image_size: tuple[int, int], device: torch.device
) -> int:
    declared = getattr(visual, "output_dim", None)
    if isinstance(declared, int):
        return declared
    with torch.inference_mode():
        probe = torch.zeros((1, 3, *image_size), device=device, dtype=torch.float32)
        return int(tower(probe).shape[-1])


def _as_pair(size: object) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[-2]), int(size[-1])
    return int(size), int(size)  # type: ignore[call-overload]


def _precrop_extreme_aspect(image: Image.Image) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    limit = max(1, int(short * _MAX_ASPECT_BEFORE_PRECROP))
    if long <= limit:
        return image
    if width > height:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    top = (height - limit) // 2
    return image.crop((0, top, width, top + limit))


def _shrink_extreme_aspect(image: Image.Image, target: int) -> Image.Image:
    """A sliver whose short side would round to nothing when its long side is fitted to
    `target` is resized here first, keeping one pixel across; open_clip's resize then
    leaves it as it is and pads it. Resizing before padding keeps the memory of a
    40 x 1,000,000 strip at target x 1, where padding first needs gigabytes."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short * target >= long:
        return image
    fitted = (target, 1) if width > height else (1, target)
    return image.resize(fitted, Image.Resampling.BICUBIC)
