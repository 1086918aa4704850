"""CMC and mAP under the Market-1501 protocol.

For each query, gallery items of the same person seen by the same camera are removed
(they are trivially easy), as are junk items (person id -1); distractors (id 0) stay as
negatives. A query whose person has no gallery item left is skipped. CMC rank-k is the
fraction of queries with a true match among their k best; AP is the mean of precision at
each true match's rank; mAP averages AP over queries. Same definitions as the reference
evaluation code published with the dataset (Zheng et al., ICCV 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ReidScores:
    cmc: dict[int, float]  # rank -> fraction of queries matched within it
    mean_ap: float
    queries: int  # evaluated
    skipped: int  # no valid match in the gallery


def evaluate(
    similarity: npt.NDArray[np.floating],
    query_ids: npt.NDArray[np.integer],
    query_cams: npt.NDArray[np.integer],
    gallery_ids: npt.NDArray[np.integer],
    gallery_cams: npt.NDArray[np.integer],
    ranks: tuple[int, ...] = (1, 5, 10),
) -> ReidScores:
    """`similarity` is (queries, gallery), higher is more alike."""
    hits = np.zeros(max(ranks), dtype=np.float64)
    precisions: list[float] = []
    skipped = 0
    for row, person, camera in zip(similarity, query_ids, query_cams, strict=True):
        order = np.argsort(-row, kind="stable")
        same_view = (gallery_ids[order] == person) & (gallery_cams[order] == camera)
        junk = gallery_ids[order] == -1
        keep = ~(same_view | junk)
        matches = gallery_ids[order][keep] == person
        if not matches.any():
            skipped += 1
            continue
        first = int(np.argmax(matches))
        if first < len(hits):
            hits[first:] += 1
        positions = np.flatnonzero(matches)  # 0-based ranks of the true matches
        precisions.append(float(np.mean((np.arange(len(positions)) + 1) / (positions + 1))))
    evaluated = len(precisions)
    cmc = {k: float(hits[k - 1] / evaluated) if evaluated else 0.0 for k in ranks}
    return ReidScores(cmc, float(np.mean(precisions)) if evaluated else 0.0, evaluated, skipped)
