"""The Market-1501 metric on a case small enough to compute by hand."""

from __future__ import annotations

import numpy as np
import pytest

from app.reid.metrics import evaluate, scorable_queries


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


def test_market1501_ap_mode_averages_neighbouring_precisions_by_hand() -> None:
    # The hand case above under the MATLAB definition (precision before a match + at it) / 2:
    # query 0: matches at kept ranks 3 and 4 -> (0/2 + 1/3)/2/2 + (1/3 + 2/4)/2/2 = 7/24
    # query 1: match at kept rank 2 -> (0/1 + 1/2)/2 = 1/4
    gallery_ids = np.array([1, 1, 2, -1, 0, 1])
    gallery_cams = np.array([1, 2, 2, 3, 3, 3])
    similarity = np.array([[0.99, 0.5, 0.8, 0.95, 0.7, 0.6], [0.1, 0.2, 0.3, 0.9, 0.95, 0.05]])
    args = (similarity, np.array([1, 2]), np.array([1, 1]), gallery_ids, gallery_cams)
    assert evaluate(*args, ap_mode="market1501").mean_ap == pytest.approx((7 / 24 + 1 / 4) / 2)
    assert evaluate(*args).mean_ap == pytest.approx((5 / 12 + 1 / 2) / 2)  # torchreid's


def _compute_ap_m(good: set[int], junk: set[int], index: list[int]) -> float:
    """A line-by-line transcription of the Market-1501 authors' compute_AP.m."""
    old_recall, old_precision, ap, intersect, j, good_now = 0.0, 1.0, 0.0, 0, 0, 0
    for item in index:
        flag = item in good
        good_now += flag
        if item in junk:
            continue
        intersect += flag
        recall = intersect / len(good)
        precision = intersect / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        j += 1
        if good_now == len(good):
            break
    return ap


def test_market1501_mode_equals_the_authors_matlab_loop_on_random_cases() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        gallery_ids = rng.integers(-1, 6, size=40)
        gallery_cams = rng.integers(1, 4, size=40)
        query_ids = rng.integers(1, 6, size=5)
        query_cams = rng.integers(1, 4, size=5)
        similarity = rng.normal(size=(5, 40))  # continuous: no ties
        expected = []
        for row, person, camera in zip(similarity, query_ids, query_cams, strict=True):
            index = [int(i) for i in np.argsort(-row)]
            good = {i for i in index if gallery_ids[i] == person and gallery_cams[i] != camera}
            junk = {i for i in index if gallery_ids[i] == -1 or
                    (gallery_ids[i] == person and gallery_cams[i] == camera)}  # fmt: skip
            if good:
                expected.append(_compute_ap_m(good, junk, index))
        scores = evaluate(
            similarity, query_ids, query_cams, gallery_ids, gallery_cams, ap_mode="market1501"
        )
        assert scores.queries == len(expected)
        assert scores.mean_ap == pytest.approx(float(np.mean(expected)) if expected else 0.0)


def test_a_tie_goes_to_the_item_listed_first_in_the_gallery() -> None:
    # A distractor (id 0) and the true match score the same: whichever comes first wins.
    tied, person, camera, cameras = (
        np.array([[0.5, 0.5]]),
        np.array([1]),
        np.array([1]),
        np.array([2, 2]),
    )
    distractor_first = evaluate(tied, person, camera, np.array([0, 1]), cameras)
    match_first = evaluate(tied, person, camera, np.array([1, 0]), cameras)
    assert (distractor_first.cmc[1], distractor_first.mean_ap) == (0.0, 0.5)
    assert (match_first.cmc[1], match_first.mean_ap) == (1.0, 1.0)


def test_a_query_of_a_distractor_or_junk_is_skipped_not_scored() -> None:
    """Every distractor is person 0: a distractor query used to find the others as its
    matches (here a perfect score for a crop that names no one)."""
    gallery_ids, gallery_cams = np.array([0, 0, 1, -1]), np.array([2, 2, 2, 2])
    query_ids, query_cams = np.array([0, -1, 1]), np.array([1, 1, 1])
    similarity = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.0, 0.0, 0.9], [0.1, 0.2, 0.9, 0.0]])
    scores = evaluate(similarity, query_ids, query_cams, gallery_ids, gallery_cams)
    assert (scores.queries, scores.skipped, scores.mean_ap) == (1, 2, 1.0)
    assert scorable_queries(query_ids, query_cams, gallery_ids, gallery_cams) == 1


def test_an_unknown_ap_mode_is_refused() -> None:
    ids = np.array([1])
    with pytest.raises(ValueError, match="ap_mode"):
        evaluate(np.eye(1), ids, ids, ids, ids + 1, ap_mode="voc")  # type: ignore[arg-type]
