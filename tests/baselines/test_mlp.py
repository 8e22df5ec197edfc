import math

import pytest
import torch
from torch import nn

from pyro_bqn.baselines import MLP, LogitScale


def test_mlp_layout_and_shapes():
    model = MLP([12, 8, 6, 3], output_scale=0.5)
    assert list(dict(model.named_children())) == [
        "flatten",
        "fc1",
        "bn1",
        "act1",
        "fc2",
        "bn2",
        "act2",
        "out",
        "scale",
    ]
    assert model.fc1.bias is None and model.out.bias is not None
    assert model(torch.randn(5, 3, 4)).shape == (5, 3)  # inputs are flattened


def test_mlp_without_scale_has_no_scale_layer():
    model = MLP([4, 2])
    assert not hasattr(model, "scale")
    assert isinstance(model.out, nn.Linear)


@pytest.mark.parametrize("sizes", [[4], [4, 0, 2], [4, 2.0], [4, True]])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        MLP(sizes)


def test_logit_scale_learnable_and_fixed():
    learnable = LogitScale(0.25)
    fixed = LogitScale(0.25, learnable=False)
    x = torch.randn(3, 4)
    assert torch.allclose(learnable(x), 0.25 * x) and torch.allclose(fixed(x), 0.25 * x)
    assert [n for n, _ in learnable.named_parameters()] == ["log_scale"]
    assert list(fixed.parameters()) == [] and "log_scale" in dict(fixed.named_buffers())


@pytest.mark.parametrize("init", [0.0, -1.0, math.inf, math.nan])
def test_bad_output_scale(init):
    with pytest.raises(ValueError, match="output_scale"):
        LogitScale(init)
