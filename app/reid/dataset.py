"""Labelled person crops on disk: Market-1501 file names, or one folder per identity.

Market-1501 names a crop PPPP_cCsS_FFFFFF_NN.jpg: person PPPP (-1 junk, 0 a distractor)
seen by camera C. Everything here reads names and folders only, so a dataset is checked
whole before any image is embedded.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.reid.embedding import image_files
from app.reid.metrics import DISTRACTOR, JUNK

_NAME = re.compile(r"^(-?\d+)_c(\d+)")


class DatasetError(ValueError):
    """The folder is not laid out as the command needs; the message says what is wrong."""


def parse_name(path: Path) -> tuple[int, int]:
    """(person id, camera) from a Market-1501 file name."""
    match = _NAME.match(path.name)
    if not match:
        raise DatasetError(f"{path} is not named PPPP_cCsS_...: cannot tell person and camera")
    return int(match.group(1)), int(match.group(2))


def labels(paths: list[Path]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Person ids and cameras of Market-1501 file names."""
    pairs = np.array([parse_name(p) for p in paths], dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


@dataclass(frozen=True)
class MarketSplit:
    """query/ and bounding_box_test/ of a Market-1501 layout, names already parsed."""

    query: list[Path]
    gallery: list[Path]
    query_labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
    gallery_labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def market_split(root: Path) -> MarketSplit:
    query, gallery = image_files(root / "query"), image_files(root / "bounding_box_test")
    if not query or not gallery:
        raise DatasetError(f"{root} needs images in query/ and bounding_box_test/")
    return MarketSplit(query, gallery, labels(query), labels(gallery))


@dataclass(frozen=True)
class LabelledCrops:
    paths: list[Path]
    identities: npt.NDArray[np.int64]  # 0 .. classes-1, one per path
    names: list[str]  # identity index -> its name in the dataset
    layout: str  # "market1501" or "folders"


def labelled_crops(folder: Path) -> LabelledCrops:
    """Crops with identities: from Market-1501 names when every file has one (junk and
    distractors dropped: they carry no identity), else from the first sub-folder under
    `folder` (one folder per identity)."""
    paths = image_files(folder)
    if not paths:
        raise DatasetError(f"{folder} holds no images")
    named = [p for p in paths if _NAME.match(p.name)]
    if named and len(named) != len(paths) and len(named) * 2 >= len(paths):
        # Mostly Market-1501 names: the others are a mistake to fix, not a sign of the
        # folder layout, which would label every crop by the folder they share.
        odd = next(p for p in paths if not _NAME.match(p.name))
        raise DatasetError(
            f"{odd} is not named PPPP_cCsS_... though {len(named)} of the {len(paths)} crops "
            "are: rename or remove it (or lay the crops out one sub-folder per identity)"
        )
    if len(named) == len(paths):
        folders = {
            p.relative_to(folder).parts[0] for p in paths if len(p.relative_to(folder).parts) > 1
        }
        if len(folders) > 1:
            print(
                f"note: {folder}: crops are labelled by their Market-1501 names; the "
                f"{len(folders)} sub-folders they lie in are not read as identities",
                file=sys.stderr,
            )
        ids = labels(paths)[0]
        keep = [i for i, person in enumerate(ids) if person not in (JUNK, DISTRACTOR)]
        kept_paths = [paths[i] for i in keep]
        names = [str(int(ids[i])) for i in keep]
        layout = "market1501"
    else:
        loose = [p for p in paths if len(p.relative_to(folder).parts) < 2]
        if loose:
            raise DatasetError(
                f"{loose[0]} lies directly in {folder}: a supervised fit needs Market-1501 "
                "names (PPPP_cC...) or one sub-folder per identity"
            )
        if named:
            # Fewer than half: not the Market-1501 layout, but its names were not read.
            print(
                f"note: {folder}: {len(named)} of the {len(paths)} crops have Market-1501 "
                "names (PPPP_cC...), the rest do not: every crop is labelled by its "
                "sub-folder, and those names are not read as identities",
                file=sys.stderr,
            )
        kept_paths = paths
        names = [p.relative_to(folder).parts[0] for p in paths]
        layout = "folders"
    unique, identities = np.unique(np.array(names), return_inverse=True)
    return LabelledCrops(kept_paths, identities.astype(np.int64), [str(u) for u in unique], layout)
