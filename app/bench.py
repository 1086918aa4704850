"""In-process benchmark of the embedding pipeline, per backend and precision.

    python -m app.bench --model local-dir:models/vit-b-32-random \
        --precisions torch:fp32,torch:bf16,openvino:fp32,openvino:bf16,onnxruntime:int8

Each entry is `backend:precision` (a bare precision means torch). Reports, for each:
single-image latency, images/s by batch size, validity
(NaN/inf count, largest |norm - 1|), parity with fp32 (cosine), and discriminability
(mean cosine of same-outfit pairs against different-outfit pairs of synthetic people);
plus the codec's serialisation cost. Writes result.json, result.md and throughput.png
to --out. Every measurement is time-boxed, so a run's length is predictable.

Before opting into int8 (or any precision), measure its agreement with fp32 on your own
weights and crops: `--images DIR` times and compares on every image in DIR instead of
synthetic people, and the cosine columns are then about your cameras:

    python -m app.bench --model ViT-B-32 --pretrained openai --images my-crops/ \
        --precisions torch:fp32,onnxruntime:int8,openvino:bf16 --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import ValidationError
from tqdm import tqdm

from app.codec import decode_embedding, encode_embedding
from app.config import Backend, Precision, Settings
from app.errors import ServiceError
from app.inference.decode import decode_image
from app.inference.model import ClipImageEncoder
from app.inference.weights import WeightsUnavailable
from app.tools.synthetic_people import make_person, random_garment


@dataclass
class PrecisionResult:
    precision: str
    device: str
    backend: str
    streams: int  # batches in flight at once in the img/s figures (one per stream)
    latency_ms_p50: float
    latency_ms_p95: float
    images_per_s: dict[int, float]
    nan_or_inf: int
    max_norm_error: float
    cosine_to_fp32_min: float | None = None
    cosine_to_fp32_mean: float | None = None
    same_outfit_cosine: float = 0.0
    different_outfit_cosine: float = 0.0
    discriminability_gap: float = 0.0


@dataclass
class BenchResult:
    model: str
    machine: str
    torch: str
    threads: int
    codec_encode_us: float
    codec_decode_us: float
    decode_ms: float
    images: str = "16 synthetic people"
    precisions: list[PrecisionResult] = field(default_factory=list)


def timed_runs(work: Callable[[], object], seconds: float, minimum: int = 3) -> list[float]:
    """Run `work` repeatedly for about `seconds` (at least `minimum` times)."""
    work()  # warm-up: first calls pay for allocations and kernel selection
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(durations) < minimum or time.perf_counter() < deadline:
        started = time.perf_counter()
        work()
        durations.append(time.perf_counter() - started)
    return durations


def throughput(
    encode: Callable[[list[Any]], object], batch: list[Any], streams: int, seconds: float
) -> float:
    """Images a second with a batch of `batch` in flight on each of the runtime's
    `streams`, as the service keeps one on each under load. One batch at a time would
    time a runtime of two streams on one stream's share of the cores: a batch that runs
    alone there takes one stream's threads, not every core (app.inference.runtimes)."""
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: encode(batch), range(streams)))  # warm-up, every stream
        started = time.perf_counter()
        deadline = started + seconds

        def passes(_: int) -> int:
            done = 0
            while done < 3 or time.perf_counter() < deadline:
                encode(batch)
                done += 1
            return done

        total = sum(pool.map(passes, range(streams)))
        elapsed = time.perf_counter() - started
    return total * len(batch) / elapsed


def outfit_pairs(count: int, seed: int = 0) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Anchors, the same outfit in another scene, and a different outfit."""
    rng = np.random.default_rng(seed)
    anchors, same, different = [], [], []
    for _ in range(count):
        outfit = (random_garment(rng), random_garment(rng))
        other = (random_garment(rng), random_garment(rng))
        while other[0][0] == outfit[0][0] and other[1][0] == outfit[1][0]:
            other = (random_garment(rng), random_garment(rng))
        anchors.append(make_person(rng, outfit).jpeg)
        same.append(make_person(rng, outfit).jpeg)
        different.append(make_person(rng, other).jpeg)
    return anchors, same, different


def bench_precision(
    settings: Settings,
    batch_sizes: list[int],
    seconds: float,
    crops: list[bytes],
    pairs: tuple[list[bytes], list[bytes], list[bytes]],
    reference: npt.NDArray[np.float64] | None,
) -> tuple[PrecisionResult, npt.NDArray[np.float32]]:
    encoder = ClipImageEncoder.load(settings)
    encoder.release_text_tower()

    def inputs(files: list[bytes]) -> list[Any]:
        return [
            encoder.preprocess(decode_image(f, max_pixels=settings.max_image_pixels)) for f in files
        ]

    tensors = inputs(crops)
    single = timed_runs(lambda: encoder.encode(tensors[:1]), seconds)
    rates = {}
    label = f"{encoder.info.backend} {encoder.info.precision}"
    streams = encoder.info.streams
    for size in tqdm(batch_sizes, desc=f"{label} batches", leave=False):
        batch = [tensors[i % len(tensors)] for i in range(size)]
        # A batch smaller than the streams runs alone over every core (Turns): timed
        # one at a time, as a lone client's; larger ones with one on every stream.
        in_flight = streams if size >= streams else 1
        rates[size] = throughput(encoder.encode, batch, in_flight, seconds)

    embeddings = np.concatenate(
        [encoder.encode(tensors[i : i + 64]) for i in range(0, len(tensors), 64)]
    )
    anchors, same, different = (encoder.encode(inputs(files)) for files in pairs)
    result = PrecisionResult(
        precision=encoder.info.precision,
        device=encoder.info.device,
        backend=encoder.info.backend,
        streams=streams,
        latency_ms_p50=1000 * statistics.median(single),
        latency_ms_p95=1000 * float(np.percentile(single, 95)),
        images_per_s=rates,
        nan_or_inf=int((~np.isfinite(embeddings)).sum()),
        max_norm_error=float(np.abs(np.linalg.norm(embeddings, axis=1) - 1).max()),
        same_outfit_cosine=float(np.mean(np.sum(anchors * same, axis=1))),
        different_outfit_cosine=float(np.mean(np.sum(anchors * different, axis=1))),
    )
    result.discriminability_gap = result.same_outfit_cosine - result.different_outfit_cosine
    if reference is not None:
        cosines = np.sum(embeddings.astype(np.float64) * reference, axis=1)
        result.cosine_to_fp32_min = float(cosines.min())
        result.cosine_to_fp32_mean = float(cosines.mean())
    return result, embeddings


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def codec_costs(dim: int, count: int = 5000) -> tuple[float, float]:
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    started = time.perf_counter()
    texts = [encode_embedding(v) for v in vectors]
    encoded = time.perf_counter() - started
    started = time.perf_counter()
    for text in texts:
        decode_embedding(text)
    decoded = time.perf_counter() - started
    return 1e6 * encoded / count, 1e6 * decoded / count


def markdown(result: BenchResult) -> str:
    sizes = sorted({s for p in result.precisions for s in p.images_per_s})
    lines = [
        f"# Benchmark: {result.model}",
        "",
        f"{result.machine}; torch {result.torch}, {result.threads} threads.",
        f"Codec: {result.codec_encode_us:.1f} us to encode, {result.codec_decode_us:.1f} us to "
        f"decode one embedding. Decoding a JPEG crop: {result.decode_ms:.2f} ms.",
        f"Images timed and compared with fp32: {result.images}.",
        "",
        "img/s @N: a batch of N in flight on each of the runtime's streams at once, as "
        "the service runs them under load (a batch smaller than the streams runs alone "
        "over every core, one at a time).",
        "",
        "| backend | precision | device | streams | batch-1 p50 ms | "
        + " | ".join(f"img/s @{s}" for s in sizes)
        + " | cosine to fp32 (min) | NaN/inf | max norm err | same / different outfit |",
        "|---|---|---|---:|---:|" + "---:|" * len(sizes) + "---:|---:|---:|---|",
    ]
    for p in result.precisions:
        rates = " | ".join(f"{p.images_per_s.get(s, float('nan')):.1f}" for s in sizes)
        parity = "-" if p.cosine_to_fp32_min is None else f"{p.cosine_to_fp32_min:.6f}"
        lines.append(
            f"| {p.backend} | {p.precision} | {p.device} | {p.streams} | "
            f"{p.latency_ms_p50:.1f} | {rates} | "
            f"{parity} | "
            f"{p.nan_or_inf} | {p.max_norm_error:.1e} | "
            f"{p.same_outfit_cosine:.3f} / {p.different_outfit_cosine:.3f} "
            f"(gap {p.discriminability_gap:+.3f}) |"
        )
    return "\n".join(lines) + "\n"


def plot(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for p in result.precisions:
        sizes = sorted(p.images_per_s)
        label = f"{p.backend} {p.precision}"
        axes.plot(sizes, [p.images_per_s[s] for s in sizes], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size")
    axes.set_ylabel("images / s")
    axes.set_title(f"{result.model} on {result.precisions[0].device if result.precisions else '?'}")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(args: argparse.Namespace) -> BenchResult:
    base = Settings(model=args.model, pretrained=args.pretrained, device=args.device, warmup=False)
    crops = (
        read_images(args.images, base.max_image_pixels)
        if args.images
        else [make_person(np.random.default_rng(i)).jpeg for i in range(16)]
    )
    pairs = outfit_pairs(args.pairs)
    started = time.perf_counter()
    for crop in crops:
        decode_image(crop, max_pixels=base.max_image_pixels)
    decode_ms = 1000 * (time.perf_counter() - started) / len(crops)

    reference_config = (Backend.TORCH, Precision.FP32)
    configs = list(args.precisions)
    if reference_config in configs:  # the reference first, for parity
        configs = [reference_config] + [c for c in configs if c != reference_config]
    result = BenchResult(
        model=args.model,
        machine=cpu_name(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        codec_encode_us=0.0,
        codec_decode_us=0.0,
        decode_ms=decode_ms,
        images=f"{len(crops)} from {args.images}" if args.images else "16 synthetic people",
    )
    reference = None
    embeddings = np.zeros((0, 0), dtype=np.float32)
    for backend, precision in tqdm(configs, desc="configurations"):
        settings = base.model_copy(update={"precision": precision, "backend": backend})
        measured, embeddings = bench_precision(
            settings, args.batch_sizes, args.seconds, crops, pairs, reference
        )
        if (backend, precision) == reference_config:
            reference = embeddings.astype(np.float64)
        result.precisions.append(measured)
    result.codec_encode_us, result.codec_decode_us = codec_costs(int(embeddings.shape[1]))
    return result


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_images(folder: Path, max_pixels: int) -> list[bytes]:
    """Every image file directly in `folder`, in name order; SystemExit naming the first
    one the service would refuse."""
    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise SystemExit(f"--images {folder}: no image files ({suffixes})")
    images = []
    for path in files:
        data = path.read_bytes()
        try:
            decode_image(data, max_pixels=max_pixels)
        except ServiceError as error:
            raise SystemExit(f"--images: {path}: {error.message}") from None
        images.append(data)
    return images


def parse_config(entry: str) -> tuple[Backend, Precision]:
    """`openvino:bf16` -> (openvino, bf16); a bare `int8` -> (torch, int8)."""
    backend, _, precision = entry.strip().rpartition(":")
    return Backend(backend or "torch"), Precision(precision)


def config_list(text: str) -> list[tuple[Backend, Precision]]:
    """--precisions: comma-separated [backend:]precision entries, each checked now."""
    try:
        return [parse_config(entry) for entry in text.split(",")]
    except ValueError:
        backends = ", ".join(b.value for b in Backend if b != Backend.AUTO)
        precisions = ", ".join(p.value for p in Precision if p != Precision.AUTO)
        raise argparse.ArgumentTypeError(
            f"{text!r}: each entry is [backend:]precision, backend one of {backends} "
            f"(default torch), precision one of {precisions}"
        ) from None


# The service's settings named in a loading error, as this command's options.
_OPTIONS = {"CLIP_MODEL": "--model", "CLIP_PRETRAINED": "--pretrained", "CLIP_DEVICE": "--device"}


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="as CLIP_MODEL")
    parser.add_argument("--pretrained", default="openai", help="as CLIP_PRETRAINED")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precisions",
        default="fp32",
        type=config_list,
        help="comma-separated [backend:]precision entries",
    )
    parser.add_argument(
        "--batch-sizes", default="1,2,4,8,16,32", type=lambda t: [int(s) for s in t.split(",")]
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement point")
    parser.add_argument("--pairs", type=int, default=16, help="outfit pairs for discriminability")
    parser.add_argument(
        "--images",
        type=Path,
        help="a folder of your own crops: timings and the cosine to torch fp32 use them",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (WeightsUnavailable, ValidationError) as exc:
        # A model, weights or device this machine cannot load: one line, not a traceback.
        message = (
            "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors() if e["loc"])
            if isinstance(exc, ValidationError)
            else str(exc).splitlines()[0]
        )
        for setting, option in _OPTIONS.items():
            message = message.replace(setting, option)
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(asdict(result), indent=2))
    table = markdown(result)
    (args.out / "result.md").write_text(table)
    plot(result, args.out / "throughput.png")
    print(table)
    print(f"wrote {args.out}/result.json, result.md, throughput.png")
    return result


if __name__ == "__main__":
    main()
