"""Entropy and mutual information of known distributions; AUROC of separated and of
identically distributed scores."""

import math

import numpy as np
import pytest
import torch

from pyro_bqn.diagnostics import mutual_information, ood_auroc, predictive_entropy


def test_entropy_of_known_distributions():
    probs = torch.tensor(
        [
            [1 / 4, 1 / 4, 1 / 4, 1 / 4],  # uniform: log 4
            [1.0, 0.0, 0.0, 0.0],  # one-hot: 0 (0 log 0 = 0, not NaN)
            [1 / 2, 1 / 4, 1 / 4, 0.0],  # 1/2 log 2 + 2 (1/4 log 4) = 3/2 log 2
        ],
        dtype=torch.float64,
    )
    expected = torch.tensor([math.log(4), 0.0, 1.5 * math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(predictive_entropy(probs), expected)


def test_entropy_accepts_extra_leading_dimensions():
    probs = torch.full((3, 5, 2), 0.5)
    entropy = predictive_entropy(probs)
    assert entropy.shape == (3, 5)
    torch.testing.assert_close(entropy, torch.full((3, 5), math.log(2)))


def test_mutual_information_of_known_samples():
    # Sample-wise (S = 2) predictives for N = 3 inputs:
    #   input 0: (1, 0) and (0, 1) -> H[mean] = H(1/2, 1/2) = log 2, mean H = 0 -> log 2
    #   input 1: (1, 0) and (1/2, 1/2) -> H(3/4, 1/4) - (0 + log 2)/2
    #   input 2: (1/2, 1/2) twice -> log 2 - log 2 = 0: agreeing samples carry no
    #            epistemic uncertainty however uncertain each one is
    samples = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]],
            [[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]],
        ],
        dtype=torch.float64,
    )
    h_mixed = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = torch.tensor([math.log(2), h_mixed - math.log(2) / 2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(mutual_information(samples), expected)


def test_mutual_information_is_zero_when_all_samples_agree():
    probs = torch.randn(7, 5, generator=torch.Generator().manual_seed(2)).softmax(-1)
    mi = mutual_information(probs.expand(10, 7, 5))
    assert mi.shape == (7,)
    assert (mi >= 0).all()
    torch.testing.assert_close(mi, torch.zeros(7), rtol=0, atol=1e-6)


def test_auroc_of_separated_scores():
    score_in = torch.linspace(0, 1, 50)
    score_out = torch.linspace(2, 3, 30)
    assert ood_auroc(score_in, score_out) == 1.0
    assert ood_auroc(score_out, score_in) == 0.0
    assert ood_auroc(score_in.numpy(), score_out.numpy()) == 1.0


def test_auroc_of_identical_distributions_is_near_one_half():
    # Under identical continuous distributions the AUROC (the Mann-Whitney U / (n m)) has
    # mean 1/2 and variance (n + m + 1) / (12 n m); allow five standard deviations.
    n = m = 2000
    generator = torch.Generator().manual_seed(3)
    score_in = torch.randn(n, generator=generator)
    score_out = torch.randn(m, generator=generator)
    tolerance = 5 * math.sqrt((n + m + 1) / (12 * n * m))
    assert abs(ood_auroc(score_in, score_out) - 0.5) < tolerance


def test_auroc_counts_ties_as_one_half():
    assert ood_auroc(np.zeros(4), np.zeros(6)) == 0.5


@pytest.mark.parametrize(
    ("score_in", "score_out", "name"),
    [
        (torch.zeros(0), torch.ones(3), "score_in"),
        (torch.zeros(3), torch.ones(3, 2), "score_out"),
        (torch.tensor([0.0, float("nan")]), torch.ones(3), "score_in"),
    ],
)
def test_auroc_rejects_bad_scores(score_in, score_out, name):
    with pytest.raises(ValueError, match=name):
        ood_auroc(score_in, score_out)
