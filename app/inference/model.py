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

from app.config import PRECISIONS_BY_BACKEND, Backend, Precision, ResizeMode, Settings
from app.inference.calibration import calibration_for
from app.inference.checkpoint_init import onto_checkpoint_tensors
from app.inference.conversion_cache import CacheWriteFailed
from app.inference.cpu_features import cpu_has_fast_bf16, cpu_has_int8_dot_product
from app.inference.encoder import EncoderInfo, ModelInput
from app.inference.memory import page_out_files, release_freed_memory
from app.inference.preprocessing import ImagePreprocessor
from app.inference.runtimes import (
    BackendUnavailable,
    Tower,
    build_tower,
    default_cache_dir,
    pick_backend,
    weights_digest,
)
from app.inference.texts import encode_texts
from app.inference.weights import ModelSource, WeightsUnavailable, resolve_model_source

logger = logging.getLogger(__name__)


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


def pick_precision(
    requested: Precision, device: torch.device, backend: Backend = Backend.AUTO
) -> Precision:
    """`auto`: the fastest precision that keeps fp32's embeddings, among those `backend`
    runs (a backend named with `auto` precision must start, not refuse its own default)."""
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
    preferred = Precision.BF16 if cpu_has_fast_bf16() else Precision.FP32
    if backend != Backend.AUTO and preferred not in PRECISIONS_BY_BACKEND[backend]:
        return Precision.FP32  # ONNX Runtime has no bf16 path; int8 stays opt-in
    return preferred


def warn_of_slow_choices(precision: Precision, backend: Backend, device: torch.device) -> None:
    """A precision named outright runs even where this CPU makes it slow; the operator
    hears so once, at startup, rather than reading it off a dashboard."""
    if device.type != "cpu":
        return
    if precision == Precision.BF16 and not cpu_has_fast_bf16():
        logger.warning(
            "CLIP_PRECISION=bf16 on a CPU without AMX or AVX512-BF16 (or with oneDNN "
            "capped below them): bf16 is emulated there (torch ran 9x slower than fp32 on "
            "an AVX2 EPYC); CLIP_PRECISION=auto picks fp32 on this CPU"
        )
    if (
        precision == Precision.INT8
        and backend == Backend.OPENVINO
        and not cpu_has_int8_dot_product()
    ):
        logger.warning(
            "OpenVINO int8 on a CPU without VNNI or AMX-INT8 runs slower than its fp32 "
            "(half the speed on an AVX2 EPYC); CLIP_BACKEND=auto runs ONNX Runtime's "
            "int8 on this CPU"
        )


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
        text_rows: dict[str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        self._tower = tower
        self._text_model = text_model
        self._tokenizer = tokenizer
        self._text_rows = text_rows or {}
        self.logit_scale = logit_scale
        self.preprocessor = ImagePreprocessor(preprocess, info.resize_mode, info.image_size)
        self._split = self.preprocessor.split
        self._device = device
        self.info = info

    @classmethod
    def load(cls, settings: Settings, texts: Sequence[str] = ()) -> ClipImageEncoder:
        """The encoder the settings describe. `texts` (the zero-shot prompts) are embedded
        first and the text tower dropped before the image tower is converted: a
        conversion holds a second copy of the image tower for a while, and the text
        tower's ~250 MB (ViT-B-32, fp32) need not sit beside it. With no `texts` the
        text tower stays until release_text_tower()."""
        started = time.perf_counter()
        device = pick_device(settings.device)
        precision = pick_precision(settings.precision, device, settings.backend)
        backend = pick_backend(settings.backend, device, precision)
        warn_of_slow_choices(precision, backend, device)
        source = resolve_model_source(settings.model, settings.pretrained)
        model, preprocess = _build(source, settings.resize_mode, device)
        model.eval().requires_grad_(False)
        visual: torch.nn.Module = model.visual  # type: ignore[assignment]
        logit_scale = float(model.logit_scale.exp().item())  # type: ignore[operator]
        tokenizer = open_clip.get_tokenizer(source.model_name)
        text_rows: dict[str, npt.NDArray[np.float32]] = {}
        text_model: torch.nn.Module | None = model
        if texts:
            unique = list(dict.fromkeys(texts))
            text_rows = dict(zip(unique, encode_texts(model, tokenizer, unique), strict=True))
            del model
            text_model = None  # the text tower goes; `visual` keeps the image tower
            release_freed_memory()
            # The checkpoint's tensors share one mapping, which the image tower keeps:
            # the text tower's pages it read would stay resident beside it.
            _page_out_checkpoint(source)
        cfg: dict[str, Any] = dict(getattr(visual, "preprocess_cfg", {}) or {})
        image_size = _as_pair(cfg.get("size", getattr(visual, "image_size", 224)))
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        calibration = None
        if precision == Precision.INT8 and backend == Backend.OPENVINO:
            calibration = calibration_for(settings.int8_calibration_dir, preprocess)
        elif settings.int8_calibration_dir:
            logger.warning(
                "CLIP_INT8_CALIBRATION_DIR is not used: only OpenVINO's int8 calibrates, "
                "and this start runs %s %s (CLIP_BACKEND=openvino CLIP_PRECISION=int8 "
                "runs it)",
                backend,
                precision,
            )
        weights = weights_digest(visual)  # fp32, before any cast: the model's identity
        try:
            tower = build_tower(
                visual,
                backend,
                precision,
                device,
                image_size,
                cache_dir,
                settings.torch_threads,
                calibration,
                settings.forward_streams,
                weights,
                lambda: _page_out_checkpoint(source),
            )
        except WeightsUnavailable:
            raise  # a setting to fix (a bad calibration folder): torch would hide it
        except Exception as exc:
            if backend == Backend.TORCH:
                raise
            if isinstance(exc, CacheWriteFailed):  # the disk, not the backend, to fix
                if settings.backend != Backend.AUTO:
                    raise BackendUnavailable(str(exc)) from exc
            elif settings.backend != Backend.AUTO:
                raise BackendUnavailable(
                    f"CLIP_BACKEND={backend} could not convert or load this model ({exc}); "
                    "use CLIP_BACKEND=torch or auto"
                ) from exc
            # auto promised the fastest path that works: torch always runs the model.
            logger.warning("%s could not run this model (%s); serving with torch", backend, exc)
            backend = Backend.TORCH
            tower = build_tower(  # torch needs no calibration
                visual, backend, precision, device, image_size, cache_dir, settings.torch_threads
            )
        if settings.forward_streams > tower.concurrency:
            logger.warning(
                "CLIP_FORWARD_STREAMS=%d, but %s runs %d forward stream(s) here: %s",
                settings.forward_streams,
                backend,
                tower.concurrency,
                "a GPU runs one pass at a time"
                if device.type != "cpu"
                else "a stream needs a core of its own (this machine's, or CLIP_TORCH_THREADS)",
            )
        if backend != Backend.TORCH and text_model is not None:
            # The runtime holds its own copy of the weights; the text tower still needs
            # `model` until the garment prompts are embedded, then all of it goes.
            text_model.visual = torch.nn.Identity()
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
            streams=tower.concurrency,
            weights_sha256=weights,
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
        return cls(
            tower,
            preprocess,
            info,
            device,
            text_model,
            tokenizer if text_model is not None else None,
            logit_scale,
            text_rows,
        )

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """L2-normalised text embeddings, for zero-shot labels at startup: those embedded
        at load, or (while it is kept) the text tower's, on the CPU in fp32."""
        if texts and all(text in self._text_rows for text in texts):
            return np.stack([self._text_rows[text] for text in texts])
        if self._text_model is None or self._tokenizer is None:
            missing = next(text for text in texts if text not in self._text_rows)
            raise RuntimeError(
                f"the text tower was released and {missing!r} was not embedded at load"
            )
        return encode_texts(self._text_model, self._tokenizer, texts)

    def release_text_tower(self) -> None:
        """Drop the text tower (about a third of the weights) once labels are embedded."""
        self._text_model = None
        self._tokenizer = None
        self._text_rows = {}

    def preprocess(self, image: Image.Image) -> ModelInput:
        """RGB image to one model input (C, H, W) on the CPU: uint8 pixels that forward()
        normalises, or (for transforms of unknown shape) open_clip's float tensor."""
        return self.preprocessor(image)

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
        blank = [self.preprocess(Image.new("RGB", (128, 256), (127, 127, 127)))]
        self.encode(blank)
        if self.info.streams > 1:  # a lone image may take another path than a batch
            self.encode(blank * self.info.streams)
        self._tower.settle()


def _build(
    source: ModelSource, resize_mode: ResizeMode, device: torch.device
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    kwargs: dict[str, Any] = dict(source.open_clip_kwargs)
    if resize_mode != ResizeMode.MODEL:
        kwargs["image_resize_mode"] = resize_mode.value
    try:
        with onto_checkpoint_tensors() as loaded_into:
            model, _, preprocess = open_clip.create_model_and_transforms(
                source.model_name,
                pretrained=source.checkpoint,
                device="cpu",  # moved after the precision cast, to avoid two copies on the GPU
                **kwargs,
            )
    except WeightsUnavailable:
        raise
    except Exception as exc:
        cause = " ".join(str(exc).split())[:200] or type(exc).__name__
        if "Weights only load failed" in cause:  # torch's page of advice, not the cause
            cause = "the file is neither a torch checkpoint nor safetensors"
        if source.checkpoint is not None and Path(source.checkpoint).is_file():
            # torch's own words for a file that is no checkpoint: "101", or a page of
            # advice about weights_only.
            raise WeightsUnavailable(
                f"CLIP_PRETRAINED={source.checkpoint} is not a checkpoint open_clip can "
                f"load for {source.model_name} (a .safetensors, or a torch .pt/.bin/.pth "
                f"of the model's state dict): {type(exc).__name__}: {cause}"
            ) from exc
        raise WeightsUnavailable(
            f"open_clip could not build {source.display_name} (CLIP_MODEL / CLIP_PRETRAINED): "
            f"{cause}"
        ) from exc
    if model not in loaded_into:
        # Built without random init: unloaded weights would be uninitialised memory.
        raise WeightsUnavailable(
            f"open_clip found no weights for {source.display_name} (CLIP_MODEL / CLIP_PRETRAINED)"
        )
    return model, preprocess


def _page_out_checkpoint(source: ModelSource) -> None:
    # The checkpoint is mapped (checkpoint_init), and once the image tower is converted
    # its pages are not read again: they can go back to the page cache.
    page_out_files(source.weights_files(), copy_on_write=True)


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
