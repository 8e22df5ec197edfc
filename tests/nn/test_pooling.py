import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn.moments import Moments
from pyro_bqn.nn import AvgPool2d, MaxPool2d
from tests.mc import assert_mean_var_match

NUM_SAMPLES = 10_000
GEOMETRIES = [  # (kernel_size, stride, input (H, W))
    (2, None, (4, 6)),
    (3, 1, (5, 4)),
    ((1, 2), None, (3, 4)),
    ((2, 3), (1, 2), (5, 7)),
    (2, 3, (7, 5)),
]


def _gaussian_inputs(shape, gen, mean_scale=2.0):
    mean = mean_scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    var = 0.05 + 2.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn((NUM_SAMPLES, *shape), generator=gen, dtype=torch.float64)
    return mean, var, mean + var.sqrt() * noise


@pytest.mark.parametrize(
    "ours_cls, torch_cls", [(AvgPool2d, torch.nn.AvgPool2d), (MaxPool2d, torch.nn.MaxPool2d)]
)
@pytest.mark.parametrize("kernel_size, stride, spatial", GEOMETRIES)
@pytest.mark.parametrize("batched", [True, False])
def test_tensor_mode_is_torch_pooling(ours_cls, torch_cls, kernel_size, stride, spatial, batched):
    x = torch.randn(((2,) if batched else ()) + (3, *spatial), requires_grad=True)
    ours, reference = ours_cls(kernel_size, stride), torch_cls(kernel_size, stride)
    y = ours(x)
    assert torch.equal(y, reference(x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    (expected,) = torch.autograd.grad(reference(x).sum(), x)
    assert torch.equal(grad, expected)


@settings(max_examples=20, deadline=None)
@given(geometry=st.sampled_from(GEOMETRIES), seed=st.integers(0, 2**16))
def test_avg_pool_moments_match_monte_carlo(geometry, seed):
    kernel_size, stride, spatial = geometry
    gen = torch.Generator().manual_seed(seed)
    mean, var, samples = _gaussian_inputs((2, 2, *spatial), gen)
    pool = AvgPool2d(kernel_size, stride)
    out = pool(Moments(mean, var))
    sampled = pool(samples.flatten(0, 1)).unflatten(0, (NUM_SAMPLES, 2))
    assert_mean_var_match(sampled, out.mean, out.var)


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(1, 1, 1, 2), (2, 3, 2, 4), (3, 1, 5)]), seed=st.integers(0, 2**16))
def test_max_pool_of_pairs_is_exact(shape, seed):
    # A (1, 2) window holds two inputs, where Clark's rule is exact.
    gen = torch.Generator().manual_seed(seed)
    mean, var, samples = _gaussian_inputs(shape, gen, mean_scale=1.0)
    pool = MaxPool2d((1, 2))
    out = pool(Moments(mean, var))
    sampled = pool(samples.flatten(0, 1)).unflatten(0, (NUM_SAMPLES, shape[0]))
    assert_mean_var_match(sampled, out.mean, out.var)


@settings(max_examples=20, deadline=None)
@given(mean_scale=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_max_pool_of_larger_windows_approximates_monte_carlo(mean_scale, seed):
    """For more than two inputs Clark's rule treats each partial maximum as Gaussian, which
    it is not. Over 200 random 2x2 windows with this generator (means ``scale * N(0, 1)``,
    ``scale <= 3``, variances in ``[0.05, 2.05]``) against 4e5 samples the error stayed below
    0.029 of the largest input standard deviation in the mean and 0.087 of the largest input
    variance in the variance; allow 0.05 and 0.15 on top of the Monte Carlo error.
    """
    gen = torch.Generator().manual_seed(seed)
    mean, var, samples = _gaussian_inputs((2, 2, 4, 4), gen, mean_scale)
    pool = MaxPool2d(2)
    out = pool(Moments(mean, var))
    sampled = pool(samples.flatten(0, 1)).unflatten(0, (NUM_SAMPLES, 2))
    sample_mean, sample_var = sampled.mean(0), sampled.var(0)
    se_mean = (sample_var / NUM_SAMPLES).sqrt()
    centred4 = (sampled - sample_mean).pow(4).mean(0)
    se_var = ((centred4 - sample_var.square()).clamp_min(0) / NUM_SAMPLES).sqrt()
    window_var = pool(var)  # the largest input variance of each window
    assert ((out.mean - sample_mean).abs() <= 5 * se_mean + 0.05 * window_var.sqrt()).all()
    assert ((out.var - sample_var).abs() <= 5 * se_var + 0.15 * window_var).all()


def test_max_pool_passes_a_dominant_input_through():
    mean = torch.tensor([[[[0.0, 30.0], [-1.0, 2.0]]]], dtype=torch.float64)
    var = torch.tensor([[[[1.0, 0.7], [2.0, 1.5]]]], dtype=torch.float64)
    out = MaxPool2d(2)(Moments(mean, var))
    assert out.mean.item() == pytest.approx(30.0, abs=1e-12)
    assert out.var.item() == pytest.approx(0.7, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("var_value", [0.0, 1e-30, 1e-8])
def test_max_pool_gradients_are_finite_for_extreme_inputs(dtype, var_value):
    mean = torch.tensor([50.0, -50.0, 50.0, 0.0] * 2, dtype=dtype).view(1, 2, 2, 2)
    mean.requires_grad_(True)
    var = torch.full_like(mean, var_value, requires_grad=True)
    out = MaxPool2d(2)(Moments(mean, var))
    assert torch.allclose(out.mean, torch.tensor(50.0, dtype=dtype), atol=1e-3)
    assert (out.var >= 0).all()
    (out.mean.sum() + out.var.sum()).backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()


@pytest.mark.parametrize("cls", [AvgPool2d, MaxPool2d])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_size": 0}, "kernel_size must be a positive int"),
        ({"kernel_size": (2, 2, 2)}, "kernel_size must be a positive int"),
        ({"kernel_size": True}, "kernel_size must be a positive int"),
        ({"kernel_size": 2, "stride": -1}, "stride must be a positive int"),
        ({"kernel_size": 2, "padding": 1}, "padding=0 only"),
        ({"kernel_size": 2, "ceil_mode": True}, "ceil_mode=False only"),
    ],
)
def test_unsupported_arguments_are_rejected(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        cls(**kwargs)
    if "only" in message:  # the layer's own restriction: named with the layer
        assert str(error.value).startswith(f"{cls.__name__} supports")


def test_max_pool_rejects_dilation_and_bad_moment_shapes():
    with pytest.raises(ValueError, match="dilation=1 only"):
        MaxPool2d(2, dilation=2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        MaxPool2d(2)(Moments(torch.zeros(4, 4), torch.ones(4, 4)))
    with pytest.raises(ValueError, match="larger than the input"):
        MaxPool2d(3)(Moments(torch.zeros(1, 1, 2, 4), torch.ones(1, 1, 2, 4)))
