import pickle

import pytest
import torch
import torch.nn.functional as F

from pyro_bqn.moments import MomentRuleError, Moments, SiteMoments, as_moments, split_moments


def test_moments_refuse_torch_operations_with_a_hint():
    m = Moments(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(MomentRuleError, match=r"relu.*pyro_bqn.nn.Sign"):
        torch.relu(m)
    with pytest.raises(MomentRuleError, match="linear"):
        torch.nn.Linear(3, 2)(m)


def test_site_moments_carry_shape_but_refuse_arithmetic():
    mean, var = torch.randn(3, 2, requires_grad=True), torch.rand(3, 2)
    w = SiteMoments(mean, var)
    assert w.shape == (3, 2) and w.dim() == 2 and w.dtype == mean.dtype
    assert split_moments(w)[0] is mean and split_moments(w)[1] is var
    with pytest.raises(MomentRuleError, match="SiteMoments.*linear"):
        F.linear(torch.randn(4, 2), w)
    with pytest.raises(MomentRuleError):
        w + 1
    with pytest.raises(MomentRuleError, match="cannot be pickled"):
        pickle.dumps(w)


def test_moment_helpers():
    x = torch.randn(4)
    assert split_moments(x) == (x, None)
    m = as_moments(x)
    assert torch.equal(m.var, torch.zeros(4))
    pair = Moments(torch.arange(6.0).reshape(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(pair.second_moment, pair.var + pair.mean.square())
    assert pair.reshape(3, 2).shape == (3, 2)
    assert pair[1].shape == (3,)
    assert Moments(torch.zeros(2, 3), torch.ones(())).var.shape == (2, 3)
    with pytest.raises(TypeError, match="two tensors"):
        Moments(torch.zeros(2), 1.0)
