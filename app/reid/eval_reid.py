"""Evaluate re-identification on a Market-1501-style dataset.

    python -m app.reid.eval_reid /data/Market-1501 --projection pca128.safetensors
    python -m app.reid.eval_reid /data/Market-1501 --url http://localhost:8000

Reads `query/` and `bounding_box_test/` (file names PPPP_cCsS_FFFFFF_NN.jpg: person id,
camera; person -1 is junk, 0 a distractor), embeds them in process (or through a running
service), and reports CMC rank-1/5/10 and mAP for the raw embeddings and for each
projection file, as JSON and a Markdown table.

Every input (dataset names, projection files, the model and whether each file was fitted
for it) is checked before the first image is embedded, and the raw results are written as
soon as they exist: a projection that still fails later costs its own row only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.inference.projection import Projection, ProjectionError
from app.reid.cli import (
    add_model_options,
    fail,
    one_line_errors,
    output_folder_problem,
    settings_from,
)
from app.reid.dataset import MarketSplit, labels, market_split, parse_name
from app.reid.embedding import (
    ModelIdentity,
    embed_in_process,
    embed_via_service,
    identify,
    load_encoder,
)
from app.reid.metrics import (
    AP_MODES,
    DISTRACTOR,
    JUNK,
    ApMode,
    ReidScores,
    evaluate,
    scorable_queries,
)

__all__ = ["labels", "main", "parse_name"]

AP_DEFINITIONS = {
    "torchreid": "non-interpolated (torchreid's eval_market1501)",
    "market1501": "neighbouring precisions averaged (the Market-1501 authors' MATLAB code)",
}


def scores_for(
    query: npt.NDArray[np.float32],
    gallery: npt.NDArray[np.float32],
    split: MarketSplit,
    ap_mode: ApMode = "torchreid",
) -> ReidScores:
    return evaluate(query @ gallery.T, *split.query_labels, *split.gallery_labels, ap_mode=ap_mode)


def markdown(
    results: dict[str, ReidScores], dataset: str, run: dict[str, Any], failed: dict[str, str]
) -> str:
    lines = [
        f"# Re-ID evaluation: {dataset}",
        "",
        f"Model {run['model']} ({run['precision']}, {run['backend']}); "
        f"mAP {run['ap_mode']}: {AP_DEFINITIONS[run['ap_mode']]}.",
        "",
        "| features | rank-1 | rank-5 | rank-10 | mAP | queries |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {100 * s.cmc[1]:.1f} | {100 * s.cmc[5]:.1f} | {100 * s.cmc[10]:.1f} | "
            f"{100 * s.mean_ap:.1f} | {s.queries} (+{s.skipped} skipped) |"
        )
    lines += [f"| {name} | failed: {why} | | | | |" for name, why in failed.items()]
    return "\n".join(lines) + "\n"


def write_results(
    out: Path,
    dataset: str,
    run: dict[str, Any],
    results: dict[str, ReidScores],
    failed: dict[str, str],
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"dataset": dataset, **run}
    document["results"] = {name: asdict(s) for name, s in results.items()}
    if failed:
        document["failed"] = failed
    table = markdown(results, dataset, run, failed)
    _write_whole(out / "reid.json", json.dumps(document, indent=2))
    _write_whole(out / "reid.md", table)
    return table


def _write_whole(path: Path, text: str) -> None:
    """Replaced at once: a run stopped while writing (Ctrl-C) leaves the earlier file,
    never half of one."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text)
    os.replace(staging, path)


def load_projections(
    paths: list[Path], model: ModelIdentity, served: str | None = None
) -> list[Projection]:
    """Every projection file read and checked against the model: before any embedding.
    `served`: the projection the service at --url applies already, if any."""
    projections = []
    for path in paths:
        projection = Projection.load(
            path,
            expected_model=model.name,
            expected_weights=model.weights_sha256 or None,
            option="--projection",
            runs="--model is" if model.weights_sha256 else "the service at --url runs",
        )
        if served and model.dim and projection.input_dim != model.dim:
            raise ProjectionError(
                f"--projection={path} maps raw {projection.input_dim}-d embeddings, but the "
                f"service at --url applies a projection already ({served}, {model.dim}-d) and "
                "projections do not stack: evaluate the file in process (without --url), or "
                "against a service without CLIP_PROJECTION"
            )
        if model.dim and projection.input_dim != model.dim:
            raise ProjectionError(
                f"--projection={path} maps {projection.input_dim} dims, but {model.name} "
                f"gives {model.dim}; fit one for this model (python -m app.reid.fit_projection)"
            )
        projections.append(projection)
    return projections


def main(argv: list[str] | None = None) -> dict[str, ReidScores]:
    parser = argparse.ArgumentParser(
        prog="python -m app.reid.eval_reid", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", type=Path, help="folder with query/ and bounding_box_test/")
    parser.add_argument(
        "--url", help="embed through this running service instead (its own model options)"
    )
    parser.add_argument("--api-key")
    add_model_options(parser)
    parser.add_argument("--projection", type=Path, action="append", default=[])
    parser.add_argument(
        "--ap-mode",
        choices=AP_MODES,
        default="torchreid",
        help="mAP definition: torchreid (non-interpolated, the default) or market1501 "
        "(the dataset authors' MATLAB code, neighbouring precisions averaged)",
    )
    parser.add_argument("--out", default="reid-results", help="folder for reid.json and reid.md")
    args = parser.parse_args(argv)
    # Before the first image: hours of embedding must not end at a results folder
    # that cannot be written.
    problem = output_folder_problem(args.out)
    if problem is not None:
        fail(parser, f"--out {args.out or repr(args.out)}: {problem}")
    args.out = Path(args.out)
    if not args.dataset.is_dir():
        fail(parser, f"{args.dataset}: no such folder")

    with one_line_errors(parser):
        split = market_split(args.dataset)
        everything = split.query + split.gallery
        scorable = scorable_queries(*split.query_labels, *split.gallery_labels)
        if not scorable:
            fail(
                parser,
                f"none of the {len(split.query)} queries in {args.dataset}/query has its "
                "person in bounding_box_test/ on another camera (same-camera matches and "
                "junk do not count, nor do queries of junk or distractors, persons -1 and "
                "0): there is nothing to score",
            )
        nobody = int(np.isin(split.query_labels[0], (JUNK, DISTRACTOR)).sum())
        if nobody:
            print(
                f"note: {nobody} of the {len(split.query)} queries "
                f"{'is junk or a distractor' if nobody == 1 else 'are junk or distractors'} "
                "(persons -1 and 0), which name no one: skipped",
                file=sys.stderr,
            )
        unmatched = len(split.query) - nobody - scorable
        if unmatched:
            print(
                f"note: {unmatched} of the {len(split.query)} queries "
                f"{'has' if unmatched == 1 else 'have'} no crop of their person in "
                "bounding_box_test/ on another camera: skipped",
                file=sys.stderr,
            )
        if args.url:
            info = service_info(args.url, args.api_key)
            model = ModelIdentity(str(info["model"]), dim=int(info.get("dim", 0)))
            projections = load_projections(args.projection, model, info.get("projection"))
            run = {
                "model": model.name,
                "weights_sha256": None,  # /info does not say; checked by model id only
                "precision": info.get("precision"),
                "backend": info.get("backend"),
                "device": info.get("device"),
                "dim": info.get("dim"),
                # The service's own CLIP_PROJECTION, if any: its embeddings are not raw.
                "served_projection": info.get("projection"),
            }
            embeddings = embed_via_service(everything, args.url, args.api_key)
        else:
            settings = settings_from(args)
            encoder = load_encoder(settings)  # precision, backend and device checked here
            model = identify(encoder)
            projections = load_projections(args.projection, model)
            run = {
                "model": model.name,
                "weights_sha256": model.weights_sha256,
                "precision": encoder.info.precision,
                "backend": encoder.info.backend,
                "device": encoder.info.device,
            }
            embeddings, _ = embed_in_process(everything, settings, encoder=encoder)
        run["ap_mode"] = args.ap_mode
        query, gallery = embeddings[: len(split.query)], embeddings[len(split.query) :]

        served = run.get("served_projection")
        first = f"as served ({served}, {embeddings.shape[1]}-d)" if served else "raw"
        results = {first: scores_for(query, gallery, split, args.ap_mode)}
        failed: dict[str, str] = {}
        # Written now, so that hours of embedding survive whatever a projection does next.
        write_results(args.out, str(args.dataset), run, results, failed)
        # Rows by file name, or by path where two files share a name (a row was lost).
        short = [path.name for path in args.projection]
        for path, projection in zip(args.projection, projections, strict=True):
            shown = path.name if short.count(path.name) == 1 else str(path)
            name = f"{shown} ({projection.kind}, {projection.output_dim}-d)"
            try:
                results[name] = scores_for(
                    projection.apply(query), projection.apply(gallery), split, args.ap_mode
                )
            except Exception as exc:  # one bad file must not lose the other rows
                failed[name] = f"{type(exc).__name__}: {exc}"
        table = write_results(args.out, str(args.dataset), run, results, failed)
        print(table)
        if failed:
            fail(
                parser,
                f"{len(failed)} projection(s) failed ({'; '.join(failed.values())}); the "
                f"other results are in {args.out / 'reid.json'}",
            )
    return results


def service_info(url: str, api_key: str | None) -> dict[str, Any]:
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/info", headers=headers, timeout=30)
        response.raise_for_status()
        info: dict[str, Any] = response.json()
    except httpx.HTTPStatusError as exc:
        hint = "; give its key with --api-key" if exc.response.status_code == 401 else ""
        status = f"{exc.response.status_code} {exc.response.reason_phrase}"
        raise ValueError(f"--url {url}: cannot read its /info ({status}){hint}") from None
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"--url {url}: cannot read its /info ({exc})") from None
    return info


if __name__ == "__main__":
    main()
