"""The Market-1501 metric on a case small enough to compute by hand."""

from __future__ import annotations

import numpy as np
import pytest

from app.reid.metrics import evaluate


def test_hand_computed_case_with_junk_distractors_and_same_camera_exclusion() -> None:
    # gallery:            0     1     2     3     4     5
    gallery_ids = np.array([1, 1, 2, -1, 0, 1])
    gallery_cams = np.array([1, 2, 2, 3, 3, 3])
    # query 0: person 1, camera 1 -> gallery 0 (same person, same camera) is excluded
    # query 1: person 2, camera 1
    # query 2: person 3, camera 2 -> no match anywhere: skipped
    query_ids = np.array([1, 2, 3])
    query_cams = np.array([1, 1, 2])
    similarity = np.array(
        [
            #  g0   g1   g2   g3   g4   g5
            [0.99, 0.5, 0.8, 0.95, 0.7, 0.6],
            [0.1, 0.2, 0.3, 0.9, 0.95, 0.05],
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        ]
    )
    scores = evaluate(similarity, query_ids, query_cams, gallery_ids, gallery_cams, (1, 2, 3, 5))
    # query 0 after removing g0 (same view) and g3 (junk): order g2(0.8) g4(0.7) g5(0.6) g1(0.5)
    #   true matches g5 at rank 3 and g1 at rank 4: AP = (1/3 + 2/4) / 2 = 5/12
    # query 1 after removing g3 (junk): order g4(0.95) g2(0.3) g1 g0 g5
    #   true match g2 at rank 2: AP = 1/2
    assert scores.queries == 2
    assert scores.skipped == 1
    assert scores.mean_ap == pytest.approx((5 / 12 + 1 / 2) / 2)
    assert scores.cmc == {1: 0.0, 2: 0.5, 3: 1.0, 5: 1.0}


def test_perfect_ranking_scores_one() -> None:
    ids = np.array([1, 2])
    scores = evaluate(np.eye(2), ids, np.array([1, 1]), ids, np.array([2, 2]))
    assert scores.mean_ap == 1.0
    assert scores.cmc[1] == 1.0
