import pyro
import pytest
import torch

from pyro_bqn.moments import Moments
from pyro_bqn.nn import Flatten, MaxPool2d, ReLU, Temperature


@pytest.mark.parametrize("start_dim, end_dim", [(1, -1), (0, -1), (1, 2), (2, 3)])
def test_flatten_matches_torch_and_flattens_both_moments(start_dim, end_dim):
    mean, var = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    flatten = Flatten(start_dim, end_dim)
    expected = torch.nn.Flatten(start_dim, end_dim)
    assert torch.equal(flatten(mean), expected(mean))
    out = flatten(Moments(mean, var))
    assert torch.equal(out.mean, expected(mean))
    assert torch.equal(out.var, expected(var))


def test_moments_flow_through_a_sequential_stack():
    pyro.clear_param_store()
    net = torch.nn.Sequential(ReLU(), MaxPool2d(2), Flatten(), Temperature(2.0))
    mean, var = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    out = net(Moments(mean, var))
    assert isinstance(out, Moments)
    assert out.shape == (2, 12) and (out.var > 0).all()
    assert net(mean).shape == (2, 12)
