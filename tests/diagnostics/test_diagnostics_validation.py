"""Every metric refuses malformed input with a ValueError naming the argument."""

import numpy as np
import pytest
import torch

from pyro_bqn.diagnostics import (
    accuracy,
    brier_score,
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    mutual_information,
    nll,
    predictive_entropy,
    reliability_diagram,
)

LABELLED = [
    accuracy,
    brier_score,
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    nll,
    reliability_diagram,
]
BINNED = [
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_diagram,
]

PROBS = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
Y = torch.tensor([1, 0, 1])


@pytest.mark.parametrize("metric", LABELLED)
def test_shape_mismatch_between_probs_and_y(metric):
    with pytest.raises(ValueError, match=r"probs and y disagree"):
        metric(PROBS, Y[:2])


@pytest.mark.parametrize("metric", LABELLED)
@pytest.mark.parametrize(
    "probs",
    [
        torch.tensor([[2.0, -1.0], [0.3, 0.3], [0.1, 0.2]]),  # logits
        torch.tensor([[0.2, 0.7], [0.6, 0.4], [0.5, 0.5]]),  # a row summing to 0.9
        torch.tensor([[1.5, -0.5], [0.6, 0.4], [0.5, 0.5]]),  # sums to one, not in [0, 1]
        torch.tensor([[float("nan"), 1.0], [0.6, 0.4], [0.5, 0.5]]),
    ],
)
def test_probs_must_be_probability_vectors(metric, probs):
    with pytest.raises(ValueError, match="probs"):
        metric(probs, Y)


@pytest.mark.parametrize("metric", LABELLED)
@pytest.mark.parametrize("probs", [PROBS[:, 0], PROBS.unsqueeze(0), PROBS[:, :1]])
def test_probs_must_be_n_by_c_with_two_classes(metric, probs):
    with pytest.raises(ValueError, match="probs"):
        metric(probs, Y)


@pytest.mark.parametrize("metric", LABELLED)
@pytest.mark.parametrize(
    "y",
    [
        torch.tensor([1.0, 0.0, 1.0]),  # floating labels
        torch.tensor([1, 0, 2]),  # label out of range for C = 2
        torch.tensor([1, 0, -1]),
        torch.tensor([[1, 0, 1]]),  # wrong shape
    ],
)
def test_labels_must_be_integer_classes(metric, y):
    with pytest.raises(ValueError, match=r"\by\b"):
        metric(PROBS, y)


@pytest.mark.parametrize("metric", BINNED)
@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True])
def test_num_bins_must_be_a_positive_integer(metric, num_bins):
    with pytest.raises(ValueError, match="num_bins"):
        metric(PROBS, Y, num_bins=num_bins)


def test_num_bins_accepts_numpy_integers():
    assert calibration_bins(PROBS, Y, num_bins=np.int64(3)).counts.shape == (3,)


def test_integer_one_hot_probs_are_accepted():
    assert accuracy(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1, 0])).item() == 1.0


def test_entropy_and_mutual_information_validate_their_input():
    with pytest.raises(ValueError, match="probs"):
        predictive_entropy(torch.tensor([[3.0, 1.0]]))
    with pytest.raises(ValueError, match=r"sampled_probs must have shape \(S, N, C\)"):
        mutual_information(PROBS)  # (N, C) would otherwise read as N samples
    with pytest.raises(ValueError, match="sampled_probs"):
        mutual_information(torch.ones(2, 3, 2))
