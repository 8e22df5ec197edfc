import os

import pyro
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyro_bqn.nn.batch_norm as bn_module
from pyro_bqn.moments import Moments
from pyro_bqn.nn import BatchNorm1d, BatchNorm2d
from pyro_bqn.nn.batch_norm import RunningUpdate, batch_norm_moments

NATIVE_OFF = os.environ.get("PYRO_BQN_NATIVE") == "0"

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
@pytest.mark.parametrize(
    "settings",
    [{"momentum": 0.3}, {"momentum": None}, {"track_running_stats": False}],
    ids=["momentum", "cumulative", "no-running-stats"],
)
def test_moment_mode_with_zero_variance_matches_tensor_mode(case, settings):
    # Without running statistics, batch statistics serve in evaluation too and no buffers
    # are kept.
    ours_cls, _, shape = CASES[case]
    gen = torch.Generator().manual_seed(1)
    by_tensor = ours_cls(shape[1], **settings).double()
    _randomize_affine(by_tensor, gen)
    by_moments = ours_cls(shape[1], **settings).double()
    by_moments.load_state_dict(by_tensor.state_dict())
    for training in (True, True, False):
        by_tensor.train(training)
        by_moments.train(training)
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64) - 1
        out = by_moments(Moments(x, torch.zeros_like(x)))
        assert isinstance(out, Moments)
        torch.testing.assert_close(out.mean, by_tensor(x), atol=1e-12, rtol=0.0)
        assert torch.equal(out.var, torch.zeros_like(x))
    for a, b in zip(by_moments.buffers(), by_tensor.buffers(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    if settings.get("track_running_stats") is False:
        assert by_moments.running_mean is None and by_moments.num_batches_tracked is None


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


# The training-mode moment rule has a C kernel (pyro_bqn/native/batch_norm_moments.c) and
# a torch implementation of the same formulas; the tests below run both and compare them.

SHAPES = {"1d": (37, 6), "1d-seq": (5, 3, 7), "2d": (4, 3, 2, 3)}
# float32: the kernel sums in double, torch in float32; both round the outputs to float32.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
}


def _use_torch(monkeypatch):
    monkeypatch.setattr(bn_module, "_native_library", lambda *args: None)


@pytest.fixture(params=["native", "torch"])
def implementation(request, monkeypatch):
    if request.param == "torch":
        _use_torch(monkeypatch)
    elif NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    else:
        # The native case must really run the kernel: fail loudly if it cannot be built.
        assert bn_module.native.load("batch_norm_moments") is not None
    return request.param


def _native_only():
    if NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")


def _moment_inputs(shape, dtype, seed, affine=True, offset=1.0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    mean = (2 * torch.randn(shape, generator=gen, dtype=dtype) + offset).requires_grad_()
    var = (0.05 + torch.rand(shape, generator=gen, dtype=dtype)).requires_grad_()
    weight = bias = None
    if affine:
        weight = (2 * torch.randn(channels, generator=gen, dtype=dtype)).requires_grad_()
        bias = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_()
    return mean, var, weight, bias


def _leaves(*tensors):
    return [t for t in tensors if t is not None]


def _run(inputs, grads, running=None, eps=1e-5):
    """Outputs and the gradients of ``sum(out * grad)`` with respect to every input."""
    outputs = batch_norm_moments(*inputs, eps, running)
    used = [(out, g) for out, g in zip(outputs, grads, strict=True) if g is not None]
    wanted = _leaves(*inputs)
    gradients = torch.autograd.grad(
        [out for out, _ in used], wanted, [g for _, g in used], allow_unused=True
    )
    return [out.detach() for out in outputs], gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_native_and_torch_paths_agree(monkeypatch, dtype, case, affine):
    _native_only()
    shape = SHAPES[case]
    inputs = _moment_inputs(shape, dtype, seed=10, affine=affine)
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2)]
    native_outputs, native_grads = _run(inputs, grads)
    _use_torch(monkeypatch)
    torch_outputs, torch_grads = _run(inputs, grads)
    for got, expected in zip(
        native_outputs + list(native_grads), torch_outputs + list(torch_grads), strict=True
    ):
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_native_path_runs_the_kernel():
    _native_only()
    mean, var, weight, bias = _moment_inputs((6, 4), torch.float64, seed=12)
    out_mean, out_var = batch_norm_moments(mean, var, weight, bias, 1e-5)
    assert "batch_norm_moments" in type(out_mean.grad_fn).__name__
    assert out_var.grad_fn is out_mean.grad_fn


def test_float32_sums_are_accumulated_in_double():
    # A large offset and a small spread: the per-channel variance, on which the scale
    # rests, comes from sums of 40000 float32 values near 1000. Summed in double they give
    # the float64 reference within float32 rounding of the result.
    _native_only()
    gen = torch.Generator().manual_seed(13)
    mean = 1000 + 0.01 * torch.randn(40000, 2, generator=gen)
    var = 1e-4 * torch.rand(40000, 2, generator=gen)
    module = BatchNorm1d(2, momentum=1.0, affine=False)
    out = module(Moments(mean, var))
    reference = BatchNorm1d(2, momentum=1.0, affine=False).double()
    expected = reference(Moments(mean.double(), var.double()))
    torch.testing.assert_close(out.var, expected.var.float(), atol=0.0, rtol=1e-5)
    for name in ("running_mean", "running_var"):
        got, expected = getattr(module, name), getattr(reference, name).float()
        torch.testing.assert_close(got, expected, atol=0.0, rtol=1e-6, msg=name)


def _old_running_update(module, mean, var, factor):
    """The running-statistics update as written before the kernel, for comparison."""
    dims = [0, *range(2, mean.dim())]
    count = mean.numel() // mean.shape[1]
    batch_mean = mean.mean(dims)
    centred = mean - batch_mean.view((1, -1) + (1,) * (mean.dim() - 2))
    between = centred.square().mean(dims)
    within = var.mean(dims)
    unbiased = within + between * (count / (count - 1))
    module.running_mean.mul_(1.0 - factor).add_(batch_mean, alpha=factor)
    module.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_statistics_are_as_before(implementation, dtype, case, momentum):
    """Three training steps, against the torch formulas of the old code: bit for bit on
    the torch path; within rounding on the native path, which sums in double."""
    ours_cls, _, shape = CASES[case]
    module = ours_cls(shape[1], momentum=momentum).to(dtype)
    reference = ours_cls(shape[1], momentum=momentum).to(dtype)
    gen = torch.Generator().manual_seed(14)
    for step in range(1, 4):
        mean = 2 * torch.randn(shape, generator=gen, dtype=dtype) + 1
        var = torch.rand(shape, generator=gen, dtype=dtype)
        module(Moments(mean, var))
        with torch.no_grad():
            _old_running_update(reference, mean, var, 1.0 / step if momentum is None else momentum)
    assert module.num_batches_tracked.item() == 3
    for name in ("running_mean", "running_var"):
        got, expected = getattr(module, name), getattr(reference, name)
        if implementation == "torch":
            assert torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got, expected, **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("case", sorted(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_gradients_match_finite_differences(implementation, case, affine):
    # Three samples keep the finite differences quick.
    inputs = _moment_inputs((3, *SHAPES[case][1:]), torch.float64, seed=15, affine=affine)

    def function(*leaves):
        full = list(leaves) + [None] * (4 - len(leaves))
        return batch_norm_moments(*full, 1e-3)

    assert torch.autograd.gradcheck(function, tuple(_leaves(*inputs)))


@pytest.mark.parametrize("output", [0, 1])
def test_gradient_through_one_output_only(implementation, monkeypatch, output):
    inputs = _moment_inputs((5, 3, 4), torch.float64, seed=16)
    gen = torch.Generator().manual_seed(17)
    grads = [None, None]
    grads[output] = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    _, got = _run(inputs, grads)
    _use_torch(monkeypatch)
    _, expected = _run(inputs, grads)
    assert [g is None for g in got] == [e is None for e in expected]
    for g, e in zip(got, expected, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_gradient_for_some_inputs_only(implementation):
    mean, var, weight, bias = _moment_inputs((6, 3), torch.float64, seed=18)
    var = var.detach()
    weight = weight.detach()
    out_mean, out_var = batch_norm_moments(mean, var, weight, bias, 1e-5)
    (out_mean.square().sum() + out_var.sum()).backward()
    assert mean.grad is not None and bias.grad is not None
    centred = mean - mean.mean(0)
    scale = weight / (centred.square().mean(0) + var.mean(0) + 1e-5).sqrt()
    torch.testing.assert_close(bias.grad, 2 * (centred * scale + bias).sum(0).detach())


def _non_finite_inputs(dtype):
    mean, var, weight, bias = _moment_inputs((6, 3), dtype, seed=19)
    with torch.no_grad():
        mean[2, 1] = torch.inf
        var[4, 2] = torch.nan
    return mean, var, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_input_gives_the_torch_answer(monkeypatch, dtype):
    _native_only()
    gen = torch.Generator().manual_seed(20)
    grads = [torch.randn(6, 3, generator=gen, dtype=dtype) for _ in range(2)]
    module = BatchNorm1d(3).to(dtype)
    inputs = _non_finite_inputs(dtype)
    got, got_grads = _run(
        inputs, grads, RunningUpdate(module.running_mean, module.running_var, 0.1)
    )
    # Channels 1 (an infinite mean) and 2 (a NaN variance) reach every row through their
    # batch statistics, so no row of them stays finite; the check is not vacuous.
    assert not torch.isfinite(got[0][:, 1:]).any(0).any()
    _use_torch(monkeypatch)
    reference = BatchNorm1d(3).to(dtype)
    update = RunningUpdate(reference.running_mean, reference.running_var, 0.1)
    expected, expected_grads = _run(inputs, grads, update)
    exact = {"atol": 0.0, "rtol": 0.0, "equal_nan": True}
    for g, e in zip(got + list(got_grads), expected + list(expected_grads), strict=True):
        torch.testing.assert_close(g, e, **exact)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(module, name), getattr(reference, name), **exact)
    # Channel 0 saw only finite values: it stays finite.
    assert torch.isfinite(got[0][:, 0]).all() and torch.isfinite(module.running_var[0])


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("detached", ["var", "mean"])
@pytest.mark.parametrize("loss_on", [0, 1])
def test_non_finite_input_with_some_inputs_fixed_gives_the_torch_answer(
    monkeypatch, affine, detached, loss_on
):
    # The kernel refuses a non-finite input; its autograd fallback must then handle absent
    # affine parameters and inputs that need no gradient, as torch's own path does.
    _native_only()
    mean, var, weight, bias = _moment_inputs((6, 3), torch.float64, seed=23, affine=affine)
    with torch.no_grad():
        mean[1, 2] = torch.inf
    if detached == "var":
        var = var.detach()
    else:
        mean = mean.detach()
    inputs = (mean, var, weight, bias)
    grad_output = torch.randn(
        6, 3, generator=torch.Generator().manual_seed(24), dtype=torch.float64
    )
    wanted = [t for t in inputs if t is not None and t.requires_grad]

    def run():
        outputs = batch_norm_moments(*inputs, 1e-5)
        # The loss reaches one output only: beta gets no gradient through the variance.
        grads = torch.autograd.grad(outputs[loss_on], wanted, grad_output, allow_unused=True)
        return [out.detach() for out in outputs] + [
            torch.zeros(()) if g is None else g for g in grads
        ]

    got = run()
    _use_torch(monkeypatch)
    expected = run()
    exact = {"atol": 0.0, "rtol": 0.0, "equal_nan": True}
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **exact)


def test_non_finite_output_gradient_gives_the_torch_answer(monkeypatch):
    _native_only()
    inputs = _moment_inputs((6, 3), torch.float64, seed=21)
    gen = torch.Generator().manual_seed(22)
    grads = [torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads[1][3, 0] = torch.inf
    _, got = _run(inputs, grads)
    _use_torch(monkeypatch)
    _, expected = _run(inputs, grads)
    # The torch formulas then read the kernel's per-channel statistics (summed in double).
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOLERANCES[torch.float64], equal_nan=True)


def test_strided_input_uses_torch_and_agrees(monkeypatch):
    _native_only()
    mean, var, weight, bias = _moment_inputs((3, 6), torch.float64, seed=23)
    # The same values, stored channels first: not contiguous.
    strided = (mean.t().contiguous().t(), var.t().contiguous().t(), weight, bias)
    assert not strided[0].is_contiguous()
    assert bn_module._native_library(*strided, None) is None
    got = batch_norm_moments(*strided, 1e-5)
    expected = batch_norm_moments(mean, var, weight, bias, 1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_second_derivatives_are_refused():
    _native_only()
    mean, var, weight, bias = _moment_inputs((5, 3), torch.float64, seed=24)
    out_mean, _ = batch_norm_moments(mean, var, weight, bias, 1e-5)
    (grad,) = torch.autograd.grad(out_mean.square().sum(), mean, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.square().sum().backward()


# --- Arguments, operator outputs and edge cases ----------------------------------------------


@pytest.mark.parametrize("track", [True, False])
def test_one_value_per_channel_is_refused_in_training(track):
    # As torch's batch norm refuses it in tensor mode, with or without running statistics.
    module = BatchNorm1d(3, track_running_stats=track)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(Moments(torch.zeros(1, 3), torch.ones(1, 3)))


def _bad_arguments():
    mean, var = torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    weight = torch.ones(3, dtype=torch.float64)
    return {
        # var larger than mean: no read past a buffer even if the check were missing.
        "var-shape": ((mean, torch.ones(8, 3, dtype=torch.float64), None, None), "one shape"),
        "one-dim": ((mean[0], var[0], None, None), "one shape"),
        "weight-shape": ((mean, var, torch.ones(4, dtype=torch.float64), None),
                         r"weight must have shape \(3,\)"),
        "bias-shape": ((mean, var, weight, torch.ones(2, dtype=torch.float64)),
                       r"bias must have shape \(3,\)"),
        "var-dtype": ((mean, var.float(), None, None), "floating-point tensors"),
        "bias-dtype": ((mean, var, weight, weight.float()), "floating-point tensors"),
        "integer": ((mean.long(), var.long(), None, None), "floating-point tensors"),
    }


@pytest.mark.parametrize("name", sorted(_bad_arguments()))
def test_invalid_arguments_are_refused_before_any_work(name):
    arguments, message = _bad_arguments()[name]
    with pytest.raises(ValueError, match=message):
        batch_norm_moments(*arguments, 1e-5)


@pytest.mark.parametrize("track", [True, False])
def test_operator_batch_statistics_are_zero_unless_tracked(implementation, track):
    # The operator's fourth output, (m, within + n / (n - 1) between) per channel, feeds the
    # running statistics; untracked it is (2, C) zeros on either path.
    mean, var, weight, bias = (t.detach() for t in _moment_inputs((5, 3, 4), torch.float64, 25))
    *_, stats, batch = torch.ops.pyro_bqn.batch_norm_moments(mean, var, weight, bias, 1e-5, track)
    assert stats.shape == (3, 3)
    if not track:
        assert torch.equal(batch, torch.zeros(2, 3, dtype=torch.float64))
        return
    dims = [0, 2]
    count = 5 * 4
    between = (mean - mean.mean(dims, keepdim=True)).square().mean(dims)
    expected = torch.stack([mean.mean(dims), var.mean(dims) + between * count / (count - 1)])
    torch.testing.assert_close(batch, expected, **TOLERANCES[torch.float64])


def test_backward_operator_refuses_output_gradients_of_another_shape():
    # Larger than the input: the kernel could not read past a buffer if the check failed.
    mean, var, weight, bias = (t.detach() for t in _moment_inputs((6, 3), torch.float64, 26))
    _, _, stats, _ = torch.ops.pyro_bqn.batch_norm_moments(mean, var, weight, bias, 1e-5, False)
    bad = torch.ones(12, 3, dtype=torch.float64)
    backward = torch.ops.pyro_bqn.batch_norm_moments_backward
    with pytest.raises(ValueError, match="output gradients must have shape"):
        backward(mean, var, stats, bad, None)
    with pytest.raises(ValueError, match="output gradients must have shape"):
        backward(mean, var, stats, None, bad)
    with pytest.raises(ValueError, match="output gradients must have shape"):
        backward(mean, var, stats, torch.ones(6, 3), None)


def test_gradients_of_one_sample_per_channel_match_finite_differences(implementation):
    # n = 1 is refused for running statistics only; without them it normalises to beta.
    inputs = _moment_inputs((1, 3), torch.float64, seed=27)
    assert torch.autograd.gradcheck(lambda *t: batch_norm_moments(*t, 1e-3), inputs)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
def test_an_empty_batch_gives_empty_outputs_and_gradients(implementation, shape):
    mean, var, weight, bias = _moment_inputs(shape, torch.float64, seed=28)
    out_mean, out_var = batch_norm_moments(mean, var, weight, bias, 1e-5)
    assert out_mean.shape == out_var.shape == shape
    g_mean, g_var, g_bias = torch.autograd.grad(out_mean.sum() + out_var.sum(), (mean, var, bias))
    assert g_mean.shape == g_var.shape == shape
    assert torch.equal(g_bias, torch.zeros(3, dtype=torch.float64))


def test_beta_gets_no_gradient_through_the_variance_alone(implementation):
    # As autograd of the plain formulas: beta does not reach s2', so it is reported unused.
    inputs = _moment_inputs((5, 3), torch.float64, seed=29)
    _, out_var = batch_norm_moments(*inputs, 1e-5)
    got = torch.autograd.grad(out_var.sum(), inputs, allow_unused=True)
    leaves = [t.detach().requires_grad_() for t in inputs]
    _, plain_var, _, _ = bn_module._formulas_forward(*leaves, 1e-5, False)
    expected = torch.autograd.grad(plain_var.sum(), leaves, allow_unused=True)
    assert got[3] is None and expected[3] is None
    for g, e in zip(got[:3], expected[:3], strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_float32_backward_sums_are_accumulated_in_double():
    # An output gradient of large entries that cancel (+-1e6) around small ones: its sum,
    # dL/dbeta, keeps float32 rounding when summed in double; a float32 sum loses ~1 %.
    _native_only()
    n = 40000
    gen = torch.Generator().manual_seed(30)
    mean, var, weight, bias = _moment_inputs((n, 2), torch.float32, seed=30)
    pattern = torch.tensor([1e6, 1.0, -1e6, 1.0]).repeat(n // 4).unsqueeze(1)
    grad = pattern + 1e-3 * torch.randn(n, 2, generator=gen)
    out_mean, _ = batch_norm_moments(mean, var, weight, bias, 1e-5)
    (g_bias,) = torch.autograd.grad(out_mean, bias, grad)
    torch.testing.assert_close(g_bias.double(), grad.double().sum(0), atol=0.0, rtol=1e-6)
