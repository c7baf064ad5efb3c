"""OOD metrics against hand-computed cases, and the bootstrap typicality test."""

import numpy as np
import pytest

from glowtrain.ood_metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics, typicality_test


def test_metrics_of_a_small_interleaved_case_match_the_hand_computation():
    inliers, outliers = np.array([1.0, 3.0]), np.array([2.0, 4.0])
    # Pairs with the outlier higher: (2 > 1), (4 > 1), (4 > 3): 3 of 4.
    assert auroc(inliers, outliers) == 0.75
    # Descending 4(out) 3(in) 2(out) 1(in): recall 1/2 at precision 1, then 1 at precision 2/3.
    assert aupr_out(inliers, outliers) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # Ascending 1(in) 2(out) 3(in) 4(out): the same pattern for the inliers.
    assert aupr_in(inliers, outliers) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # 95% of 2 inliers needs both: threshold 3, and outlier 2 is accepted.
    assert fpr_at_tpr(inliers, outliers) == 0.5


def test_perfectly_separated_sets_score_one_and_the_reverse_direction_zero():
    inliers, outliers = np.arange(10.0), np.arange(10.0) + 100
    assert ood_metrics(inliers, outliers) == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95_tpr": 0.0}
    assert auroc(-inliers, -outliers) == 0.0
    assert fpr_at_tpr(-inliers, -outliers) == 1.0


def test_identical_sets_give_auroc_one_half():
    values = np.random.default_rng(0).normal(size=50)
    assert auroc(values, values.copy()) == 0.5
    a, b = np.random.default_rng(1).normal(size=(2, 4000))
    assert abs(auroc(a, b) - 0.5) < 0.03


def test_ties_count_half_in_auroc_and_enter_together_in_average_precision():
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auroc(np.array([0.0, 1.0]), np.array([1.0])) == 0.75  # one win, one tie
    assert aupr_out(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_fpr_threshold_is_the_smallest_inlier_score_accepting_95_percent():
    inliers = np.arange(1.0, 21.0)  # 19 of 20 accepted at threshold 19
    assert fpr_at_tpr(inliers, np.array([19.5, 20.0, 21.0])) == 0.0
    assert fpr_at_tpr(inliers, np.array([18.5, 19.0, 19.5])) == pytest.approx(2 / 3)
    assert fpr_at_tpr(inliers, np.array([0.0]), tpr=0.5) == 1.0


def test_typicality_test_statistic_and_p_value():
    reference = np.array([0.0, 1.0])
    far = typicality_test(np.array([3.0]), reference, n_bootstrap=99)
    assert far["statistic"] == 2.5 and far["entropy_bpd"] == 0.5
    assert far["p_value"] == 1 / 100  # no bootstrap batch is as far from the mean
    assert typicality_test(np.array([0.5]), reference, n_bootstrap=99)["p_value"] == 1.0


def test_typicality_test_accepts_a_batch_of_typical_images_and_rejects_a_shifted_one():
    rng = np.random.default_rng(0)
    reference = rng.normal(2.0, 0.3, size=2000)
    typical = rng.normal(2.0, 0.3, size=50)
    assert typicality_test(typical, reference, n_bootstrap=2000)["p_value"] > 0.05
    assert typicality_test(typical + 0.3, reference, n_bootstrap=2000)["p_value"] < 0.01


def test_typicality_test_draws_in_chunks_without_changing_the_answer():
    rng = np.random.default_rng(2)
    reference, batch = rng.normal(size=500), rng.normal(0.05, 1.0, size=40)
    whole = typicality_test(batch, reference, n_bootstrap=500)
    chunked = typicality_test(batch, reference, n_bootstrap=500, chunk_elements=40 * 7)
    assert whole == chunked


def test_a_nan_score_leaves_the_metrics_and_the_typicality_test_undefined_not_perfect():
    """Sorted, a NaN ranked as the most out-of-distribution in both directions: AUROC 1.0 and AUPR-out 0.833 here,
    and p = 1/(1 + draws) for a whole set of NaN."""
    inliers, outliers = np.array([1.0, 2.0, 3.0]), np.array([np.nan, 5.0, 6.0])
    for a, b in ((inliers, outliers), (-inliers, -outliers), (outliers, inliers)):
        assert ood_metrics(a, b) == dict.fromkeys(("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"))
    test = typicality_test(np.full(4, np.nan), np.arange(10.0), n_bootstrap=99)
    assert test["statistic"] is None and test["p_value"] is None and test["entropy_bpd"] == 4.5
    assert typicality_test(np.arange(4.0), np.r_[np.arange(9.0), np.nan], n_bootstrap=99)["p_value"] is None
    assert ood_metrics(inliers, np.array([np.inf, 5.0, 6.0]))["auroc"] == 1.0  # an infinite score still ranks


def test_infinite_scores_rank_and_tie_as_a_very_large_one_does():
    """np.diff of two infinities is NaN: tied infinite scores were not grouped, so the order of the sets mattered."""
    inliers, outliers = np.array([1.0, np.inf, 3.0]), np.array([np.inf, 5.0, np.inf])
    large = {name: np.where(np.isinf(values), 1e300, values) for name, values in (("in", inliers), ("out", outliers))}
    assert ood_metrics(inliers, outliers) == ood_metrics(large["in"], large["out"])
    assert ood_metrics(-inliers, -outliers) == ood_metrics(-large["in"], -large["out"])


def test_an_infinite_typical_set_entropy_leaves_the_test_undefined():
    """H = inf made every bootstrap statistic infinite too: an atypical set had p = 0.988."""
    reference = np.r_[np.full(9, 3.0), np.inf]
    test = typicality_test(np.full(10, 9.0), reference, n_bootstrap=999)
    assert test["p_value"] is None and test["statistic"] is None and test["entropy_bpd"] is None
    assert typicality_test(np.r_[np.full(9, 9.0), np.inf], np.full(10, 3.0), n_bootstrap=999)["p_value"] == 1 / 1000
