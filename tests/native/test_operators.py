"""The kernels as torch operators (``torch.ops.pyro_bqn.*``): registration checked by
``torch.library.opcheck``, gradients against finite differences with and without the C
kernel, clear errors for wrong arguments, and no graph break under ``torch.compile``."""

import os

import pytest
import torch

import pyro_bqn.distributions.level_statistics as level_module
import pyro_bqn.nn.batch_norm as bn_module
import pyro_bqn.nn.quantized_activation as activation_module
from pyro_bqn.distributions.level_statistics import level_statistics
from pyro_bqn.nn.batch_norm import batch_norm_moments
from pyro_bqn.nn.quantized_activation import quantized_activation_moments

OPS = torch.ops.pyro_bqn
MODULES = (level_module, activation_module, bn_module)


@pytest.fixture(params=["native", "torch"])
def implementation(request, monkeypatch):
    """Each test runs with the C kernels and with the torch formulas inside the operators."""
    if request.param == "torch":
        for module in MODULES:
            monkeypatch.setattr(module, "_native_library", lambda *args: None)
    elif os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    return request.param


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _level_arguments(dtype=torch.float64, seed=0):
    theta = torch.randn(3, 7, generator=_generator(seed), dtype=dtype, requires_grad=True)
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, requires_grad=True)
    return theta, levels


def _activation_arguments(dtype=torch.float64, seed=1):
    gen = _generator(seed)
    mean = torch.randn(4, 5, generator=gen, dtype=dtype, requires_grad=True)
    var = (0.2 + torch.rand(4, 5, generator=gen, dtype=dtype)).requires_grad_()
    values = torch.tensor([-0.5, 1.5], dtype=dtype, requires_grad=True)
    thresholds = torch.tensor([0.25], dtype=dtype, requires_grad=True)
    return mean, var, values, thresholds


def _batch_norm_arguments(dtype=torch.float64, seed=2, shape=(6, 3, 2)):
    gen = _generator(seed)
    mean = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    var = (0.2 + torch.rand(shape, generator=gen, dtype=dtype)).requires_grad_()
    weight = torch.randn(shape[1], generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(shape[1], generator=gen, dtype=dtype, requires_grad=True)
    return mean, var, weight, bias


def _forward_cases(dtype):
    return [
        (OPS.level_statistics, _level_arguments(dtype)),
        (OPS.two_valued_moments, _activation_arguments(dtype)),
        (OPS.batch_norm_moments, (*_batch_norm_arguments(dtype), 1e-5, True)),
    ]


def _backward_cases(dtype):
    cases = []
    theta, levels = (t.detach() for t in _level_arguments(dtype))
    mean, var, second, negent, lse, by_kernel = OPS.level_statistics(theta, levels)
    grads = [torch.randn_like(mean) for _ in range(4)]
    cases.append((OPS.level_statistics_backward, (theta, levels, mean, lse, by_kernel, *grads)))
    inputs = [t.detach() for t in _activation_arguments(dtype)]
    *_, by_kernel = OPS.two_valued_moments(*inputs)
    grads = [torch.randn_like(inputs[0]) for _ in range(2)]
    cases.append((OPS.two_valued_moments_backward, (*inputs, by_kernel, *grads)))
    mean, var, weight, bias = (t.detach() for t in _batch_norm_arguments(dtype))
    _, _, stats, _ = OPS.batch_norm_moments(mean, var, weight, bias, 1e-5, False)
    grads = [torch.randn_like(mean) for _ in range(2)]
    cases.append((OPS.batch_norm_moments_backward, (mean, var, stats, *grads)))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_operators_pass_opcheck(implementation, dtype, direction):
    cases = _forward_cases(dtype) if direction == "forward" else _backward_cases(dtype)
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_gradients_match_finite_differences(implementation):
    def level_outputs(theta, levels):
        return tuple(level_statistics(theta, levels))

    def batch_norm_outputs(mean, var, weight, bias):
        return batch_norm_moments(mean, var, weight, bias, 1e-5)

    assert torch.autograd.gradcheck(level_outputs, _level_arguments())
    assert torch.autograd.gradcheck(quantized_activation_moments, _activation_arguments())
    assert torch.autograd.gradcheck(batch_norm_outputs, _batch_norm_arguments())


def test_unused_outputs_need_no_gradient(implementation):
    # Only the mean's gradient arrives: the others are None, not zero tensors to read.
    theta, levels = _level_arguments()
    (got,) = torch.autograd.grad(level_statistics(theta, levels).mean.sum(), theta)
    q = torch.softmax(theta, dim=0)
    (expected,) = torch.autograd.grad((levels.detach() @ q).sum(), theta)
    torch.testing.assert_close(got, expected)


_level, _activation, _norm = (
    [t.detach() for t in make()]
    for make in (_level_arguments, _activation_arguments, _batch_norm_arguments)
)
WRONG_ARGUMENTS = {
    "levels of another length": (
        OPS.level_statistics,
        (_level[0], _level[1][:2]),
        "levels of shape",
    ),
    "levels of another dtype": (
        OPS.level_statistics,
        (_level[0], _level[1].float()),
        "dtype",
    ),
    "three activation values": (
        OPS.two_valued_moments,
        (*_activation[:2], torch.zeros(3, dtype=torch.float64), _activation[3]),
        "values of shape",
    ),
    "variance of another shape": (
        OPS.two_valued_moments,
        (_activation[0], _activation[1][:2], *_activation[2:]),
        "one shape",
    ),
    "weight of another size": (
        OPS.batch_norm_moments,
        (_norm[0], _norm[1], _norm[2][:2], _norm[3], 1e-5, False),
        r"weight must have shape \(3,\)",
    ),
    "running statistics of one value per channel": (
        OPS.batch_norm_moments,
        (_norm[0][:1, :, :1], _norm[1][:1, :, :1], *_norm[2:], 1e-5, True),
        "more than 1 value per channel",
    ),
    "stats of another shape": (
        OPS.batch_norm_moments_backward,
        (_norm[0], _norm[1], torch.zeros(3, 2, dtype=torch.float64), None, None),
        r"stats must have shape \(3, C\)",
    ),
}


def _on_meta(tensor):
    """``tensor`` on the meta device: no memory, a null data pointer."""
    return torch.empty_like(tensor, device="meta")


_level_saved = OPS.level_statistics(*_level)
_norm_stats = OPS.batch_norm_moments(*_norm, 1e-5, False)[2]
WRONG_ARGUMENTS.update(
    {
        "level backward: mean on another device": (
            OPS.level_statistics_backward,
            (
                *_level,
                _on_meta(_level_saved[0]),
                _level_saved[4],
                _level_saved[5],
                None,
                None,
                None,
                None,
            ),
            "device",
        ),
        "two-valued backward: gradient of another shape": (
            OPS.two_valued_moments_backward,
            (*_activation, OPS.two_valued_moments(*_activation)[2], _activation[0][:1], None),
            "output gradients",
        ),
        "batch-norm backward: stats on another device": (
            OPS.batch_norm_moments_backward,
            (_norm[0], _norm[1], _on_meta(_norm_stats), None, None),
            "device",
        ),
        "batch-norm backward: gradient on another device": (
            OPS.batch_norm_moments_backward,
            (_norm[0], _norm[1], _norm_stats, _on_meta(_norm[0]), None),
            "device",
        ),
    }
)


def test_a_broadcast_saved_mean_is_read_as_such(implementation):
    theta, levels = _level
    mean, _, _, _, lse, by_kernel = OPS.level_statistics(theta, levels)
    grads = [torch.randn_like(mean) for _ in range(4)]
    expected = OPS.level_statistics_backward(theta, levels, mean, lse, by_kernel, *grads)
    # One value seen N times (stride 0): the kernel would read past it as N values.
    mean = mean[:1].expand_as(mean)
    got = OPS.level_statistics_backward(theta, levels, mean, lse, by_kernel, *grads)
    formulas = level_module._formulas_backward(theta, levels, mean, lse, by_kernel, *grads)
    torch.testing.assert_close(got, formulas)
    assert not torch.equal(got, expected)


@pytest.mark.parametrize("case", sorted(WRONG_ARGUMENTS))
def test_wrong_arguments_raise_before_a_kernel_runs(implementation, case):
    op, args, message = WRONG_ARGUMENTS[case]
    with pytest.raises(ValueError, match=message):
        op(*args)


def _moment_rules(theta, levels, x, weight, bias):
    """One layer's moment rules, as a training step chains them."""
    stats = level_statistics(theta, levels)
    mean = x @ stats.mean.T
    var = x.square() @ stats.var.T
    mean, var = batch_norm_moments(mean, var, weight, bias, 1e-5)
    out_mean, out_var = quantized_activation_moments(
        mean, var, torch.tensor([-1.0, 1.0]), torch.tensor([0.0])
    )
    return out_mean.sum() + out_var.sum() + stats.neg_entropy.sum()


def test_moment_rules_compile_without_graph_breaks(implementation):
    torch._dynamo.reset()
    theta = torch.randn(3, 4, 5, requires_grad=True)
    args = (theta, torch.tensor([-1.0, 0.0, 1.0]), torch.randn(8, 5), None, None)
    explanation = torch._dynamo.explain(_moment_rules)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    expected = _moment_rules(*args)
    compiled = torch.compile(_moment_rules, backend="aot_eager", fullgraph=True)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    (expected_grad,) = torch.autograd.grad(expected, theta)
    (got_grad,) = torch.autograd.grad(got, theta)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_operators_run_the_torch_formulas_on_cuda():
    for op, args in _forward_cases(torch.float32):
        on_device = [
            a.detach().cuda().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
            for a in args
        ]
        torch.library.opcheck(op, on_device)
        expected = op(*args)
        got = op(*on_device)
        for g, e in zip(got, expected, strict=True):
            if e.dtype.is_floating_point:
                torch.testing.assert_close(g.cpu(), e.detach(), atol=1e-5, rtol=1e-4)
