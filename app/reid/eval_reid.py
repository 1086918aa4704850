"""Evaluate re-identification on a Market-1501-style dataset.

    python -m app.reid.eval_reid /data/Market-1501 --projection pca128.safetensors
    python -m app.reid.eval_reid /data/Market-1501 --url http://localhost:8000

Reads `query/` and `bounding_box_test/` (file names PPPP_cCsS_FFFFFF_NN.jpg: person id,
camera; person -1 is junk, 0 a distractor), embeds them in process (or through a running
service), and reports CMC rank-1/5/10 and mAP for the raw embeddings and for each
projection file, as JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.config import Settings
from app.inference.projection import Projection
from app.reid.embedding import embed_in_process, embed_via_service, image_files
from app.reid.metrics import ReidScores, evaluate

_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def parse_name(path: Path) -> tuple[int, int]:
    """(person id, camera) from a Market-1501 file name."""
    match = _NAME.match(path.name)
    if not match:
        raise ValueError(f"{path.name} is not named PPPP_cCsS_...: cannot tell person and camera")
    return int(match.group(1)), int(match.group(2))


def labels(paths: list[Path]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    pairs = np.array([parse_name(p) for p in paths], dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def scores_for(
    query: npt.NDArray[np.float32],
    gallery: npt.NDArray[np.float32],
    query_labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    gallery_labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
) -> ReidScores:
    return evaluate(query @ gallery.T, *query_labels, *gallery_labels)


def markdown(results: dict[str, ReidScores], dataset: str, model: str) -> str:
    lines = [
        f"# Re-ID evaluation: {dataset}",
        "",
        f"Model {model}.",
        "",
        "| features | rank-1 | rank-5 | rank-10 | mAP | queries |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {100 * s.cmc[1]:.1f} | {100 * s.cmc[5]:.1f} | {100 * s.cmc[10]:.1f} | "
            f"{100 * s.mean_ap:.1f} | {s.queries} (+{s.skipped} skipped) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, ReidScores]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="folder with query/ and bounding_box_test/")
    parser.add_argument("--url", help="embed through this running service instead")
    parser.add_argument("--api-key")
    parser.add_argument("--model", default=Settings().model, help="as CLIP_MODEL")
    parser.add_argument("--pretrained", default=Settings().pretrained)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--projection", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("reid-results"))
    args = parser.parse_args(argv)

    query_paths = image_files(args.dataset / "query")
    gallery_paths = image_files(args.dataset / "bounding_box_test")
    if not query_paths or not gallery_paths:
        parser.error(f"{args.dataset} needs images in query/ and bounding_box_test/")
    everything = query_paths + gallery_paths
    if args.url:
        embeddings, model = embed_via_service(everything, args.url, args.api_key)
    else:
        settings = Settings(
            model=args.model, pretrained=args.pretrained, device=args.device, warmup=False
        )
        embeddings, model = embed_in_process(everything, settings)
    query, gallery = embeddings[: len(query_paths)], embeddings[len(query_paths) :]
    query_labels, gallery_labels = labels(query_paths), labels(gallery_paths)

    results = {"raw": scores_for(query, gallery, query_labels, gallery_labels)}
    for path in args.projection:
        projection = Projection.load(path, expected_model=model)
        results[f"{path.name} ({projection.kind}, {projection.output_dim}-d)"] = scores_for(
            projection.apply(query), projection.apply(gallery), query_labels, gallery_labels
        )

    args.out.mkdir(parents=True, exist_ok=True)
    document = {"dataset": str(args.dataset), "model": model}
    document["results"] = {name: asdict(s) for name, s in results.items()}  # type: ignore[assignment]
    (args.out / "reid.json").write_text(json.dumps(document, indent=2))
    table = markdown(results, str(args.dataset), model)
    (args.out / "reid.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
