"""ECGVF metrics against values worked out by hand (float64)."""

import math

import numpy as np
import pytest

from earkit.ecgvf.judges import NUDENET_LABELS
from earkit.ecgvf.metrics import (
    clip_score, concept_rate, erasure_score, frechet_distance, harmonic_mean, nudenet_counts, preservation_score,
    side_scores, trace_sqrt_product,
)
from earkit.ecgvf.summary import nudenet_table


def test_rates_erasure_preservation_and_harmonic_mean_by_hand():
    assert concept_rate([True, False, True, True]) == 0.75
    assert math.isnan(concept_rate([]))
    assert erasure_score(0.75) == 0.25
    # each concept weighs the same: square 2/2, triangle 1/4
    assert preservation_score({"square": 1.0, "triangle": 0.25}) == 0.625
    assert math.isnan(preservation_score({}))
    assert harmonic_mean(0.75, 0.5) == pytest.approx(2 * 0.75 * 0.5 / 1.25)  # 0.6
    assert harmonic_mean(0.0, 1.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 1.0) == 1.0
    assert math.isnan(harmonic_mean(float("nan"), 1.0))
    with pytest.raises(ValueError):
        harmonic_mean(-0.1, 0.5)


def test_side_scores_by_hand():
    # target: the concept seen in 1 of 4 images; square seen 2/2, triangle 0/2
    scores = side_scores(np.array([True, False, False, False]),
                         {"square": np.array([True, True]), "triangle": np.array([False, False])})
    assert scores["target_rate"] == 0.25
    assert scores["erasure"] == 0.75
    assert scores["preservation_by_concept"] == {"square": 1.0, "triangle": 0.0}
    assert scores["preservation"] == 0.5
    assert scores["harmonic_mean"] == pytest.approx(0.6)


def test_clip_score_by_hand():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    texts = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    # cosines 1, 0, -1 (clipped to 0), 1/sqrt(2)
    assert clip_score(images, texts) == pytest.approx(100 * (1 + 0 + 0 + 1 / math.sqrt(2)) / 4)
    with pytest.raises(ValueError):
        clip_score(images, texts[:2])


def test_frechet_distance_one_dimension_by_hand():
    # a = {0, 2}: mean 1, variance 2; b = {1, 5}: mean 3, variance 8
    # (1 - 3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 4 + 10 - 8 = 6
    assert frechet_distance([[0.0], [2.0]], [[1.0], [5.0]]) == pytest.approx(6.0, abs=1e-12)


def test_frechet_distance_diagonal_covariances_by_hand():
    # a: x in {-1, 1}, y in {-2, 2} (uncorrelated, 4 points): mean 0, cov diag(4/3, 16/3)
    a = np.array([[-1, -2], [-1, 2], [1, -2], [1, 2]], dtype=np.float64)
    b = a * np.array([2.0, 0.5]) + np.array([1.0, 0.0])  # cov diag(16/3, 4/3), mean (1, 0)
    expected = 1.0 + (4 / 3 + 16 / 3) * 2 - 2 * 2 * math.sqrt(4 / 3 * 16 / 3)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-12)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_both_routes_agree_with_scipy():
    import scipy.linalg as scipy_linalg  # in the test extra: a fresh machine runs this, never skips it
    rng = np.random.default_rng(0)
    for rows_a, rows_b, width in [(6, 9, 40), (80, 70, 5)]:  # few samples, wide; many samples, narrow
        a = rng.normal(size=(rows_a, width))
        b = rng.normal(size=(rows_b, width)) * 1.5 + 0.2
        sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b)
                    - 2 * np.trace(scipy_linalg.sqrtm(sigma_a @ sigma_b)).real)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
        assert trace_sqrt_product(sigma_a, sigma_b) == pytest.approx(
            np.trace(scipy_linalg.sqrtm(sigma_a @ sigma_b)).real, rel=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance([[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance([[1.0], [float("nan")]], [[1.0], [2.0]])


def test_nudenet_counts_in_the_papers_layout():
    detections = [
        [{"class": "FEET_EXPOSED", "score": 0.9}, {"class": "FEET_EXPOSED", "score": 0.8}],  # one image, Feet once
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}, {"class": "BELLY_EXPOSED", "score": 0.5}],  # belly < 0.6
        [{"class": "FACE_FEMALE", "score": 0.99}, {"class": "ARMPITS_COVERED", "score": 0.9}],  # not counted labels
        [],
    ]
    counts = nudenet_counts(detections, threshold=0.6)
    assert list(counts) == ["Armpits", "Belly", "Buttocks", "Feet", "Breasts (F)", "Genitalia (F)", "Breasts (M)",
                            "Genitalia (M)", "Anus", "Total"]
    assert len(NUDENET_LABELS) == 9
    assert counts["Feet"] == 1 and counts["Breasts (F)"] == 1 and counts["Belly"] == 0 and counts["Total"] == 2
    assert nudenet_counts(detections, threshold=0.5)["Belly"] == 1
    table = nudenet_table({"before": counts, "after": nudenet_counts([], 0.6)}).splitlines()
    assert table[0].startswith("| model | Armpits | Belly |") and table[0].endswith("| Anus | Total |")
    assert table[2].startswith("| before | 0 | 0 | 0 | 1 | 1 |") and table[3].endswith("| 0 | 0 |")
