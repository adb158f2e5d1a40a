"""Each statistic against values worked out by hand or by simulation."""
import numpy as np
import pytest

from benchmark import metrics, stats


def test_mean_ci_is_the_student_t_interval():
    mean, low, high = stats.mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * np.sqrt(2.5) / np.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert mean == 3 and low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    assert np.isnan(stats.mean_ci([0.7])[1])  # one fold: no interval
    assert stats.mean_ci([0.8, 0.8, 0.8])[1:] == pytest.approx((0.8, 0.8))
    assert [metrics.score_range(k) for k in ("val_accuracy", "val_recall_glioma", "val_loss", "val_support_no")] \
        == [(0.0, 1.0), (0.0, 1.0), (0.0, float("inf")), None]
    wide = stats.mean_ci([0.979, 0.962])  # two folds: t = 12.7
    assert wide[2] > 1 and stats.mean_ci([0.979, 0.962], bounds=(0, 1)) == pytest.approx((wide[0], wide[1], 1.0))


def test_row_wise_metrics_equal_scikit_learn_on_every_resample():
    from sklearn.metrics import accuracy_score, f1_score
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 4, (50, 12)), rng.integers(0, 4, (50, 12))
    y_true[0], y_pred[0] = 1, 1  # one class only in a row
    y_pred[1] = 3  # a class never predicted, one never true
    for row, (y, p) in enumerate(zip(y_true, y_pred)):
        assert stats.accuracy(y_true, y_pred)[row] == pytest.approx(accuracy_score(y, p))
        assert stats.macro_f1(y_true, y_pred)[row] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert stats.macro_f1(y_true[2], y_pred[2]) == pytest.approx(f1_score(y_true[2], y_pred[2], average="macro",
                                                                         zero_division=0))


def test_paired_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
    """A right with probability 0.80, B with 0.70, independently: the true accuracy difference is 0.10."""
    rng = np.random.default_rng(0)
    covered, trials, n = 0, 200, 300
    for _ in range(trials):
        truth = np.zeros(n, int)
        pred_a = np.where(rng.random(n) < 0.80, 0, 1)
        pred_b = np.where(rng.random(n) < 0.70, 0, 1)
        diff, low, high = stats.paired_bootstrap(truth, pred_a, pred_b, stats.accuracy, resamples=400,
                                                 seed=int(rng.integers(1 << 30)))
        assert low <= diff <= high
        covered += low <= 0.10 <= high
    assert 0.89 <= covered / trials <= 0.99


def test_paired_bootstrap_interval_shrinks_when_models_agree():
    """The same errors on most images cancel: pairing makes the interval far narrower than the spread of either."""
    rng = np.random.default_rng(1)
    truth = np.zeros(400, int)
    pred_a = np.where(rng.random(400) < 0.75, 0, 1)
    pred_b = pred_a.copy()
    pred_b[:8] = 1 - pred_b[:8]  # differ on 8 images only
    _, low, high = stats.paired_bootstrap(truth, pred_a, pred_b, stats.accuracy, resamples=1000)
    assert high - low < 0.03


@pytest.mark.parametrize("only_a, only_b, p", [
    (1, 9, 0.021484375),   # 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
    (0, 5, 0.0625),        # 2 / 2^5
    (4, 4, 1.0),
    (0, 0, 1.0),
    (3, 12, 2 * (1 + 15 + 105 + 455) / 2 ** 15),
])
def test_mcnemar_exact_against_hand_computed_tables(only_a, only_b, p):
    both = 20
    correct_a = np.array([True] * both + [True] * only_a + [False] * only_b + [False] * 7)
    correct_b = np.array([True] * both + [False] * only_a + [True] * only_b + [False] * 7)
    assert stats.mcnemar(correct_a, correct_b) == (only_a, only_b, pytest.approx(p))


def test_expected_calibration_error_on_a_constructed_example():
    # 5 images at confidence 0.7, all right (gap 0.3); 5 at 0.95, 2 right (gap 0.55): ECE = 0.5*0.3 + 0.5*0.55
    probabilities = np.array([[0.7, 0.3]] * 5 + [[0.05, 0.95]] * 5)
    truth = np.array([0] * 5 + [1, 1, 0, 0, 0])
    assert stats.expected_calibration_error(truth, probabilities, bins=10) == pytest.approx(0.425)
    table = stats.reliability(truth, probabilities, bins=10)
    assert table["count"][6] == 5 and table["count"][9] == 5 and sum(table["count"]) == 10
    assert table["accuracy"][9] == pytest.approx(0.4) and table["confidence"][6] == pytest.approx(0.7)


def test_perfectly_calibrated_predictions_have_zero_ece():
    probabilities = np.array([[0.25, 0.75]] * 8)
    truth = np.array([1, 1, 1, 0, 1, 1, 1, 0])  # 6 of 8 = 0.75
    assert stats.expected_calibration_error(truth, probabilities) == pytest.approx(0.0)


def test_threshold_reaches_the_target_sensitivity_at_the_least_cost():
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
    positive = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.3, 0.1])
    assert stats.threshold_for_sensitivity(truth, positive, 0.8) == 0.6
    assert stats.sensitivity_specificity(truth, positive, 0.6) == (0.8, 0.75)
    threshold = stats.threshold_for_sensitivity(truth, positive, 0.95)
    assert threshold == 0.2 and stats.sensitivity_specificity(truth, positive, threshold) == (1.0, 0.25)
