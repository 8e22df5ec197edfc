import pyro
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn.moments import Moments
from pyro_bqn.nn import BatchNorm1d, BatchNorm2d

CASES = {
    "1d": (BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    "1d-seq": (BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    "2d": (BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
}


def _randomize_affine(module, gen):
    if module.affine:
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.num_features, generator=gen) * 2)
            module.bias.copy_(torch.randn(module.num_features, generator=gen))


def _channel_view(t, dim):
    return t.view((1, -1) + (1,) * (dim - 2))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_tensor_mode_is_torch_batch_norm(case, momentum, affine, track):
    ours_cls, torch_cls, shape = CASES[case]
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track)
    reference = torch_cls(shape[1], **kwargs)
    _randomize_affine(reference, gen)
    ours = ours_cls(shape[1], **kwargs)
    ours.load_state_dict(reference.state_dict())
    for training in (True, True, True, False):
        reference.train(training)
        ours.train(training)
        x = 3 * torch.randn(shape, generator=gen) + 1
        assert torch.equal(ours(x), reference(x))
    assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), reference.buffers(), strict=True))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("momentum", [0.3, None])
def test_moment_mode_with_zero_variance_matches_tensor_mode(case, momentum):
    ours_cls, _, shape = CASES[case]
    gen = torch.Generator().manual_seed(1)
    by_tensor = ours_cls(shape[1], momentum=momentum).double()
    _randomize_affine(by_tensor, gen)
    by_moments = ours_cls(shape[1], momentum=momentum).double()
    by_moments.load_state_dict(by_tensor.state_dict())
    for training in (True, True, False):
        by_tensor.train(training)
        by_moments.train(training)
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64) - 1
        out = by_moments(Moments(x, torch.zeros_like(x)))
        assert isinstance(out, Moments)
        assert torch.allclose(out.mean, by_tensor(x), atol=1e-12)
        assert torch.equal(out.var, torch.zeros_like(x))
    for a, b in zip(by_moments.buffers(), by_tensor.buffers(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_moments_are_torch_batch_norm_of_a_batch_with_those_moments(case):
    """The exact form of the check below: give every unit samples whose sample mean and
    (biased) sample variance are exactly ``mu`` and ``s^2``. Torch's batch norm over the
    pooled samples then uses exactly ``m`` and ``v``, so each unit's normalised samples have
    exactly the moment-mode mean and variance."""
    ours_cls, _, shape = CASES[case]
    gen = torch.Generator().manual_seed(3)
    module = ours_cls(shape[1]).double()
    _randomize_affine(module, gen)
    mean = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    var = 0.05 + 2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    out = module(Moments(mean, var))

    noise = torch.randn((64, *shape), generator=gen, dtype=torch.float64)
    noise = (noise - noise.mean(0)) / noise.std(0, correction=0)
    samples = mean + var.sqrt() * noise
    normalised = F.batch_norm(
        samples.flatten(0, 1), None, None, module.weight, module.bias, training=True
    ).unflatten(0, (64, shape[0]))
    assert torch.allclose(normalised.mean(0), out.mean, atol=1e-10)
    assert torch.allclose(normalised.var(0, correction=0), out.var, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(
    case=st.sampled_from(sorted(CASES)),
    batch=st.integers(2, 5),
    eps=st.sampled_from([1e-5, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_training_moments_match_torch_batch_norm_on_sampled_batches(case, batch, eps, seed):
    """Moment-mode BN is torch's training BN of the batch made of infinitely many samples
    per input unit: its statistics are the mixture's mean ``m`` and variance ``v`` (law of
    total variance). Check: draw ``S`` samples per unit, pool them into one batch of
    ``S * n`` rows, normalise with torch, and compare each unit's output sample moments.

    Tolerance (delta method, 5 standard errors, triangle inequality over the sources): a
    unit's output mean ``k (xbar - mhat) + beta`` with ``k = gamma / sqrt(v + eps)`` errs by
    ``k (se(xbar) + se(mhat))`` plus ``|mu' - beta| se(vhat) / (2 (v + eps))``; its output
    variance by ``s'^2 (se_rel(sample var) + se(vhat) / (v + eps))``, where for Gaussian
    inputs ``se(xbar) = s / sqrt(S)``, ``se(mhat) = sqrt(mean(s^2) / (n S))``,
    ``se_rel(sample var) = sqrt(2 / S)`` and ``se(vhat)^2 = sum_u (2 s_u^4 + 4 s_u^2
    (mu_u - m)^2) / (n^2 S)`` over the ``n`` units of a channel.
    """
    num_samples = 4000
    ours_cls, _, shape = CASES[case]
    shape = (batch, *shape[1:])
    gen = torch.Generator().manual_seed(seed)
    module = ours_cls(shape[1], eps=eps).double()
    _randomize_affine(module, gen)
    mean = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    var = 0.05 + 2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    out = module(Moments(mean, var))

    samples = mean + var.sqrt() * torch.randn(
        (num_samples, *shape), generator=gen, dtype=torch.float64
    )
    normalised = F.batch_norm(
        samples.flatten(0, 1), None, None, module.weight, module.bias, training=True, eps=eps
    ).unflatten(0, (num_samples, batch))
    sample_mean = normalised.mean(0)
    sample_var = normalised.var(0)

    dims = [0, *range(2, mean.dim())]
    count = mean.numel() // shape[1]
    mix_mean = mean.mean(dims, keepdim=True)
    mix_var = ((mean - mix_mean).square() + var).mean(dims, keepdim=True)
    gamma = _channel_view(module.weight.detach(), mean.dim())
    beta = _channel_view(module.bias.detach(), mean.dim())
    se_xbar = (var / num_samples).sqrt()
    se_mhat = (var.mean(dims, keepdim=True) / (count * num_samples)).sqrt()
    se_vhat = (
        (2 * var.square() + 4 * var * (mean - mix_mean).square()).sum(dims, keepdim=True)
        / (count**2 * num_samples)
    ).sqrt()
    gain = gamma.abs() / (mix_var + eps).sqrt()
    mean_tol = 5 * (
        gain * (se_xbar + se_mhat) + (out.mean - beta).abs() * se_vhat / (2 * (mix_var + eps))
    )
    var_tol = 5 * out.var * ((2 / num_samples) ** 0.5 + se_vhat / (mix_var + eps))
    assert ((out.mean - sample_mean).abs() <= mean_tol + 1e-9).all()
    assert ((out.var - sample_var).abs() <= var_tol + 1e-9).all()


def test_evaluation_uses_running_statistics():
    module = BatchNorm2d(3, momentum=0.5).double()
    gen = torch.Generator().manual_seed(2)
    _randomize_affine(module, gen)
    for _ in range(3):
        mean = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
        module(Moments(mean, torch.rand(mean.shape, generator=gen, dtype=torch.float64)))
    module.eval()
    mean = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    var = torch.rand(mean.shape, generator=gen, dtype=torch.float64)
    out = module(Moments(mean, var))
    scale = _channel_view(module.weight / (module.running_var + module.eps).sqrt(), 4)
    expected_mean = (mean - _channel_view(module.running_mean, 4)) * scale + _channel_view(
        module.bias, 4
    )
    assert torch.allclose(out.mean, expected_mean, atol=1e-12)
    assert torch.allclose(out.var, var * scale.square(), atol=1e-12)


def test_running_variance_is_unbiased_in_the_spread_of_means_only():
    module = BatchNorm1d(2, momentum=1.0).double()
    mean = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    var = torch.tensor([[0.5, 0.25], [1.5, 0.75]], dtype=torch.float64)
    module(Moments(mean, var))
    assert module.running_mean.tolist() == [1.0, 1.0]
    # within = mean(s^2) = [1.0, 0.5]; between = [1.0, 0.0], times n / (n - 1) = 2.
    assert module.running_var.tolist() == [3.0, 0.5]
    assert module.num_batches_tracked.item() == 1
    module.reset_running_stats()
    assert module.running_mean.tolist() == [0.0, 0.0]
    assert module.running_var.tolist() == [1.0, 1.0]
    assert module.num_batches_tracked.item() == 0


def test_affine_parameters_are_pyro_params_with_gradients():
    pyro.clear_param_store()
    module = BatchNorm1d(3)
    mean = torch.randn(5, 3, requires_grad=True)
    var = torch.rand(5, 3, requires_grad=True)
    out = module(Moments(mean, var))
    (out.mean.square().sum() + out.var.sum()).backward()
    assert {"weight", "bias"} <= set(pyro.get_param_store().keys())
    for t in (module.weight, module.bias, mean, var):
        assert torch.isfinite(t.grad).all()


def test_invalid_moment_inputs_raise():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNorm2d(3)(Moments(torch.zeros(4, 3), torch.ones(4, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm1d(3)(Moments(torch.zeros(1, 3), torch.ones(1, 3)))
