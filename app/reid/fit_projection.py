"""Fit a projection (PCA, whitened PCA, centring, or supervised LDA) on person crops.

    python -m app.reid.fit_projection crops/ --dim 128 --out pca128.safetensors
    python -m app.reid.fit_projection crops/ --centre --out centre.safetensors
    python -m app.reid.fit_projection market/bounding_box_train --supervised --dim 64 \\
        --out lda64.safetensors            # labelled: Market-1501 names or a folder per person
    python -m app.reid.fit_projection --from-linear reid_head.safetensors --weight-key fc.weight \\
        --for-model ViT-B-32/openai --out reid128.safetensors   # a learned linear layer

Then serve it with CLIP_PROJECTION=pca128.safetensors (same CLIP_MODEL as fitted with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from app.inference.projection import WEIGHTS_KEY, Projection, fit_centring, fit_pca
from app.inference.weights import LOCAL_DIR, reported_model_id
from app.reid.cli import (
    add_model_options,
    fail,
    one_line_errors,
    output_file_problem,
    settings_from,
)
from app.reid.dataset import labelled_crops
from app.reid.embedding import embed_in_process, identify, image_files, load_encoder
from app.reid.supervised import DEFAULT_SHRINKAGE, fit_supervised

DEFAULT_DIM = 128


def main(argv: list[str] | None = None) -> Projection:
    parser = argparse.ArgumentParser(
        prog="python -m app.reid.fit_projection", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "folder", type=Path, nargs="?", help="crops to fit on (searched recursively)"
    )
    parser.add_argument("--out", required=True, help="the projection file to write")
    add_model_options(parser)
    parser.add_argument("--dim", type=int, help=f"output dimensions (default {DEFAULT_DIM})")
    parser.add_argument("--whiten", action="store_true", help="PCA with whitening")
    parser.add_argument("--centre", action="store_true", help="only subtract the mean")
    parser.add_argument(
        "--supervised",
        action="store_true",
        help="LDA on labelled crops: Market-1501 names, or one sub-folder per identity",
    )
    parser.add_argument(
        "--shrinkage",
        type=float,
        default=DEFAULT_SHRINKAGE,
        help="--supervised: weight of the identity in the within-identity covariance",
    )
    parser.add_argument("--from-linear", type=Path, help="convert a learned linear layer instead")
    parser.add_argument("--weight-key", default="weight")
    parser.add_argument("--mean-key", default="", help="tensor to subtract first, if any")
    parser.add_argument("--for-model", default="", help="model id for --from-linear (as /info)")
    args = parser.parse_args(argv)
    # Refused rather than ignored: a flag that silently does nothing writes a file that is
    # not what was asked for.
    if args.centre and (args.dim is not None or args.whiten or args.supervised):
        fail(
            parser, "--centre only subtracts the mean: it takes no --dim, --whiten or --supervised"
        )
    if args.supervised and args.whiten:
        fail(parser, "--supervised whitens within identities already; drop --whiten")
    if args.from_linear:
        ignored = [
            flag
            for flag, given in (
                (str(args.folder), args.folder is not None),
                ("--dim", args.dim is not None),
                ("--whiten", args.whiten),
                ("--centre", args.centre),
                ("--supervised", args.supervised),
                ("--shrinkage", args.shrinkage != DEFAULT_SHRINKAGE),
            )
            if given
        ]
        if ignored:
            fail(
                parser,
                f"--from-linear converts a layer as it is: it takes no {', '.join(ignored)}",
            )
    elif args.shrinkage != DEFAULT_SHRINKAGE and not args.supervised:
        fail(parser, "--shrinkage weighs --supervised's fit; without --supervised it does nothing")
    elif args.dim is not None and args.dim < 1:
        fail(parser, f"--dim {args.dim}: ask for 1 or more output dimensions")
    elif not 0.0 < args.shrinkage <= 1.0:
        fail(parser, f"--shrinkage {args.shrinkage}: give a value in (0, 1]")
    # Before any crop is embedded: a fit that cannot be written wastes every minute of it.
    problem = output_file_problem(args.out)
    if problem is not None:
        fail(parser, f"--out {args.out or repr(args.out)} {problem}")
    args.out = Path(args.out)

    with one_line_errors(parser):
        if args.from_linear:
            return from_linear(args, parser)
        return fit(args, parser)
    raise AssertionError("one_line_errors exits")  # for mypy: it never falls through


def from_linear(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Projection:
    if not args.for_model:
        fail(parser, "--from-linear needs --for-model (the model id /info reports)")
    try:
        tensors = load_file(str(args.from_linear))
    except FileNotFoundError:
        fail(parser, f"--from-linear {args.from_linear}: no such file")
    except (OSError, SafetensorError) as exc:
        fail(parser, f"--from-linear {args.from_linear} is not a safetensors file ({exc})")
    if args.weight_key not in tensors:
        fail(parser, f"{args.from_linear} has no tensor {args.weight_key!r} (--weight-key)")
    weight = tensors[args.weight_key].astype(np.float32)
    if weight.ndim != 2:
        fail(parser, f"{args.weight_key} is {weight.shape}; a linear layer's weight is (out, in)")
    expected = model_embed_dim(args.for_model)
    if expected is not None and weight.shape[1] != expected:
        fail(
            parser,
            f"{args.weight_key} takes {weight.shape[1]}-d input, but {args.for_model} embeds "
            f"in {expected} dims: a (out, {expected}) layer fits it",
        )
    if args.mean_key and args.mean_key not in tensors:
        fail(parser, f"{args.from_linear} has no tensor {args.mean_key!r} (--mean-key)")
    mean = tensors[args.mean_key] if args.mean_key else np.zeros(weight.shape[1], np.float32)
    if mean.shape != (weight.shape[1],):
        fail(
            parser,
            f"{args.mean_key} is {mean.shape}, but {args.weight_key} takes {weight.shape[1]}-d "
            f"input: a mean to subtract first is ({weight.shape[1]},)",
        )
    # No weights hash: the file names a model id only, so it is checked by that id, as
    # /info reports it (the README's commands spell models local-dir:models/<folder>).
    model = reported_model_id(args.for_model)
    projection = Projection(weight, mean.astype(np.float32), model, "linear")
    projection.save(args.out)
    print(f"wrote {args.out}: linear {projection.input_dim} -> {projection.output_dim} for {model}")
    return projection


def model_embed_dim(model: str) -> int | None:
    """The embedding dimension of `model` as --for-model names it, from its open_clip
    config (a local-dir folder's, or a built-in's); None where it cannot be told."""
    if model.startswith(LOCAL_DIR):
        config = Path(model[len(LOCAL_DIR) :]).expanduser() / "open_clip_config.json"
        try:
            return int(json.loads(config.read_text())["model_cfg"]["embed_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    import open_clip

    found = open_clip.get_model_config(model.split("/")[0])
    return int(found["embed_dim"]) if found and "embed_dim" in found else None


def fit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Projection:
    if args.folder is None:
        fail(parser, "give a folder of crops (or --from-linear)")
    if not args.folder.is_dir():
        fail(parser, f"{args.folder}: no such folder")
    # Everything that can be checked from names is checked before the first image.
    identities = None
    if args.supervised:
        labelled = labelled_crops(args.folder)
        paths, identities = labelled.paths, labelled.identities
        people = len(labelled.names)
        if people < 2:
            dropped = ""
            if labelled.layout == "market1501":
                dropped = " (junk and distractors, persons -1 and 0, carry none)"
            fail(
                parser,
                f"--supervised needs crops of at least 2 identities; {args.folder} has "
                f"{people}{dropped}",
            )
        dim = args.dim if args.dim is not None else min(DEFAULT_DIM, people - 1)
        if not 1 <= dim <= people - 1:
            fail(
                parser,
                f"--dim {dim}: {people} identities in {args.folder} give at most "
                f"{people - 1} directions that tell people apart",
            )
    else:
        paths = image_files(args.folder)
        dim = args.dim if args.dim is not None else DEFAULT_DIM
        if len(paths) < 2:
            fail(parser, f"{args.folder} holds {len(paths)} images; a fit needs at least two")
        if not args.centre and dim >= len(paths):
            fail(
                parser,
                f"--dim {dim}: {len(paths)} crops span at most {len(paths) - 1} dimensions "
                f"once centred; ask for {len(paths) - 1} or fewer, or fit on more crops",
            )
    settings = settings_from(args)
    encoder = load_encoder(settings)
    identity = identify(encoder)
    if not args.centre and dim > encoder.info.dim:  # before the crops, not after
        fail(parser, f"--dim {dim}: {encoder.info.model} embeds in {encoder.info.dim} dims")
    embeddings, model = embed_in_process(paths, settings, encoder=encoder)
    if args.centre:
        projection = fit_centring(embeddings, model)
        print(f"centring on {len(paths)} crops; mean norm {np.linalg.norm(projection.mean):.3f}")
    elif identities is not None:
        projection, kept = fit_supervised(embeddings, identities, dim, model, args.shrinkage)
        print(
            f"LDA {embeddings.shape[1]} -> {projection.output_dim} on {len(paths)} crops of "
            f"{projection.metadata['identities']} identities keeps {100 * kept:.1f} % of the "
            "between-identity variance"
        )
    else:
        projection, kept = fit_pca(embeddings, dim, model, whiten=args.whiten)
        print(
            f"PCA{' (whitened)' if args.whiten else ''} {embeddings.shape[1]} -> "
            f"{projection.output_dim} on {len(paths)} crops keeps {100 * kept:.1f} % of the "
            "variance"
        )
    projection = dataclasses.replace(
        projection,
        metadata={
            **projection.metadata,
            WEIGHTS_KEY: identity.weights_sha256,
            "precision": encoder.info.precision,
            "backend": encoder.info.backend,
        },
    )
    projection.save(args.out)
    print(
        f"wrote {args.out} for {model} ({encoder.info.precision}, {encoder.info.backend}); "
        f"serve with CLIP_PROJECTION={args.out}"
    )
    return projection


if __name__ == "__main__":
    main()
