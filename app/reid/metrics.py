"""CMC and mAP under the Market-1501 protocol.

For each query, gallery items of the same person seen by the same camera are removed
(they are trivially easy), as are junk items (person id -1); distractors (id 0) stay as
negatives. A query whose person has no gallery item left is skipped, as is a query of
junk or of a distractor: neither is a person (every distractor shares id 0), so the
other distractors would count as its matches. CMC rank-k is the
fraction of queries with a true match among their k best; mAP averages AP over queries.

AP comes in two definitions that published tables mix, 0.2-2.6 points apart on Market-like
data, so the caller picks one (`ap_mode`):

- `torchreid` (the default): non-interpolated AP, the mean of precision at each true
  match's rank, as torchreid's `eval_market1501` (and most Python re-ID code) computes it.
  Checked against torchreid 0.2.5 to 1e-16 on random cases without ties.
- `market1501`: the dataset authors' MATLAB code (Zheng et al., ICCV 2015, compute_AP.m),
  which integrates precision over recall with the trapezoid rule: at each true match,
  ap += (precision just before it + precision at it) / 2 * (1 / true matches).

Ties: the gallery is ranked by a stable sort of descending similarity, so of two items
with the same score the one listed first in the gallery ranks first; a distractor listed
before a true match of equal score wins the tie. Neither reference breaks ties in the
query's favour, and scores from float32 embeddings rarely tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

# Market-1501's person ids that name no one: junk crops, and distractors (not in the query
# set; in the gallery, negatives for every query).
JUNK, DISTRACTOR = -1, 0

ApMode = Literal["torchreid", "market1501"]
AP_MODES: tuple[ApMode, ...] = ("torchreid", "market1501")


@dataclass(frozen=True)
class ReidScores:
    cmc: dict[int, float]  # rank -> fraction of queries matched within it
    mean_ap: float
    queries: int  # evaluated
    skipped: int  # no valid match in the gallery, or a query of junk or a distractor


def average_precision(positions: npt.NDArray[np.integer], mode: ApMode = "torchreid") -> float:
    """AP of one query from the 0-based ranks of its true matches (junk already removed)."""
    found = np.arange(1, len(positions) + 1, dtype=np.float64)  # matches up to each one
    at_match = found / (positions + 1)
    if mode == "torchreid":
        return float(np.mean(at_match))
    if mode == "market1501":
        # Precision at the rank just before each match: (found - 1) / position, and 1 before
        # the first rank, as compute_AP.m starts with old_precision = 1.
        before = np.where(positions > 0, (found - 1) / np.maximum(positions, 1), 1.0)
        return float(np.sum((before + at_match) / 2) / len(positions))
    raise ValueError(f"ap_mode must be one of {', '.join(AP_MODES)}, not {mode!r}")


def evaluate(
    similarity: npt.NDArray[np.floating],
    query_ids: npt.NDArray[np.integer],
    query_cams: npt.NDArray[np.integer],
    gallery_ids: npt.NDArray[np.integer],
    gallery_cams: npt.NDArray[np.integer],
    ranks: tuple[int, ...] = (1, 5, 10),
    ap_mode: ApMode = "torchreid",
) -> ReidScores:
    """`similarity` is (queries, gallery), higher is more alike."""
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode must be one of {', '.join(AP_MODES)}, not {ap_mode!r}")
    hits = np.zeros(max(ranks), dtype=np.float64)
    precisions: list[float] = []
    skipped = 0
    for row, person, camera in zip(similarity, query_ids, query_cams, strict=True):
        if person in (JUNK, DISTRACTOR):
            skipped += 1
            continue
        order = np.argsort(-row, kind="stable")  # ties: gallery order (module docstring)
        same_view = (gallery_ids[order] == person) & (gallery_cams[order] == camera)
        junk = gallery_ids[order] == JUNK
        keep = ~(same_view | junk)
        matches = gallery_ids[order][keep] == person
        if not matches.any():
            skipped += 1
            continue
        first = int(np.argmax(matches))
        if first < len(hits):
            hits[first:] += 1
        precisions.append(average_precision(np.flatnonzero(matches), ap_mode))
    evaluated = len(precisions)
    cmc = {k: float(hits[k - 1] / evaluated) if evaluated else 0.0 for k in ranks}
    return ReidScores(cmc, float(np.mean(precisions)) if evaluated else 0.0, evaluated, skipped)


def scorable_queries(
    query_ids: npt.NDArray[np.integer],
    query_cams: npt.NDArray[np.integer],
    gallery_ids: npt.NDArray[np.integer],
    gallery_cams: npt.NDArray[np.integer],
) -> int:
    """How many queries evaluate() will score, from the labels alone: those whose person
    (not junk, not a distractor) the gallery holds on another camera."""
    return sum(
        1
        for person, camera in zip(query_ids, query_cams, strict=True)
        if person not in (JUNK, DISTRACTOR)
        and bool(np.any((gallery_ids == person) & (gallery_cams != camera)))
    )
