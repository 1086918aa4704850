"""Dominant garment colours, named with the 11 basic colour terms.

Pixels are clustered in CIELAB (perceptually uniform, so k-means distances mean
something), weighted by how likely each pixel is garment rather than background or skin.
Each cluster centre is named by its nearest prototype under CIEDE2000, the CIE's current
colour-difference formula; conversions and the distance come from scikit-image.

Several prototypes per term carry the shades real garments take under real light (navy
and dark green are "blue" and "green", not "black"; a white shirt in shade is still
"white"), which is what pedestrian-attribute datasets such as PETA label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab

BASIC_COLORS = (
    "black", "white", "gray", "red", "orange", "yellow",
    "green", "blue", "purple", "pink", "brown",
)  # fmt: skip

# sRGB prototypes per term. The achromatic ones set the lightness boundaries: white
# below L*~70 would turn shaded white shirts gray; black above L*~28 would swallow
# charcoal. Dark, saturated shades (navy, bottle green, maroon) keep their hue names.
_PROTOTYPES: dict[str, list[tuple[int, int, int]]] = {
    "black": [(0, 0, 0), (25, 25, 28), (40, 38, 40)],
    "white": [(255, 255, 255), (225, 225, 228), (200, 200, 204)],
    "gray": [(140, 140, 140), (110, 110, 112), (90, 92, 95), (160, 160, 165)],
    "red": [(220, 20, 30), (180, 20, 30), (130, 15, 25), (235, 60, 55), (90, 10, 20)],
    "orange": [(255, 140, 0), (240, 110, 30), (255, 165, 60), (215, 100, 20)],
    "yellow": [(255, 230, 0), (245, 220, 70), (255, 245, 120), (215, 190, 30)],
    "green": [(0, 150, 0), (40, 110, 50), (100, 180, 80), (25, 70, 35), (120, 200, 120),
              (85, 107, 47), (0, 100, 80)],
    "blue": [(0, 0, 255), (0, 0, 128), (30, 60, 150), (70, 130, 200), (20, 30, 70),
             (100, 150, 220), (25, 25, 112), (0, 120, 180), (135, 180, 230)],
    "purple": [(128, 0, 128), (110, 50, 160), (160, 100, 200), (70, 30, 90), (190, 150, 220),
               (90, 30, 120)],
    "pink": [(255, 150, 180), (240, 100, 160), (255, 190, 200), (220, 90, 130),
             (255, 105, 180), (250, 170, 190)],
    "brown": [(120, 70, 30), (90, 55, 30), (150, 100, 60), (60, 40, 25), (140, 85, 45),
              (165, 120, 80), (205, 175, 135)],
}  # fmt: skip

_PROTOTYPE_NAMES = np.array([n for n, shades in _PROTOTYPES.items() for _ in shades])
_PROTOTYPE_LAB = rgb2lab(
    np.array([s for shades in _PROTOTYPES.values() for s in shades], dtype=np.uint8)[None]
)[0]


@dataclass(frozen=True)
class ColorShare:
    name: str
    rgb: str  # "#rrggbb" of the share's mean colour
    fraction: float  # of the region's garment weight


def name_lab(lab: npt.NDArray[np.float64]) -> npt.NDArray[np.str_]:
    """Basic colour term of each CIELAB colour (shape (..., 3))."""
    flat = lab.reshape(-1, 1, 3)
    distances = deltaE_ciede2000(flat, _PROTOTYPE_LAB[None, :, :])  # type: ignore[no-untyped-call]
    names: npt.NDArray[np.str_] = _PROTOTYPE_NAMES[np.argmin(distances, axis=1)]
    return names.reshape(lab.shape[:-1])


def name_rgb(rgb: tuple[int, int, int]) -> str:
    return str(name_lab(rgb2lab(np.array([[rgb]], dtype=np.uint8))[0, 0]))


def dominant_colors(
    rgb: npt.NDArray[np.uint8],
    weights: npt.NDArray[np.float64],
    clusters: int = 4,
    min_fraction: float = 0.05,
) -> list[ColorShare]:
    """Named colour shares of an (H, W, 3) region, largest first.

    `weights` (H, W) say how much each pixel counts (garment likelihood). Clusters that
    end up with the same name are merged; shares under `min_fraction` are dropped.
    """
    pixels = rgb.reshape(-1, 3)
    mass = weights.reshape(-1).astype(np.float64)
    keep = mass > 0
    if not keep.any():
        return []
    lab = rgb2lab(pixels[keep][None].astype(np.uint8))[0]
    mass = mass[keep]
    centres, labels = weighted_kmeans(lab, mass, min(clusters, len(lab)))
    names = name_lab(centres)
    total = mass.sum()
    shares: dict[str, tuple[float, npt.NDArray[np.float64]]] = {}
    for index, name in enumerate(names):
        members = labels == index
        cluster_mass = float(mass[members].sum())
        if cluster_mass <= 0:
            continue
        weighted_sum = (lab[members] * mass[members, None]).sum(axis=0)
        previous_mass, previous_sum = shares.get(str(name), (0.0, np.zeros(3)))
        shares[str(name)] = (previous_mass + cluster_mass, previous_sum + weighted_sum)
    result = [
        ColorShare(name=name, rgb=_hex(lab_sum / share_mass), fraction=share_mass / total)
        for name, (share_mass, lab_sum) in shares.items()
    ]
    result.sort(key=lambda share: share.fraction, reverse=True)
    kept = [share for share in result if share.fraction >= min_fraction] or result[:1]
    return kept


def weighted_kmeans(
    points: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64],
    k: int,
    iterations: int = 12,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """Weighted Lloyd's k-means with deterministic farthest-point seeding.

    A dozen lines of numpy instead of scikit-learn: the data are a few thousand 3-D
    points, and a fixed seeding makes the result reproducible for the same image.
    """
    order = np.argsort(-weights, kind="stable")
    centres = [points[order[0]]]
    for _ in range(1, k):
        gap = np.min(((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(points[int(np.argmax(gap * weights))])
    centre_array = np.array(centres)
    labels = np.zeros(len(points), dtype=np.intp)
    for _ in range(iterations):
        distances = ((points[:, None, :] - centre_array[None]) ** 2).sum(-1)
        labels = np.argmin(distances, axis=1)
        moved = centre_array.copy()
        for index in range(k):
            members = labels == index
            member_weight = weights[members].sum()
            if member_weight > 0:
                moved[index] = (points[members] * weights[members, None]).sum(0) / member_weight
        if np.allclose(moved, centre_array, atol=1e-3):
            centre_array = moved
            break
        centre_array = moved
    return centre_array, labels


def _hex(lab: npt.NDArray[np.float64]) -> str:
    rgb = np.clip(lab2rgb(lab[None, None, :])[0, 0] * 255 + 0.5, 0, 255).astype(int)
    return "#{:02x}{:02x}{:02x}".format(*rgb)
