"""Fit a projection (PCA, whitened PCA or centring) on a folder of person crops.

    python -m app.reid.fit_projection crops/ --dim 128 --out pca128.safetensors
    python -m app.reid.fit_projection crops/ --centre --out centre.safetensors
    python -m app.reid.fit_projection --from-linear reid_head.safetensors --weight-key fc.weight \\
        --out reid128.safetensors          # a learned linear layer, same file format

Then serve it with CLIP_PROJECTION=pca128.safetensors (same CLIP_MODEL as fitted with).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from app.config import Settings
from app.inference.projection import Projection, fit_centring, fit_pca
from app.reid.embedding import embed_in_process, image_files


def main(argv: list[str] | None = None) -> Projection:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folder", type=Path, nargs="?", help="crops to fit on (searched recursively)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=Settings().model, help="as CLIP_MODEL")
    parser.add_argument("--pretrained", default=Settings().pretrained, help="as CLIP_PRETRAINED")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--whiten", action="store_true", help="PCA with whitening")
    parser.add_argument("--centre", action="store_true", help="only subtract the mean")
    parser.add_argument("--from-linear", type=Path, help="convert a learned linear layer instead")
    parser.add_argument("--weight-key", default="weight")
    parser.add_argument("--mean-key", default="", help="tensor to subtract first, if any")
    parser.add_argument("--for-model", default="", help="model id for --from-linear (as /info)")
    args = parser.parse_args(argv)

    if args.from_linear:
        tensors = load_file(str(args.from_linear))
        weight = tensors[args.weight_key].astype(np.float32)
        mean = tensors.get(args.mean_key, np.zeros(weight.shape[1], np.float32))
        if not args.for_model:
            parser.error("--from-linear needs --for-model (the model id /info reports)")
        projection = Projection(weight, mean.astype(np.float32), args.for_model, "linear")
        projection.save(args.out)
        print(f"wrote {args.out}: linear {projection.input_dim} -> {projection.output_dim}")
        return projection

    if args.folder is None:
        parser.error("give a folder of crops (or --from-linear)")
    paths = image_files(args.folder)
    if len(paths) < 2:
        parser.error(f"{args.folder} holds {len(paths)} images; PCA needs at least two")
    settings = Settings(
        model=args.model, pretrained=args.pretrained, device=args.device, warmup=False
    )
    embeddings, model = embed_in_process(paths, settings)
    if args.centre:
        projection = fit_centring(embeddings, model)
        print(f"centring on {len(paths)} crops; mean norm {np.linalg.norm(projection.mean):.3f}")
    else:
        projection, kept = fit_pca(embeddings, args.dim, model, whiten=args.whiten)
        print(
            f"PCA{' (whitened)' if args.whiten else ''} {embeddings.shape[1]} -> {args.dim} on "
            f"{len(paths)} crops keeps {100 * kept:.1f} % of the variance"
        )
    projection.save(args.out)
    print(f"wrote {args.out} for {model}; serve with CLIP_PROJECTION={args.out}")
    return projection


if __name__ == "__main__":
    main()
