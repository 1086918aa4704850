"""Every setting of the service, read once from `CLIP_*` environment variables.

The table in README.md (and ../shared/design.md) is the contract; field names here are
that table's variable names without the prefix.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

logger = logging.getLogger(__name__)


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Backend(StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"


# Which precisions each backend runs: a setting naming another is refused with the rest.
PRECISIONS_BY_BACKEND: dict[Backend, frozenset[Precision]] = {
    Backend.TORCH: frozenset({Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8}),
    Backend.OPENVINO: frozenset({Precision.FP32, Precision.BF16, Precision.INT8}),
    Backend.ONNXRUNTIME: frozenset({Precision.FP32, Precision.INT8}),
}


def precision_refusal(backend: Backend, precision: Precision) -> str | None:
    """Why `backend` cannot run `precision` (named outright), or None if it can."""
    runs = PRECISIONS_BY_BACKEND.get(backend)
    if runs is None or precision == Precision.AUTO or precision in runs:
        return None
    choices = ", ".join(sorted(p.value for p in runs))
    return (
        f"CLIP_BACKEND={backend} does not run CLIP_PRECISION={precision}; it runs "
        f"{choices} (or use CLIP_BACKEND=auto)"
    )


# Runs on GPUs only, or on the CPU only (int8 and both exported runtimes).
GPU_ONLY_PRECISIONS = frozenset({Precision.FP16})
CPU_ONLY_PRECISIONS = frozenset({Precision.INT8})
CPU_ONLY_BACKENDS = frozenset({Backend.OPENVINO, Backend.ONNXRUNTIME})


class ResizeMode(StrEnum):
    MODEL = "model"  # whatever the model's own preprocess config says
    SHORTEST = "shortest"  # CLIP's resize of the short side, then centre crop
    LONGEST = "longest"  # resize of the long side, then pad: keeps a tall crop whole
    SQUASH = "squash"  # resize to the square, distorting the aspect ratio


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"  # a JSON access line per request, refusals, start and stop
    WARNING = "warning"  # what needs an operator: failures, and refusals of a server's own
    ERROR = "error"


# Model inputs of the largest /analyze: upper body, lower body and the whole crop.
ANALYZE_IMAGES = 3
# Smallest person crop, width x height: /analyze's and a frame's boxes' minimum; below it
# there is no garment to see.
MIN_PERSON_CROP = (8, 16)

# What CLIP_INT8_CALIBRATION_DIR's crops may be.
CALIBRATION_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def calibration_folder_fault(folder: str) -> str | None:
    """Why CLIP_INT8_CALIBRATION_DIR cannot be calibrated on, or None: checked with the
    settings, and again where the crops are read."""
    where = f"CLIP_INT8_CALIBRATION_DIR={folder}"
    path = Path(folder)
    if not path.is_dir():
        return (
            f"{where} is a file, not a folder of crops"
            if path.exists()
            else f"{where}: there is no such folder"
        )
    try:
        has_crops = any(p.suffix.lower() in CALIBRATION_SUFFIXES for p in path.iterdir())
    except OSError as exc:
        return f"{where} cannot be read: {exc.strerror}"
    if not has_crops:
        return (
            f"{where} holds no .jpg, .png, .webp or .bmp crops (sub-folders are not "
            "searched: put the crops in the folder itself)"
        )
    return None


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Settings(BaseSettings):
    # No inf or NaN in any number: `CLIP_REQUEST_TIMEOUT_S=inf` passed `gt=0` and then
    # crashed uvicorn's setup with a traceback.
    model_config = SettingsConfigDict(
        env_prefix="CLIP_", extra="ignore", frozen=True, allow_inf_nan=False
    )

    model: str = Field(
        "ViT-B-32",
        description="open_clip model name, `local-dir:/path` or `hf-hub:org/repo`.",
    )
    pretrained: str = Field(
        "openai",
        description="open_clip pretrained tag or checkpoint file; ignored for local-dir/hf-hub.",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    precision: Precision = Precision.AUTO
    backend: Backend = Field(
        Backend.AUTO,
        description="auto, torch, openvino, onnxruntime: where the image tower runs.",
    )
    cache_dir: str = Field(
        "",
        description="Folder for converted towers (OpenVINO IR, ONNX); empty: "
        "$XDG_CACHE_HOME/clip-reid or ~/.cache/clip-reid.",
    )
    int8_calibration_dir: str = Field(
        "",
        description="Folder of your own person crops (JPEG/PNG) that OpenVINO's int8 "
        "calibrates on (up to 128 used); empty: 64 synthetic people.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: int = Field(
        1024,
        ge=1,
        description="Images admitted and not yet answered (decoding, queued or in a forward "
        "pass); a request that would pass it is refused (503) before its images are decoded.",
    )
    # At most an hour: it also bounds the drain at shutdown, and a millisecond count
    # given as seconds (30000) would hold a stopping pod for 8 hours.
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_batch_images: int = Field(64, ge=1)
    max_queries: int = Field(1000, ge=1, description="Most queries in one /similarity search.")
    max_gallery: int = Field(100_000, ge=1, description="Most gallery items in one search.")
    max_top_k: int = Field(1000, ge=1, description="Most matches returned per query.")
    max_search_scores: int = Field(
        20_000_000, ge=1, description="Most scores one search computes: queries x gallery."
    )
    max_search_matches: int = Field(
        100_000, ge=1, description="Most matches one search returns: queries x top_k."
    )
    max_concurrent_requests: int = Field(
        128,
        ge=1,
        description="HTTP requests doing work at once; more get 503 before their body is "
        "read. uvicorn's connection limit is set above it.",
    )
    max_request_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Decoded pixels one request may bring, all its images together (413).",
    )
    max_pixels_in_flight: int = Field(
        400_000_000,
        ge=1,
        description="Decoded pixels of admitted requests not yet answered (503 past it).",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    projection: str = ""
    resize_mode: ResizeMode = ResizeMode.MODEL
    decode_workers: int = Field(
        0, ge=0, le=64, description="Threads decoding images; 0 picks from the core count."
    )
    decode_processes: int = Field(
        -1,
        ge=-1,
        le=64,
        description="Processes decoding and preprocessing /embed images (one GIL each; "
        "threads share one): for many cores and a fast model. -1 picks: half the cores, "
        "at most 16, when the model is on a GPU and there are 8+ cores; else 0 (threads).",
    )
    forward_streams: int = Field(
        0,
        ge=0,
        le=64,
        description="On the CPU: forward passes run at once under load, "
        "each on its share of the cores with its own batch, and a request that finds the "
        "model idle runs alone over every core, so a lone client keeps the latency of one "
        "pass. 0: the runtime's choice. OpenVINO: its own (2 on 2 cores) when the second "
        "compiled copy a lone request runs on is at most 256 MB (ViT-B-32 in bf16 or int8: "
        "~180 MB), else 1 (fp32). torch: 2 where it has 2+ threads (the weights are shared: "
        "no copy). ONNX Runtime: 2 where it has 2+ threads and a session's copy of the weights "
        "is at most 256 MB (int8), else 1. N: N. 1: one pass over every core. GPUs run 1.",
    )
    torch_threads: int = Field(
        0, ge=0, le=256, description="torch intra-op threads; 0 keeps torch's default."
    )
    warmup: bool = Field(True, description="Run a forward pass before /ready turns 200.")
    log_level: LogLevel = Field(
        LogLevel.INFO,
        description="The service's log lines at this level and above; info writes one "
        "JSON access line per request, warning leaves them out.",
    )
    garment_vocab: str = Field(
        "", description="JSON garment vocabulary for /analyze; empty uses the packaged one."
    )
    region_bounds: Annotated[tuple[float, float, float], NoDecode] = Field(
        (0.15, 0.52, 0.92),
        description="Fractions of crop height where head|upper, upper|lower, lower|feet meet.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("CLIP_DEVICE must be one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("precision", "backend", "resize_mode", "log_level", mode="before")
    @classmethod
    def _fold_choice(cls, value: object) -> object:
        # `FP32`, `OpenVINO` or `fp32 ` (a .env file's trailing space) mean what they say,
        # as CLIP_DEVICE=CUDA does.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = [key.strip() for key in value.split(",") if key.strip()]
            if value.strip() and not keys:
                # `$KEY1,$KEY2` with both unset: meant keys, would run with no auth.
                raise ValueError(
                    "CLIP_API_KEYS holds separators but no key; set the keys, or leave it "
                    "empty to run without authentication"
                )
            for number, key in enumerate(keys, 1):
                if any(c.isspace() or not c.isprintable() for c in key):
                    # A header cannot carry it as it stands: the key would never match.
                    raise ValueError(
                        f"CLIP_API_KEYS: key {number} holds a space or a control character, "
                        "which an HTTP header cannot carry as it stands; use printable "
                        "characters without spaces (e.g. openssl rand -hex 32)"
                    )
            return keys
        return value

    @field_validator("projection")
    @classmethod
    def _check_projection_file(cls, value: str) -> str:
        # Checked with the other settings, not after the model has loaded.
        if value and Path(value).is_dir():
            raise ValueError(f"CLIP_PROJECTION: {value} is a folder, not a projection file")
        if value and not Path(value).is_file():
            raise ValueError(f"CLIP_PROJECTION: no file at {value}")
        return value

    @field_validator("region_bounds", mode="before")
    @classmethod
    def _split_bounds(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(","))
        if isinstance(value, list | tuple) and len(value) != 3:
            # Said here: the tuple's own check would name only the missing index.
            raise ValueError(
                f"CLIP_REGION_BOUNDS must be three increasing fractions in (0, 1), such as "
                f"0.15,0.52,0.92 (head|upper, upper|lower, lower|feet); got {len(value)}"
            )
        return value

    @field_validator("region_bounds")
    @classmethod
    def _check_bounds(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not 0 < value[0] < value[1] < value[2] < 1:
            raise ValueError("CLIP_REGION_BOUNDS must be three increasing fractions in (0, 1)")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        value = value.strip()
        if not value or value in ("local-dir:", "hf-hub:"):
            raise ValueError("CLIP_MODEL must name a model, `local-dir:/path` or `hf-hub:org/repo`")
        return value

    @model_validator(mode="after")
    def _bounds_hold_one_largest_request(self) -> Settings:
        # A bound smaller than one valid request would refuse that request forever, and a
        # queue smaller than a batch could never fill one.
        largest = max(self.max_batch_size, self.max_batch_images, ANALYZE_IMAGES)
        if self.max_queue < largest:
            raise ValueError(
                f"CLIP_MAX_QUEUE ({self.max_queue}) must hold one largest request: at least "
                f"CLIP_MAX_BATCH_SIZE ({self.max_batch_size}), CLIP_MAX_BATCH_IMAGES "
                f"({self.max_batch_images}) and {ANALYZE_IMAGES} (an /analyze with embedding)"
            )
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"CLIP_MAX_REQUEST_PIXELS ({self.max_request_pixels}) must be at least "
                f"CLIP_MAX_IMAGE_PIXELS ({self.max_image_pixels})"
            )
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(
                f"CLIP_MAX_PIXELS_IN_FLIGHT ({self.max_pixels_in_flight}) must be at least "
                f"CLIP_MAX_REQUEST_PIXELS ({self.max_request_pixels})"
            )
        return self

    @model_validator(mode="after")
    def _device_backend_and_precision_agree(self) -> Settings:
        # Named outright, a combination no runtime runs is a settings error (exit 1, with
        # the other settings' errors), not a failure once the model has loaded. `auto`
        # leaves the choice to the hardware, which start-up checks.
        backend, precision, device = self.backend, self.precision, self.device
        refusal = precision_refusal(backend, precision)
        if refusal is not None:
            raise ValueError(refusal)
        if device == "cpu" and precision in GPU_ONLY_PRECISIONS:
            raise ValueError(
                f"CLIP_PRECISION={precision} is for GPUs; with CLIP_DEVICE=cpu use fp32, "
                "bf16, int8 or auto"
            )
        if device.startswith("cuda"):
            if precision in CPU_ONLY_PRECISIONS:
                raise ValueError(
                    f"CLIP_PRECISION={precision} runs on the CPU only; with "
                    f"CLIP_DEVICE={device} use fp16, bf16, fp32 or auto"
                )
            if backend in CPU_ONLY_BACKENDS:
                raise ValueError(
                    f"CLIP_BACKEND={backend} runs on the CPU only; with "
                    f"CLIP_DEVICE={device} use torch or auto"
                )
        return self

    @model_validator(mode="after")
    def _calibration_folder_holds_crops(self) -> Settings:
        # Checked with the other settings where int8 may calibrate on it: not minutes
        # later, once the model has loaded and the conversion begins.
        folder = self.int8_calibration_dir
        calibrates = self.backend in (Backend.AUTO, Backend.OPENVINO)  # ONNX Runtime's is dynamic
        if not folder or self.precision != Precision.INT8 or not calibrates:
            return self
        fault = calibration_folder_fault(folder)
        if fault is not None:
            raise ValueError(fault)
        return self

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


class MisspeltApiKeys(ValueError):
    """A CLIP_ variable that reads as a misspelt CLIP_API_KEYS, which is not set."""


def load_settings() -> Settings:
    """Settings from the environment; raises a readable error naming the bad variable,
    and warns of CLIP_ variables no setting reads (a typo would otherwise go unseen).
    A misspelt CLIP_API_KEYS is refused (MisspeltApiKeys), not warned of: ignored, it
    would serve every caller without a key, the one mistake not to start with."""
    unknown = unknown_variables(os.environ)
    misspelt = [name for name, known in unknown.items() if known == "CLIP_API_KEYS"]
    if misspelt and "CLIP_API_KEYS" not in {name.upper() for name in os.environ}:
        raise MisspeltApiKeys(
            f"{misspelt[0]} is not a setting of this service; API keys are read from "
            "CLIP_API_KEYS (comma-separated), and without it the service would run "
            f"without authentication: rename {misspelt[0]} to CLIP_API_KEYS"
        )
    settings = Settings()
    for name, known in unknown.items():
        hint = f"; did you mean {known}?" if known else ""
        logger.warning("%s is not a setting of this service and is ignored%s", name, hint)
    return settings


def unknown_variables(environment: Mapping[str, str]) -> dict[str, str | None]:
    """CLIP_ variables that are not settings, each with the closest setting's name. In
    any case, as the settings themselves are read: `clip_max_batchsize` is a typo too."""
    names = [f"CLIP_{field.upper()}" for field in Settings.model_fields]
    return {
        variable: next(iter(difflib.get_close_matches(variable.upper(), names, n=1)), None)
        for variable in sorted(environment)
        if variable.upper().startswith("CLIP_") and variable.upper() not in names
    }
