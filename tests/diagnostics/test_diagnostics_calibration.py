"""ECE, MCE, the per-bin statistics and the report, against hand arithmetic and against
synthetic data that is calibrated by construction."""

import json
import math

import numpy as np
import pytest
import torch

from pyro_bqn.diagnostics import (
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
)

# Seven samples, three classes, all entries multiples of 1/8 so the binning and the bin
# sums are exact in float32 and float64. With M = 4 the bins are
# I1 = [0, 1/4], I2 = (1/4, 1/2], I3 = (1/2, 3/4], I4 = (3/4, 1] (right edges included):
#
#   row  probs              conf  bin  argmax  y  correct
#   a    (1/2, 1/4, 1/4)    1/2   I2   0       0  1        <- on the edge 1/2: I2, not I3
#   b    (3/8, 3/8, 1/4)    3/8   I2   0       1  0        <- tie: argmax takes index 0
#   c    (3/4, 1/8, 1/8)    3/4   I3   0       0  1        <- on the edge 3/4: I3, not I4
#   d    (5/8, 3/8, 0)      5/8   I3   0       1  0
#   e    (5/8, 1/4, 1/8)    5/8   I3   0       0  1
#   f    (7/8, 1/8, 0)      7/8   I4   0       0  1
#   g    (1, 0, 0)          1     I4   0       1  0
#
#   I1: empty
#   I2: n = 2, acc = 1/2, conf = (1/2 + 3/8)/2 = 7/16,         |acc - conf| = 1/16
#   I3: n = 3, acc = 2/3, conf = (3/4 + 5/8 + 5/8)/3 = 2/3,   |acc - conf| = 0
#   I4: n = 2, acc = 1/2, conf = (7/8 + 1)/2 = 15/16,         |acc - conf| = 7/16
#
#   ECE = (2/7)(1/16) + (3/7)(0) + (2/7)(7/16) = (1/8 + 7/8)/7 = 1/7
#   MCE = max(1/16, 0, 7/16) = 7/16
# (Left-closed bins [a, b) would move a to I3 and c to I4 and give ECE = 5/28.)
HAND_PROBS = [
    [1 / 2, 1 / 4, 1 / 4],
    [3 / 8, 3 / 8, 1 / 4],
    [3 / 4, 1 / 8, 1 / 8],
    [5 / 8, 3 / 8, 0],
    [5 / 8, 1 / 4, 1 / 8],
    [7 / 8, 1 / 8, 0],
    [1, 0, 0],
]
HAND_LABELS = [0, 1, 0, 1, 0, 0, 1]

# The only rounding left is the final division by N = 7 (and, for MCE, none at all).
EXACT = {torch.float64: 1e-15, torch.float32: 1e-7}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_computed_ece_and_mce(dtype):
    probs = torch.tensor(HAND_PROBS, dtype=dtype)
    y = torch.tensor(HAND_LABELS)
    ece = expected_calibration_error(probs, y, num_bins=4)
    mce = maximum_calibration_error(probs, y, num_bins=4)
    assert ece.dtype == dtype
    torch.testing.assert_close(ece, torch.tensor(1 / 7, dtype=dtype), rtol=0, atol=EXACT[dtype])
    assert mce.item() == 7 / 16


def test_hand_computed_bins():
    probs = torch.tensor(HAND_PROBS, dtype=torch.float64)
    bins = calibration_bins(probs, torch.tensor(HAND_LABELS), num_bins=4)
    assert bins.edges.tolist() == [0, 1 / 4, 1 / 2, 3 / 4, 1]
    assert bins.counts.tolist() == [0, 2, 3, 2]
    assert math.isnan(bins.confidence[0]) and math.isnan(bins.accuracy[0])
    torch.testing.assert_close(bins.confidence[1:], torch.tensor([7 / 16, 2 / 3, 15 / 16]).double())
    torch.testing.assert_close(bins.accuracy[1:], torch.tensor([1 / 2, 2 / 3, 1 / 2]).double())


def test_single_bin_compares_mean_confidence_with_accuracy():
    # With M = 1, ECE = MCE = |accuracy - mean confidence|
    #   = |4/7 - (4/8 + 3/8 + 6/8 + 5/8 + 5/8 + 7/8 + 8/8)/7| = |32/56 - 38/56| = 3/28.
    probs, y = torch.tensor(HAND_PROBS, dtype=torch.float64), torch.tensor(HAND_LABELS)
    assert expected_calibration_error(probs, y, num_bins=1).item() == pytest.approx(3 / 28)
    assert maximum_calibration_error(probs, y, num_bins=1).item() == pytest.approx(3 / 28)


def test_numpy_inputs_match_torch_inputs():
    probs, y = np.array(HAND_PROBS), np.array(HAND_LABELS)
    assert expected_calibration_error(probs, y, 4).item() == pytest.approx(1 / 7)
    assert calibration_report(probs, y, 4) == calibration_report(
        torch.tensor(HAND_PROBS, dtype=torch.float64), torch.tensor(HAND_LABELS), 4
    )


def test_calibrated_synthetic_data_has_small_ece():
    # Labels drawn from the predicted probabilities: given the probabilities (and so the
    # bins), correct_i ~ Bernoulli(c_i) independently. Hoeffding in each bin with a union
    # bound over the M bins gives, with probability >= 1 - delta,
    #   ECE <= Σ_m (n_m/N) sqrt(log(2M/delta) / (2 n_m)) <= sqrt(log(2M/delta) / 2) sqrt(M/N)
    # (the last step by Cauchy-Schwarz on Σ sqrt(n_m)).
    n, num_classes, num_bins, delta = 100_000, 4, 15, 1e-6
    generator = torch.Generator().manual_seed(0)
    logits = 1.5 * torch.randn(n, num_classes, generator=generator, dtype=torch.float64)
    probs = logits.softmax(-1)
    y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tolerance = math.sqrt(math.log(2 * num_bins / delta) / 2) * math.sqrt(num_bins / n)

    assert expected_calibration_error(probs, y, num_bins).item() < tolerance
    # The tolerance has teeth: the same labels against over-confident predictions fail it.
    overconfident = (2 * logits).softmax(-1)
    assert expected_calibration_error(overconfident, y, num_bins).item() > 3 * tolerance


def test_perfectly_confident_and_right_is_zero_error():
    probs = torch.eye(3).repeat(4, 1)
    y = torch.arange(3).repeat(4)
    assert expected_calibration_error(probs, y).item() == 0
    assert maximum_calibration_error(probs, y).item() == 0


def test_report_holds_plain_floats_consistent_with_the_functions():
    probs = torch.tensor(HAND_PROBS, dtype=torch.float64)
    y = torch.tensor(HAND_LABELS)
    report = calibration_report(probs, y, num_bins=4)
    assert set(report) == {"nll", "accuracy", "error", "ece", "mce", "brier"}
    assert all(type(value) is float for value in report.values())
    assert json.loads(json.dumps(report)) == report
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["error"] == pytest.approx(3 / 7)
    assert report["ece"] == pytest.approx(1 / 7)
    assert report["mce"] == 7 / 16
