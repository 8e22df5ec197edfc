"""Accuracy, NLL and Brier score against values worked out by hand."""

import math

import pytest
import torch

from pyro_bqn.diagnostics import NLL_FLOOR, accuracy, brier_score, nll


def test_known_values_two_samples():
    # Row 0 is certain and right, row 1 uniform over two classes:
    #   NLL   = (-log 1 - log 1/2) / 2 = log(2) / 2
    #   Brier = ((1-1)^2 + 0^2 + (1/2)^2 + (1/2 - 1)^2) / 2 = (0 + 1/2) / 2 = 1/4
    #   accuracy: row 0 right; row 1's tie goes to class 0, wrong against y = 1 -> 1/2
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    assert nll(probs, y).item() == pytest.approx(math.log(2) / 2)
    assert brier_score(probs, y).item() == 0.25
    assert accuracy(probs, y).item() == 0.5


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_uniform_prediction(num_classes):
    # NLL = log C; Brier = (1 - 1/C)^2 + (C - 1)/C^2 = 1 - 1/C, whatever the labels.
    probs = torch.full((5, num_classes), 1 / num_classes, dtype=torch.float64)
    y = torch.arange(5) % num_classes
    assert nll(probs, y).item() == pytest.approx(math.log(num_classes))
    assert brier_score(probs, y).item() == pytest.approx(1 - 1 / num_classes)


def test_confidently_wrong_costs_the_floor_and_the_maximum_brier():
    probs = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    assert nll(probs, y).item() == pytest.approx(-math.log(NLL_FLOOR))
    assert nll(probs, y, floor=1e-3).item() == pytest.approx(-math.log(1e-3))
    assert brier_score(probs, y).item() == 2.0


def test_nll_matches_cross_entropy_and_is_differentiable():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = nll(logits.softmax(-1), y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_nll_floor_must_be_a_probability():
    with pytest.raises(ValueError, match="floor"):
        nll(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), floor=0.0)
