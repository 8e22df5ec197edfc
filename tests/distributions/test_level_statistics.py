"""The fused level statistics against their definitions, on both implementations."""

import os
import select
import signal

import pytest
import torch

import pyro_bqn.distributions.level_statistics as level_module
from pyro_bqn import native
from pyro_bqn.distributions.level_statistics import level_statistics

NATIVE_OFF = os.environ.get("PYRO_BQN_NATIVE") == "0"


@pytest.fixture(params=["native", "torch"])
def implementation(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(level_module, "_native_library", lambda *args: None)
    elif NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    else:
        # The native case must really run the kernel: fail loudly if it cannot be built.
        assert level_module.native.load("level_statistics") is not None
    return request.param


def _reference(logits: torch.Tensor, levels: torch.Tensor):
    q = torch.softmax(logits, dim=0)
    shape = (-1,) + (1,) * (logits.dim() - 1)
    mean = (q * levels.reshape(shape)).sum(0)
    second = (q * levels.square().reshape(shape)).sum(0)
    var = (q * (levels.reshape(shape) - mean).square()).sum(0)
    return mean, var, second, torch.special.xlogy(q, q).sum(0)


def _random(shape, dtype, seed, scale=3.0):
    return scale * torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_levels", [2, 3, 4, 16, 17])
@pytest.mark.parametrize("weight_shape", [(7,), (5, 300), (0,)])
def test_statistics_match_their_definitions(implementation, dtype, num_levels, weight_shape):
    logits = _random((num_levels, *weight_shape), dtype, seed=num_levels)
    levels = torch.linspace(-1.5, 2.0, num_levels, dtype=dtype)
    stats = level_statistics(logits, levels)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for name, got, expected in zip(stats._fields, stats, _reference(logits, levels), strict=True):
        assert got.shape == weight_shape and got.dtype == dtype, name
        torch.testing.assert_close(got, expected, **tol, msg=name)


def test_gradients_match_finite_differences(implementation):
    logits = _random((3, 4, 5), torch.float64, seed=1).requires_grad_()
    levels = torch.tensor([-1.0, 0.3, 1.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, v: tuple(level_statistics(t, v)), (logits, levels))


def test_gradient_through_some_outputs_only(implementation):
    logits = _random((3, 50), torch.float64, seed=2).requires_grad_()
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    level_statistics(logits, levels).var.sum().backward()
    expected = torch.autograd.grad(_reference(logits, levels)[1].sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)


def test_non_finite_logits_give_the_exact_answer(implementation):
    # A level with logit -inf has probability zero; the kernel hands such inputs to torch.
    logits = torch.tensor([[-torch.inf, 0.0], [0.0, 0.0], [1.0, -torch.inf]])
    levels = torch.tensor([-1.0, 0.0, 1.0])
    stats = level_statistics(logits, levels)
    for got, expected in zip(stats, _reference(logits, levels), strict=True):
        torch.testing.assert_close(got, expected)
    assert torch.isfinite(torch.stack(list(stats))).all()


@pytest.mark.parametrize("broadcast", [(), (1,), (0, 3)], ids=["none", "var", "mean+negent"])
def test_chunked_native_run_matches_torch(monkeypatch, broadcast):
    # Gradients of sums arrive as one value with stride 0; the kernel must read that value
    # for every range of weights, not step through memory past it.
    if NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    monkeypatch.setattr(native, "MIN_RANGE", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    logits = _random((4, 1000), torch.float64, seed=3).requires_grad_()
    levels = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(1000, dtype=torch.float64) for _ in range(4)]
    for index in broadcast:
        grads[index] = torch.randn((), dtype=torch.float64).expand(1000)
    kernel = torch.autograd.grad(level_statistics(logits, levels), (logits, levels), grads)
    monkeypatch.setattr(level_module, "_native_library", lambda *args: None)
    reference = torch.autograd.grad(level_statistics(logits, levels), (logits, levels), grads)
    for got, expected in zip(kernel, reference, strict=True):
        torch.testing.assert_close(got, expected)


def test_levels_must_match_the_first_dimension():
    with pytest.raises(ValueError, match="K=3 levels as their first dimension"):
        level_statistics(torch.zeros(4, 2), torch.tensor([-1.0, 0.0, 1.0]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_use_the_thread_pool(monkeypatch):
    monkeypatch.setattr(native, "MIN_RANGE", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    logits = _random((3, 1000), torch.float64, seed=4)
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    expected = level_statistics(logits, levels).mean  # starts the parent's pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report success through the pipe, never return into pytest
        ok = torch.equal(level_statistics(logits, levels).mean, expected)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    if not ready:  # the child hangs: stop it and fail
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert ready and os.read(read, 1) == b"1"


def test_second_derivatives_are_refused(implementation):
    logits = _random((3, 6), torch.float64, seed=5).requires_grad_()
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(
        level_statistics(logits, levels).var.sum(), logits, create_graph=True
    )
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad.square().sum(), logits)


@pytest.mark.parametrize("num_levels", [2, 16, 17])
def test_the_kernel_computes_up_to_16_levels(num_levels):
    # The operator's last output says whether the C kernel computed the statistics: it
    # does for 2 to 16 levels, whatever the number of weights; torch does beyond.
    if NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    logits = _random((num_levels, 300), torch.float64, seed=6)
    levels = torch.linspace(-1.0, 1.0, num_levels, dtype=torch.float64)
    by_kernel = torch.ops.pyro_bqn.level_statistics(logits, levels)[5]
    assert bool(by_kernel) == (num_levels <= 16)


def test_levels_in_another_dtype_are_taken_in_the_logits_dtype(implementation):
    logits = _random((3, 20), torch.float64, seed=7)
    levels = torch.tensor([-1.0, 0.1, 0.7])  # float32
    stats = level_statistics(logits, levels)
    for name, got, expected in zip(
        stats._fields, stats, _reference(logits, levels.double()), strict=True
    ):
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, expected, msg=name)


def test_gradients_with_non_finite_logits_match_the_definitions(implementation):
    # The kernel refuses such logits in the forward pass; the backward must not run it either.
    logits = torch.tensor(
        [[-torch.inf, 0.5, 0.0], [0.3, 0.0, -torch.inf], [1.0, -torch.inf, 0.2]],
        dtype=torch.float64,
        requires_grad=True,
    )
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    grads = [_random((3,), torch.float64, seed=8 + i) for i in range(4)]
    (got,) = torch.autograd.grad(level_statistics(logits, levels), logits, grads)
    # The limit as a logit goes to -inf: at -200 its level's probability (1e-87) and every
    # term it adds to the gradient are below float64's resolution of the others.
    finite = torch.where(logits.isinf(), -200.0, logits)
    (expected,) = torch.autograd.grad(_reference(finite, levels), logits, grads)
    torch.testing.assert_close(got, expected)


def test_strided_gradients_match_contiguous_ones(implementation):
    # A gradient may arrive as a strided view; the kernel reads a contiguous copy.
    logits = _random((4, 200), torch.float64, seed=9).requires_grad_()
    levels = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=torch.float64)
    strided = [_random((400,), torch.float64, seed=10 + i)[::2] for i in range(4)]
    assert not strided[0].is_contiguous()
    (got,) = torch.autograd.grad(level_statistics(logits, levels), logits, strided)
    contiguous = [g.contiguous() for g in strided]
    (expected,) = torch.autograd.grad(_reference(logits, levels), logits, contiguous)
    torch.testing.assert_close(got, expected)


def test_a_broadcast_gradient_is_read_where_it_lies():
    # The gradient of a sum is one value seen n times (stride 0): passed as is, at its own
    # address for every range of weights; any other array is offset to the range.
    value = torch.tensor([2.5], dtype=torch.float64).expand(1000)
    array = torch.zeros(1000, dtype=torch.float64)
    assert level_module._is_broadcast(value) and not level_module._is_broadcast(array)
    assert level_module._offset(value, 500) == value.data_ptr()
    assert level_module._offset(array, 500) == array.data_ptr() + 500 * 8
    assert level_module._offset(None, 500) is None


BACKWARD_ARGUMENTS = ("mean", "lse", "g_mean", "g_var", "g_second", "g_negent")


@pytest.mark.parametrize("problem", ["shape", "dtype"])
@pytest.mark.parametrize("name", BACKWARD_ARGUMENTS)
def test_backward_operator_names_a_bad_argument(monkeypatch, name, problem):
    # Refused before any work (the torch implementation runs, so that a mutant that let a
    # bad array through cannot make the kernel read past it).
    monkeypatch.setattr(level_module, "_native_library", lambda *args: None)
    theta = _random((3, 5), torch.float64, seed=11)
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    arrays = {argument: torch.zeros(5, dtype=torch.float64) for argument in BACKWARD_ARGUMENTS}
    arrays[name] = torch.zeros(6, dtype=torch.float64) if problem == "shape" else torch.zeros(5)
    by_kernel = torch.tensor(False)
    mean, lse, *grads = arrays.values()
    with pytest.raises(ValueError, match=rf"backward: {name} must have shape \(5,\) and dtype"):
        torch.ops.pyro_bqn.level_statistics_backward(theta, levels, mean, lse, by_kernel, *grads)


def test_the_library_is_loaded_only_with_the_kernels_it_calls(monkeypatch):
    # A cached library without them (a foreign or interrupted build) must be rebuilt, so
    # load is told every function the operator will call.
    asked = []

    def load(name, symbols=()):
        asked.append((name, set(symbols)))

    monkeypatch.setattr(native, "load", load)
    level_statistics(torch.zeros(3, 4), torch.tensor([-1.0, 0.0, 1.0]))
    kernels = {f"level_statistics_{d}_{t}" for d in ("forward", "backward") for t in "fd"}
    assert asked and all(name == "level_statistics" and kernels <= got for name, got in asked)
