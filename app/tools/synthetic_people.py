"""Synthetic person crops with known garment colours: the colour-naming test's data, the
benchmark's similar/different-outfit pairs, and a labelled re-ID set in Market-1501's
layout (python -m app.tools.synthetic_people DIR) for comparing projections.

Ground truth comes from CSS/X11 named colours grouped under the 11 basic terms, a
palette independent of the service's own prototypes. Each crop has a head, torso, arms,
legs with a gap and shoes on a random background (solid, gradient or blotchy), under
uneven lighting, with cloth folds, sensor noise and JPEG compression.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, list[tuple[int, int, int]]] = {
    "black": [(0, 0, 0), (20, 20, 20), (30, 28, 32)],
    "white": [(255, 255, 255), (245, 245, 245), (255, 250, 250), (248, 248, 255), (240, 240, 236)],
    "gray": [(128, 128, 128), (105, 105, 105), (150, 150, 150), (112, 128, 144), (119, 125, 133)],
    "red": [(255, 0, 0), (139, 0, 0), (178, 34, 34), (220, 20, 60), (200, 16, 46)],
    "orange": [(255, 165, 0), (255, 140, 0), (240, 120, 20), (255, 117, 24)],
    "yellow": [(255, 255, 0), (255, 215, 0), (240, 230, 80), (250, 218, 50)],
    "green": [(0, 128, 0), (0, 100, 0), (34, 139, 34), (46, 139, 87), (107, 142, 35),
              (50, 205, 50)],
    "blue": [(0, 0, 255), (0, 0, 128), (0, 0, 139), (65, 105, 225), (70, 130, 180),
             (30, 144, 255), (25, 25, 112), (100, 149, 237)],
    "purple": [(128, 0, 128), (75, 0, 130), (148, 0, 211), (102, 51, 153), (147, 112, 219),
               (139, 0, 139)],
    "pink": [(255, 192, 203), (255, 105, 180), (255, 20, 147), (255, 182, 193), (219, 112, 147)],
    "brown": [(139, 69, 19), (160, 82, 45), (101, 67, 33), (120, 80, 40), (92, 64, 51)],
}  # fmt: skip

SKIN = [(255, 224, 196), (234, 192, 160), (198, 134, 96), (141, 85, 54), (90, 56, 37)]
HAIR = [(20, 15, 10), (60, 40, 20), (120, 90, 50), (200, 170, 110), (90, 90, 90)]


@dataclass(frozen=True)
class SyntheticPerson:
    jpeg: bytes
    top: str
    bottom: str


VIEWS = ("front", "back", "side")

Outfit = tuple[tuple[str, tuple[int, int, int]], tuple[str, tuple[int, int, int]]]


def make_person(
    rng: np.random.Generator, outfit: Outfit | None = None, view: str = "front"
) -> SyntheticPerson:
    """A random person; `outfit` ((top name, rgb), (bottom name, rgb)) fixes the clothes,
    so that two calls give the same outfit seen in another scene. `view`: front (face),
    back (hair where the face was) or side (narrow body, one arm); the view changes only
    what is drawn, never the random draws, so a seed gives the same scene in every view."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    (top, top_rgb), (bottom, bottom_rgb) = outfit or (random_garment(rng), random_garment(rng))
    width = int(rng.integers(64, 161))
    height = int(width * rng.uniform(2.0, 3.0))

    canvas = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(canvas)
    skin = SKIN[rng.integers(len(SKIN))]
    centre = width * rng.uniform(0.45, 0.55)
    shoulder = width * rng.uniform(0.22, 0.3)  # half width of the torso

    def y(fraction: float) -> float:  # positions read best as fractions of height
        return height * fraction

    # head and hair
    head_w = shoulder * 0.7
    hair = HAIR[rng.integers(len(HAIR))]
    draw.ellipse(
        [centre - head_w, y(0.03), centre + head_w, y(0.15)], fill=hair if view == "back" else skin
    )
    draw.chord([centre - head_w, y(0.02), centre + head_w, y(0.1)], 180, 360, fill=hair)
    # arms: sleeves in the top's colour, hands or forearms in skin
    sleeve = rng.uniform(0.25, 1.0)
    arm_w = shoulder * 0.35
    if view == "side":  # seen from the side: half as wide, the near arm over the torso
        shoulder *= 0.55

    def arms() -> None:
        for side in (-1, 1) if view != "side" else (1,):
            x0 = centre + side * shoulder if view != "side" else centre - arm_w / 2
            x1 = x0 + side * arm_w
            box = [min(x0, x1), y(0.17), max(x0, x1)]
            draw.rectangle([*box[:2], box[2], y(0.17 + 0.33 * sleeve)], fill=top_rgb)
            draw.rectangle([box[0], y(0.17 + 0.33 * sleeve), box[2], y(0.52)], fill=skin)

    if view != "side":
        arms()
    # torso
    draw.polygon([(centre - shoulder, y(0.16)), (centre + shoulder, y(0.16)),
                  (centre + shoulder * 0.9, y(0.53)), (centre - shoulder * 0.9, y(0.53))],
                 fill=top_rgb)  # fmt: skip
    if view == "side":
        arms()
    # legs with a gap, and shoes
    leg_w = shoulder * 0.8
    gap = shoulder * rng.uniform(0.05, 0.3)
    for side in (-1, 1):
        inner = centre + side * gap / 2
        outer = inner + side * leg_w
        draw.rectangle([min(inner, outer), y(0.52), max(inner, outer), y(0.93)], fill=bottom_rgb)
        draw.rectangle([min(inner, outer), y(0.93), max(inner, outer), y(0.98)], fill=(25, 25, 25))
    draw.rectangle(
        [centre - shoulder * 0.9, y(0.51), centre + shoulder * 0.9, y(0.6)], fill=bottom_rgb
    )  # hips

    pixels = np.asarray(canvas, dtype=np.float64)
    pixels *= _lighting(rng, width, height)[..., None]
    pixels += rng.normal(0, rng.uniform(2, 8), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
    return SyntheticPerson(buffer.getvalue(), top, bottom)


def random_garment(rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
    name = str(rng.choice(list(PALETTE)))
    return name, PALETTE[name][rng.integers(len(PALETTE[name]))]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    kind = rng.integers(3)
    first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if kind == 0:
        return np.broadcast_to(first, (height, width, 3)).astype(np.uint8)
    if kind == 1:
        t = np.linspace(0, 1, height)[:, None, None]
        return np.broadcast_to(first * (1 - t) + second * t, (height, width, 3)).astype(np.uint8)
    blotches = rng.integers(0, 256, (6, 3, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(blotches).resize((width, height), Image.Resampling.BICUBIC))


def _lighting(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Uneven light (0.8-1.1) with cloth folds: a lit side, a darker bottom, ripples."""
    x = np.linspace(-1, 1, width)[None, :]
    yy = np.linspace(0, 1, height)[:, None]
    light = 0.95 + rng.uniform(-0.1, 0.1) * x - rng.uniform(0, 0.1) * yy
    folds = 0.04 * np.sin(x * rng.uniform(8, 20) + yy * rng.uniform(5, 15))
    return np.clip(light + folds, 0.8, 1.1)


def write_market_layout(
    root: Path, train_ids: int, test_ids: int, seed: int = 0, distractors: int = 0
) -> Path:
    """A labelled set in Market-1501's layout: identities differ by outfit (garment
    colours), and each is seen by three cameras, each camera from its own view (front,
    back, side, rotated per identity), in its own scene. bounding_box_train/ holds
    identities 1..train_ids, two crops per camera; query/ (camera 1) and
    bounding_box_test/ (cameras 2 and 3, plus `distractors` strangers with id 0) hold the
    next test_ids identities, none of whom the training half has seen."""
    rng = np.random.default_rng(seed)
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    frame = 0

    def write(folder: str, person: int, camera: int, outfit: Outfit | None, view: str) -> None:
        nonlocal frame
        frame += 1
        name = f"{person:04d}_c{camera}s1_{frame:06d}_00.jpg"
        (root / folder / name).write_bytes(make_person(rng, outfit, view).jpeg)

    for person in range(1, train_ids + test_ids + 1):
        outfit = (random_garment(rng), random_garment(rng))
        for camera in (1, 2, 3):
            view = VIEWS[(camera + person) % len(VIEWS)]
            if person <= train_ids:
                for _ in range(2):
                    write("bounding_box_train", person, camera, outfit, view)
            else:
                write("query" if camera == 1 else "bounding_box_test", person, camera, outfit, view)
    for _ in range(distractors):
        write("bounding_box_test", 0, int(rng.integers(2, 4)), None, str(rng.choice(VIEWS)))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic labelled re-ID set.")
    parser.add_argument("root", type=Path, help="folder to write the Market-1501 layout into")
    parser.add_argument("--train-ids", type=int, default=60)
    parser.add_argument("--test-ids", type=int, default=40)
    parser.add_argument("--distractors", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_market_layout(args.root, args.train_ids, args.test_ids, args.seed, args.distractors)
    print(f"wrote {args.root}: {args.train_ids} training and {args.test_ids} test identities")


if __name__ == "__main__":
    main()
