"""Local reparameterization (Shayer et al. 2018; Roth et al. 2019): the sampled
pre-activation, the relaxed sign, and both layers' behaviour on plain tensors."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_bqn.infer import AutoQuantizedGuide, MomentMessenger
from pyro_bqn.moments import Moments
from pyro_bqn.nn import Sign
from pyro_bqn.nn.gaussian import normal_cdf
from pyro_bqn.nn.local_reparameterization import (
    LocalReparameterization,
    RelaxedSign,
    relaxed_sign_sample,
    sign_logit,
)
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from tests.mc import assert_mean_var_match

NUM_SAMPLES = 20_000
LEVELS = torch.tensor([-1.0, 0.0, 1.0])


def _layer_and_posterior_moments():
    """A QuantizedLinear(6, 3) with a bias, its guide, inputs, and the layer's output moments
    when the guide's moments are propagated (as under DeterministicELBO)."""
    pyro.set_rng_seed(1)
    x = torch.randn(2, 6)
    layer = QuantizedLinear(6, 3)
    guide = AutoQuantizedGuide(layer, init_scale=0.4, init_loc_scale=0.3)
    guide(x)
    guide_trace = poutine.trace(MomentMessenger()(guide)).get_trace(x)
    moments = poutine.replay(layer, trace=guide_trace)(x)
    return layer, guide, x, moments


def _analytic_pre_activation(guide, x):
    """``x E[W]^T + E[b]`` and ``x^2 Var[W]^T + Var[b]`` from the guide's posteriors."""
    probs = guide.exact_posterior("weight").probs  # (out, in, K)
    w_mean = probs @ LEVELS
    w_var = probs @ LEVELS.square() - w_mean.square()
    bias = guide.exact_posterior("bias")
    return x @ w_mean.T + bias.mean, x.square() @ w_var.T + bias.variance


def test_the_layer_moments_are_the_discrete_networks_pre_activation_moments():
    _, guide, x, moments = _layer_and_posterior_moments()
    mean, var = _analytic_pre_activation(guide, x)
    assert torch.allclose(moments.mean, mean, atol=1e-5)
    assert torch.allclose(moments.var, var, atol=1e-5)
    # Networks drawn from the categorical posterior have exactly these first two moments
    # (the central limit theorem is only needed for the Gaussian shape).
    weights = guide.exact_posterior("weight").sample((NUM_SAMPLES,))  # (S, out, in)
    biases = guide.exact_posterior("bias").sample((NUM_SAMPLES,))  # (S, out)
    networks = torch.einsum("ni,soi->sno", x, weights) + biases.unsqueeze(1)
    assert_mean_var_match(networks, mean, var, atol=1e-4)


def test_the_local_reparameterization_sample_has_the_analytic_mean_and_variance():
    _, guide, x, moments = _layer_and_posterior_moments()
    mean, var = _analytic_pre_activation(guide, x)
    pyro.set_rng_seed(2)
    shape = (NUM_SAMPLES, *moments.shape)
    samples = LocalReparameterization()(
        Moments(moments.mean.expand(shape), moments.var.expand(shape))
    )
    assert type(samples) is torch.Tensor and samples.shape == shape
    # z = 5 standard errors of the sample mean and variance (tests/mc.py).
    assert_mean_var_match(samples, mean, var, atol=1e-4)


def _grid(dtype=torch.float64):
    mean = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.3, 1.5, 4.0], dtype=dtype)
    var = torch.tensor([0.5, 2.0, 0.1, 1.0, 4.0, 1.0, 9.0], dtype=dtype)
    return mean, var, normal_cdf(mean / var.sqrt())


def test_sign_logit_is_the_log_odds_of_phi():
    mean, var, p_plus = _grid()
    assert torch.allclose(torch.sigmoid(sign_logit(mean, var)), p_plus, atol=1e-12)
    # Far tails stay finite, with finite, non-zero gradients.
    mean = torch.tensor([-1e3, 1e3], dtype=torch.float64, requires_grad=True)
    var = torch.full((2,), 1e-6, dtype=torch.float64, requires_grad=True)
    logit = sign_logit(mean, var)
    assert torch.isfinite(logit).all() and logit[0] < -700 and logit[1] > 700
    logit.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()


@pytest.mark.parametrize("temperature", [0.05, 1.0, 3.0])
def test_the_relaxed_sign_is_positive_with_probability_phi_at_any_temperature(temperature):
    mean, var, p_plus = _grid()
    pyro.set_rng_seed(3)
    shape = (NUM_SAMPLES, *mean.shape)
    a = relaxed_sign_sample(mean.expand(shape), var.expand(shape), temperature)
    assert a.dtype == torch.float64 and (a.abs() <= 1).all()
    positive = (a > 0).double().mean(0)
    # Five binomial standard errors, plus the clamp of the logistic noise (eps ~ 2e-16).
    tol = 5 * (p_plus * (1 - p_plus) / NUM_SAMPLES).sqrt() + 1e-12
    assert ((positive - p_plus).abs() <= tol).all(), (positive, p_plus)


def test_the_relaxed_sign_tends_to_a_sign_sample_as_the_temperature_goes_to_zero():
    mean, var, p_plus = _grid()
    shape = (NUM_SAMPLES, *mean.shape)
    distance = []
    for temperature in (1.0, 0.1, 0.01, 1e-3):
        pyro.set_rng_seed(4)  # common random numbers: the same noise at every temperature
        a = relaxed_sign_sample(mean.expand(shape), var.expand(shape), temperature)
        distance.append((1 - a.abs()).mean().item())
    # |a| -> 1 as tau -> 0, monotonically on the same noise: a = tanh(c / tau).
    assert all(later < earlier for earlier, later in zip(distance, distance[1:], strict=False))
    assert distance[-1] < 1e-3
    # At tau = 1e-3 the draws are sign samples: mean 2p - 1, variance 4p(1 - p), within the
    # sampling error plus the bias of the remaining relaxation (at most 2 * distance).
    assert_mean_var_match(a, 2 * p_plus - 1, 4 * p_plus * (1 - p_plus), atol=4 * distance[-1])


def test_relaxed_sign_samples_are_seeded_and_keep_dtype_and_device():
    mean, var, _ = _grid(torch.float32)
    pyro.set_rng_seed(5)
    first = RelaxedSign(0.5)(Moments(mean, var))
    pyro.set_rng_seed(5)
    second = RelaxedSign(0.5)(Moments(mean, var))
    assert torch.equal(first, second)
    assert first.dtype == torch.float32 and first.device == mean.device
    assert not torch.equal(first, RelaxedSign(0.5)(Moments(mean, var)))


def test_gradients_flow_through_both_samples_to_the_moments():
    mean, var, _ = _grid()
    mean.requires_grad_(True)
    var.requires_grad_(True)
    pyro.set_rng_seed(6)
    a = RelaxedSign()(Moments(mean, var))
    z = LocalReparameterization()(Moments(mean, var))
    (a.sum() + z.square().sum()).backward()
    for grad in (mean.grad, var.grad):
        assert torch.isfinite(grad).all() and (grad != 0).all()
    # Pathwise: d a / d mu = (1 - a^2) / (2 tau) * d logit / d mu > 0.
    mean.grad = None
    pyro.set_rng_seed(6)
    RelaxedSign()(Moments(mean, var.detach())).sum().backward()
    assert (mean.grad > 0).all()


def test_on_tensors_the_layers_are_the_plain_sign_and_the_identity():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.7], requires_grad=True)
    relaxed, sign = RelaxedSign(0.3), Sign()
    for training in (True, False):
        relaxed.train(training)
        out = relaxed(x)
        assert torch.equal(out, sign(x))
        (grad,) = torch.autograd.grad(out.sum(), x)
        # Sign's straight-through gradient: 1 where |x| <= 1.
        assert torch.equal(grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
        sample = LocalReparameterization().train(training)
        assert sample(x) is x


def test_in_evaluation_moments_pass_as_through_sign_and_the_identity():
    mean, var, _ = _grid()
    moments = Moments(mean, var)
    out = RelaxedSign().eval()(moments)
    expected = Sign()(moments)
    assert isinstance(out, Moments)
    assert torch.equal(out.mean, expected.mean) and torch.equal(out.var, expected.var)
    assert LocalReparameterization().eval()(moments) is moments


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "1", None])
def test_bad_temperatures_are_refused(bad):
    with pytest.raises(ValueError, match="temperature must be"):
        RelaxedSign(bad)
    act = RelaxedSign()
    act.temperature = bad  # e.g. an annealing schedule gone wrong: refused at the next draw
    with pytest.raises(ValueError, match="temperature must be"):
        act(Moments(torch.zeros(2), torch.ones(2)))


def test_extra_repr_names_the_temperature():
    assert "temperature=0.5" in repr(RelaxedSign(0.5))


def test_the_sample_is_the_mean_plus_the_standard_deviation_times_global_noise():
    # h = mu + s * eps with eps from torch's global generator: seeded, the draw is fixed.
    mean, var, _ = _grid()
    pyro.set_rng_seed(3)
    h = LocalReparameterization()(Moments(mean, var))
    pyro.set_rng_seed(3)
    eps = torch.randn(mean.shape, dtype=mean.dtype)
    torch.testing.assert_close(h, mean + var.sqrt() * eps, atol=1e-12, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relaxed_sign_sample_is_the_documented_transform_of_its_uniform_draw(monkeypatch, dtype):
    # a = tanh((l + L) / (2 tau)), L = log U - log(1 - U), U clamped to [eps, 1 - eps]: a draw
    # U = 0 (possible from rand_like) gives finite noise, and a gradient for tau.
    mean, var, _ = _grid(dtype)
    draws = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=dtype)
    monkeypatch.setattr(torch, "rand_like", lambda like: draws.clone())
    tau = torch.tensor(10.0, dtype=dtype, requires_grad=True)
    a = relaxed_sign_sample(mean, var, tau)
    eps = torch.finfo(dtype).eps
    clamped = draws.double().clamp(eps, 1 - eps)
    noise = clamped.log() - (-clamped).log1p()
    expected = torch.tanh((sign_logit(mean, var).double() + noise) / 20.0)
    torch.testing.assert_close(a.double(), expected, atol=1e-6 if dtype == torch.float32 else 1e-12,
                               rtol=0.0)
    (grad,) = torch.autograd.grad(a.sum(), tau)
    assert torch.isfinite(grad)
