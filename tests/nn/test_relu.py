import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn.moments import MomentRuleError, Moments
from pyro_bqn.nn import ReLU
from tests.mc import assert_mean_var_match

NUM_SAMPLES = 20_000


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_relu_moments_match_monte_carlo(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    var = 0.01 + 4.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
    # mu / s in [-2, 2] samples the positive part often enough (>= 2%) for normal-theory
    # standard errors; the far tail is tested against its asymptotic series below.
    ratio = 4.0 * torch.rand(shape, generator=gen, dtype=torch.float64) - 2.0
    mean = ratio * var.sqrt()
    out = ReLU()(Moments(mean, var))

    noise = torch.randn((NUM_SAMPLES, *shape), generator=gen, dtype=torch.float64)
    assert_mean_var_match(torch.relu(mean + var.sqrt() * noise), out.mean, out.var)


def test_relu_moments_match_the_closed_form_and_its_derivatives():
    mean = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([0.5, 1.0, 2.0, 0.1, 4.0], dtype=torch.float64, requires_grad=True)
    out = ReLU()(Moments(mean, var))
    std = var.detach().sqrt()
    a = mean.detach() / std
    cdf = 0.5 * torch.erfc(-a / math.sqrt(2))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    first = mean.detach() * cdf + std * pdf
    second = (mean.detach() ** 2 + var.detach()) * cdf + mean.detach() * std * pdf
    assert torch.allclose(out.mean, first, rtol=1e-12)
    assert torch.allclose(out.var, second - first**2, rtol=1e-10)
    # d E / d mu = Phi(a) and d E / d s^2 = phi(a) / (2 s): the guards leave gradients exact.
    grad_mean, grad_var = torch.autograd.grad(out.mean.sum(), (mean, var))
    assert torch.allclose(grad_mean, cdf, rtol=1e-12)
    assert torch.allclose(grad_var, pdf / (2 * std), rtol=1e-12)


@pytest.mark.parametrize("a", [-10.0, -20.0, -30.0])
def test_relu_far_negative_tail_follows_the_asymptotic_series(a):
    # For a -> -inf: E/s = phi(a)/a^2 (1 - 3/a^2 + 15/a^4 + ...) and
    # Var/s^2 = 2 phi(a)/|a|^3 (1 - 6/a^2 + 45/a^4 + ...); truncation error < 5e-4 here.
    std = 1.5
    mean = torch.tensor([a * std], dtype=torch.float64)
    out = ReLU()(Moments(mean, torch.tensor([std**2], dtype=torch.float64)))
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    expected_mean = std * pdf / a**2 * (1 - 3 / a**2 + 15 / a**4)
    expected_var = std**2 * 2 * pdf / abs(a) ** 3 * (1 - 6 / a**2 + 45 / a**4)
    assert out.mean.item() == pytest.approx(expected_mean, rel=2e-3)
    assert out.var.item() == pytest.approx(expected_var, rel=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("var_value", [0.0, 1e-30, 1e-8, 1.0])
def test_relu_is_stable_for_extreme_inputs(dtype, var_value):
    mean = torch.tensor([-50.0, -5.0, 0.0, 5.0, 50.0], dtype=dtype, requires_grad=True)
    var = torch.full((5,), var_value, dtype=dtype, requires_grad=True)
    out = ReLU()(Moments(mean, var))
    assert torch.isfinite(out.mean).all() and (out.var >= 0).all()
    (out.mean.sum() + out.var.sum()).backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()
    if var_value < 1e-6:
        # A (nearly) certain input: relu of the mean.
        assert torch.allclose(out.mean, torch.relu(mean), atol=1e-3)


def test_relu_tensor_mode_is_torch_relu():
    x = torch.randn(3, 5, requires_grad=True)
    y = ReLU()(x)
    assert torch.equal(y, torch.relu(x))
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


@pytest.mark.parametrize(
    "op", [torch.nn.ReLU(), torch.relu, torch.nn.functional.relu], ids=["ReLU", "relu", "F.relu"]
)
def test_plain_torch_relu_on_moments_names_the_replacement(op):
    moments = Moments(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(MomentRuleError, match=r"pyro_bqn\.nn\..*ReLU"):
        op(moments)
