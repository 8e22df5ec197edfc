import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn.nn.gaussian import gaussian_max, normal_cdf, normal_pdf, safe_std, variance_floor
from tests.mc import assert_mean_var_match

NUM_SAMPLES = 20_000


@pytest.mark.parametrize("z", [-37.0, -20.0, -5.0, -0.5, 0.0, 0.5, 5.0, 8.0])
def test_normal_cdf_and_pdf_keep_relative_precision_in_the_tails(z):
    t = torch.tensor(z, dtype=torch.float64)
    assert normal_cdf(t).item() == pytest.approx(0.5 * math.erfc(-z / math.sqrt(2)), rel=1e-12)
    expected_pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    assert normal_pdf(t).item() == pytest.approx(expected_pdf, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_std_floors_the_variance_with_a_finite_gradient(dtype):
    var = torch.tensor([0.0, 1e-300 if dtype == torch.float64 else 1e-40, 4.0], dtype=dtype)
    var.requires_grad_(True)
    std = safe_std(var)
    assert std[0].item() == pytest.approx(variance_floor(dtype) ** 0.5)
    assert std[2].item() == 2.0
    (1.0 / std).sum().backward()
    assert torch.isfinite(var.grad).all()


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 6),
    zero_var=st.sampled_from([None, 0, 1]),
    seed=st.integers(0, 2**16),
)
def test_gaussian_max_is_exact_for_two_gaussians(size, zero_var, seed):
    gen = torch.Generator().manual_seed(seed)
    var = 0.05 + 2.0 * torch.rand(2, size, generator=gen, dtype=torch.float64)
    if zero_var is not None:
        var[zero_var] = 0.0  # max with a constant, as in ReLU
    # |beta| <= 2 draws the losing branch often enough (>= 2%) for normal-theory standard
    # errors: with a constant input, a rarely won branch makes the output variance a heavy
    # tail that the sample fourth moment underestimates. Saturation is tested exactly below.
    beta = 4.0 * torch.rand(size, generator=gen, dtype=torch.float64) - 2.0
    mean1 = torch.randn(size, generator=gen, dtype=torch.float64)
    mean = torch.stack([mean1 + beta * var.sum(0).sqrt(), mean1])
    out_mean, out_var = gaussian_max(mean[0], var[0], mean[1], var[1])

    noise = torch.randn(NUM_SAMPLES, 2, size, generator=gen, dtype=torch.float64)
    samples = (mean + var.sqrt() * noise).max(dim=1).values
    assert_mean_var_match(samples, out_mean, out_var)


def test_gaussian_max_is_symmetric_and_saturates():
    mean0 = torch.tensor([0.3, 100.0, -100.0], dtype=torch.float64)
    var0 = torch.tensor([0.7, 2.0, 2.0], dtype=torch.float64)
    mean1 = torch.tensor([-1.2, 0.0, 0.0], dtype=torch.float64)
    var1 = torch.tensor([1.5, 3.0, 3.0], dtype=torch.float64)
    forward = gaussian_max(mean0, var0, mean1, var1)
    backward = gaussian_max(mean1, var1, mean0, var0)
    for a, b in zip(forward, backward, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    # A dominant input passes through unchanged.
    assert forward[0][1:].tolist() == [100.0, 0.0]
    assert forward[1][1:].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("var_value", [0.0, 1e-30, 1e-8])
def test_gaussian_max_gradients_are_finite_for_extreme_inputs(dtype, var_value):
    mean0 = torch.tensor([50.0, -50.0, 0.0, 50.0], dtype=dtype, requires_grad=True)
    mean1 = torch.tensor([-50.0, 50.0, 0.0, 50.0], dtype=dtype, requires_grad=True)
    var0 = torch.full((4,), var_value, dtype=dtype, requires_grad=True)
    var1 = torch.full((4,), var_value, dtype=dtype, requires_grad=True)
    out_mean, out_var = gaussian_max(mean0, var0, mean1, var1)
    assert torch.isfinite(out_mean).all() and (out_var >= 0).all()
    (out_mean.sum() + out_var.sum()).backward()
    for leaf in (mean0, mean1, var0, var1):
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_max_of_far_apart_constants_stays_finite(dtype):
    # |beta| = |mean0 - mean1| / sqrt(floor) overflows beta^2 (1e10 / 3e-10 in float32,
    # 1e100 / 1e-77 in float64): the clip at 40 keeps the variance 0, not inf * 0.
    gap = 1e10 if dtype == torch.float32 else 1e100
    mean0 = torch.tensor([gap, -gap], dtype=dtype, requires_grad=True)
    mean1 = torch.zeros(2, dtype=dtype, requires_grad=True)
    var = torch.zeros(2, dtype=dtype, requires_grad=True)
    out_mean, out_var = gaussian_max(mean0, var, mean1, var)
    assert out_mean.tolist() == [gap, 0.0] and out_var.tolist() == [0.0, 0.0]
    (out_mean.sum() + out_var.sum()).backward()
    assert mean0.grad.tolist() == [1.0, 0.0] and mean1.grad.tolist() == [0.0, 1.0]
    assert torch.isfinite(var.grad).all()
