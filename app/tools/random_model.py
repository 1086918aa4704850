"""Write a randomly initialised open_clip model in the `local-dir:` layout.

Real weights need the network; tests, CI and benchmarks load this instead, through the
same loading code:

    python -m app.tools.random_model models/vit-b-32-random            # full ViT-B-32
    python -m app.tools.random_model /tmp/tiny --arch tiny             # seconds-fast tests
    CLIP_MODEL=local-dir:models/vit-b-32-random uvicorn app.main:app
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_model

from app.files import as_umask_allows

# A CLIP small enough for unit tests to build in well under a second, yet with every
# part of the real one (patch embedding, transformer, projection, text tower for prompts).
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

OPENAI_PREPROCESS: dict[str, Any] = {
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def model_config(arch: str) -> dict[str, Any]:
    if arch == "tiny":
        return copy.deepcopy(TINY_MODEL_CFG)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SystemExit(f"unknown open_clip architecture {arch!r}")
    return dict(cfg)


def write_random_model(
    out_dir: Path, arch: str = "ViT-B-32", seed: int = 0, quick_gelu: bool = True
) -> Path:
    """Create the folder with open_clip_config.json and open_clip_model.safetensors."""
    cfg = model_config(arch)
    if quick_gelu:
        cfg["quick_gelu"] = True  # as OpenAI's ViT-B-32 weights, the service default
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    save_model(model, str(out_dir / "open_clip_model.safetensors"))
    as_umask_allows(out_dir / "open_clip_model.safetensors")
    document = {"model_cfg": cfg, "preprocess_cfg": OPENAI_PREPROCESS}
    (out_dir / "open_clip_config.json").write_text(json.dumps(document, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, or 'tiny'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_random_model(args.out_dir, args.arch, args.seed)
    print(f"wrote random {args.arch} to {path}; serve it with CLIP_MODEL=local-dir:{path}")


if __name__ == "__main__":
    main()
