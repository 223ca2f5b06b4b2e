"""ECE, error AUROC and Spearman on hand-computed cases, cross-checked against MONAI/scipy."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from scipy.stats import spearmanr

from medflow.uncertainty.calibration import (
    error_auroc,
    expected_calibration_error,
    reliability,
    spearman,
)


def test_ece_by_hand():
    # bin [0.9, 1.0): 4 pixels, confidence 0.9, 3 correct -> gap 0.15, weight 4/6
    # bin [0.6, 0.7): 2 pixels, confidence 0.6, 1 correct -> gap 0.10, weight 2/6
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(
        4 / 6 * 0.15 + 2 / 6 * 0.1
    )
    rel = reliability(conf, correct, n_bins=10)
    assert rel.count.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 0, 4]
    assert np.isnan(rel.accuracy[0]) and rel.accuracy[9] == pytest.approx(0.75)


def test_ece_of_calibrated_and_of_overconfident_pixels():
    conf = np.array([0.75] * 4 + [1.0] * 3)  # 1.0 falls into the last bin
    correct = np.array([1, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)
    wrong = np.zeros(7, dtype=bool)
    assert expected_calibration_error(conf, wrong) == pytest.approx((4 * 0.75 + 3 * 1.0) / 7)


def test_ece_refuses_bad_input():
    with pytest.raises(ValueError, match=r"confidence must lie in \[0, 1\]"):
        expected_calibration_error(np.array([1.2]), np.array([True]))
    with pytest.raises(ValueError, match="confidence has 2 values but correct has 1"):
        expected_calibration_error(np.array([0.5, 0.5]), np.array([True]))


def test_error_auroc_by_hand():
    # errors score 0.35 and 0.8, correct pixels 0.1 and 0.4: 3 of 4 pairs ranked right
    assert error_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert error_auroc([0.0, 0.1, 0.9], [0, 0, 1]) == 1.0
    assert error_auroc([0.9, 0.1, 0.0], [0, 0, 1]) == 0.0
    assert error_auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert math.isnan(error_auroc([0.1, 0.2], [0, 0]))  # no errors: undefined
    assert math.isnan(error_auroc([0.1, 0.2], [1, 1]))


def test_error_auroc_agrees_with_monai():
    rng = np.random.default_rng(0)
    error = rng.random(500) < 0.2
    score = np.round(rng.random(500) + 0.5 * error, 2)  # rounded: ties on purpose
    ours = error_auroc(score, error)
    theirs = compute_roc_auc(torch.tensor(score), torch.tensor(error.astype(np.float32)))
    assert 0.6 < ours < 1.0
    assert ours == pytest.approx(float(theirs), abs=1e-7)  # MONAI sums in float32


def test_spearman_agrees_with_scipy():
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    y = np.array([0.8, 0.1, 0.7, 0.05, 0.5])
    assert spearman(x, y) == pytest.approx(-1.0)
    z = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    assert spearman(x, z) == pytest.approx(spearmanr(x, z).statistic)
    assert math.isnan(spearman([1, 2], [3, 4]))
    assert math.isnan(spearman([1, 1, 1], [3, 4, 5]))
