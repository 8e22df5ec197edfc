import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn.levels import learnable, ternary, uniform
from pyro_bqn.moments import Moments
from pyro_bqn.nn import QuantizedActivation, Sign
from pyro_bqn.nn.gaussian import normal_cdf
from tests.mc import assert_mean_var_match

NUM_SAMPLES = 10_000
SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def _rare_event_slack(value_range: float) -> float:
    # Normal-theory standard errors miss outcomes too rare to appear among the samples. An
    # outcome of probability p >= 10/S is absent with chance <= e^-10; a rarer one moves the
    # mean by at most range * p and the variance by at most range^2 * p. Two tails.
    return 2 * 10 * max(value_range, 1.0) ** 2 / NUM_SAMPLES


def _sampled_inputs(shape, seed, mean_scale):
    gen = torch.Generator().manual_seed(seed)
    mean = mean_scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    var = 0.01 + 3.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn((NUM_SAMPLES, *shape), generator=gen, dtype=torch.float64)
    return mean, var, mean + var.sqrt() * noise, gen


def _sorted_distinct(gen, count, low, high):
    # Distinct sorted points in [low, high], at least (high - low) / (8 count) apart.
    gaps = 0.125 + torch.rand(count, generator=gen, dtype=torch.float64)
    points = torch.cumsum(gaps, 0)
    return low + (high - low) * (points - points[0]) / max(points[-1] - points[0], 1.0)


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, mean_scale=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_sign_moments_match_monte_carlo(shape, mean_scale, seed):
    mean, var, samples, _ = _sampled_inputs(shape, seed, mean_scale)
    out = Sign()(Moments(mean, var))
    assert_mean_var_match(
        torch.sign(samples) + (samples == 0), out.mean, out.var, atol=_rare_event_slack(2.0)
    )
    # The closed forms of DESIGN §4.
    erf_mean = torch.erf(mean / (2 * var).sqrt())
    assert torch.allclose(out.mean, erf_mean, atol=1e-12)
    assert torch.allclose(out.var, 1 - erf_mean.square(), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    shape=SHAPES,
    num_values=st.integers(2, 5),
    midpoints=st.booleans(),
    mean_scale=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_quantized_activation_moments_match_monte_carlo(
    shape, num_values, midpoints, mean_scale, seed
):
    mean, var, samples, gen = _sampled_inputs(shape, seed, mean_scale)
    values = _sorted_distinct(gen, num_values, -1.5, 2.0)
    thresholds = None if midpoints else _sorted_distinct(gen, num_values - 1, -2.0, 2.0)
    act = QuantizedActivation(values=values, thresholds=thresholds).double()
    out = act(Moments(mean, var))
    values = act.values  # as stored, in the default dtype's precision

    index = (samples.unsqueeze(-1) >= act.thresholds).sum(-1)
    value_range = (values[-1] - values[0]).item()
    assert_mean_var_match(values[index], out.mean, out.var, atol=_rare_event_slack(value_range))

    # The bucket-probability form P(a_j) = Phi((t_j - mu)/s) - Phi((t_{j-1} - mu)/s).
    std = var.sqrt().unsqueeze(-1)
    cdf = normal_cdf((act.thresholds - mean.unsqueeze(-1)) / std)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], -1)
    probs = cdf[..., 1:] - cdf[..., :-1]
    exact_mean = (probs * values).sum(-1)
    exact_var = (probs * (values - exact_mean.unsqueeze(-1)).square()).sum(-1)
    assert torch.allclose(out.mean, exact_mean, atol=1e-12)
    assert torch.allclose(out.var, exact_var, atol=1e-12)


def test_sign_tensor_mode_is_sign_with_zero_mapped_up_and_hardtanh_ste():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = Sign()(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    y.backward(torch.arange(1.0, 8.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_quantized_activation_tensor_mode_buckets_with_ste():
    act = QuantizedActivation(levels=uniform(2), thresholds=[-0.5, 0.0, 0.5])
    x = torch.tensor([-1.2, -0.5, -0.2, 0.0, 0.49, 0.5, 0.9, 1.0, 1.1], requires_grad=True)
    y = act(x)
    third = 1.0 / 3.0
    expected = [-1.0, -third, -third, third, third, 1.0, 1.0, 1.0, 1.0]
    assert torch.allclose(y, torch.tensor(expected))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1, 1, 1, 1, 1, 1, 1, 0]


def test_default_thresholds_are_the_level_midpoints():
    act = QuantizedActivation(levels=ternary())
    assert act.thresholds.tolist() == [-0.5, 0.5]
    assert act(torch.tensor([-0.6, -0.5, 0.4, 0.5])).tolist() == [-1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("moment_mode", [False, True])
def test_learnable_levels_receive_gradients(moment_mode):
    act = QuantizedActivation(levels=learnable([-1.0, 0.0, 2.0]))
    assert {"levels.first", "levels.raw_gaps"} <= dict(act.named_parameters()).keys()
    x = torch.linspace(-2, 2, 9)
    out = act(Moments(x, torch.ones_like(x))) if moment_mode else act(x)
    (out.mean.sum() + out.var.sum() if moment_mode else out.sum()).backward()
    grad = act.levels.raw_gaps.grad
    assert torch.isfinite(grad).all() and (grad != 0).any()


@pytest.mark.parametrize("module", [Sign(), QuantizedActivation(levels=ternary())], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("var_value", [0.0, 1e-30, 1e-8])
def test_gradients_are_finite_for_extreme_inputs(module, dtype, var_value):
    mean = torch.tensor([-50.0, 50.0, 0.0, 0.5], dtype=dtype, requires_grad=True)
    var = torch.full((4,), var_value, dtype=dtype, requires_grad=True)
    out = module(Moments(mean, var))
    assert torch.isfinite(out.mean).all() and (out.var >= 0).all()
    assert out.mean[:2].tolist() == [-1.0, 1.0]
    (out.mean.sum() + out.var.sum()).backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of levels or values"),
        ({"levels": ternary(), "values": [-1.0, 1.0]}, "exactly one of levels or values"),
        ({"levels": [-1.0, 1.0]}, "LevelSet"),
        ({"values": [1.0, -1.0]}, "values must be sorted"),
        ({"values": [-1.0, 0.0, 1.0], "thresholds": [0.5, -0.5]}, "strictly increasing"),
        ({"values": [-1.0, 0.0, 1.0], "thresholds": [0.0, 0.0]}, "strictly increasing"),
        ({"values": [-1.0, 0.0, 1.0], "thresholds": [0.0]}, r"len\(values\)"),
        ({"values": [-1.0, 1.0], "thresholds": [float("nan")]}, "finite"),
        ({"values": [-1.0, 1.0], "thresholds": [[0.0]]}, "shape"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizedActivation(**kwargs)
