import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyro_bqn.nn.quantized_activation as activation_module
from pyro_bqn import native
from pyro_bqn.levels import learnable, ternary, uniform
from pyro_bqn.moments import Moments
from pyro_bqn.nn import QuantizedActivation, Sign
from pyro_bqn.nn.gaussian import normal_cdf, variance_floor
from pyro_bqn.nn.quantized_activation import quantized_activation_moments
from tests.mc import assert_mean_var_match

NATIVE_OFF = os.environ.get("PYRO_BQN_NATIVE") == "0"

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


@pytest.mark.parametrize(
    "module", [Sign(), QuantizedActivation(levels=ternary())], ids=["sign", "ternary"]
)
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


# --- The two-valued moment rule: C kernel against the torch formulas ----------------------

# The torch formulas the kernel replaces; also what the torch path runs.
_reference = activation_module._two_valued_torch
# Float32 tails: both erfc implementations are accurate to a few ulp of their argument, and
# an ulp of z changes Phi(-z) by a relative z^2 * eps (about 1e-5 at z = 13).
TOLERANCES = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-4},
    torch.float64: {"atol": 1e-12, "rtol": 1e-9},
}


@pytest.fixture(params=["native", "torch"])
def implementation(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("PYRO_BQN_NATIVE", "0")  # the library's own switch to torch
    elif NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    else:
        # The native case must really run the kernel: fail loudly if it cannot be built.
        names = activation_module._KERNEL_NAMES
        assert activation_module.native.load("two_valued_activation", names) is not None
    return request.param


@pytest.fixture
def native_only():
    if NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    names = activation_module._KERNEL_NAMES
    assert activation_module.native.load("two_valued_activation", names) is not None


def _moment_inputs(shape, dtype, seed, mean_scale=3.0):
    """Means and variances spanning the guards: some variances zero or tiny (the floor),
    some standard scores beyond the clip at 40 and beyond the kernel's erfc/exp cuts."""
    gen = torch.Generator().manual_seed(seed)
    mean = mean_scale * torch.randn(shape, generator=gen, dtype=dtype)
    var = torch.rand(shape, generator=gen, dtype=dtype) * 2.0
    pick = torch.rand(shape, generator=gen, dtype=dtype)
    var = torch.where(pick < 0.1, 0.0, torch.where(pick < 0.2, 1e-6 * var, var))
    return mean, var


def _values(dtype, asymmetric: bool):
    values = [-0.7, 1.9] if asymmetric else [-1.0, 1.0]
    threshold = [0.3] if asymmetric else [0.0]
    return torch.tensor(values, dtype=dtype), torch.tensor(threshold, dtype=dtype)


def _outputs_and_gradients(rule, mean, var, values, thresholds, outputs=(0, 1)):
    """``rule``'s two outputs and the gradients of a fixed random linear function of the
    outputs selected by ``outputs``, with respect to every input that requires grad."""
    mean, var = mean.detach().requires_grad_(), var.detach().requires_grad_()
    result = rule(mean, var, values, thresholds)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(mean.shape, generator=gen, dtype=mean.dtype) for _ in result]
    loss = sum((result[k] * weights[k]).sum() for k in outputs)
    inputs = [mean, var] + [x for x in (values, thresholds) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return (result[0].detach(), result[1].detach(), *grads)


def _assert_all_close(got, expected, dtype):
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=f"result {index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 0, 2), (4, 5, 6), (100, 512)])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_two_valued_kernel_matches_the_torch_formulas(native_only, dtype, shape, asymmetric):
    mean, var = _moment_inputs(shape, dtype, seed=sum(shape) + 1)
    values, thresholds = _values(dtype, asymmetric)
    got = _outputs_and_gradients(quantized_activation_moments, mean, var, values, thresholds)
    expected = _outputs_and_gradients(_reference, mean, var, values, thresholds)
    assert all(x.shape == shape and x.dtype == dtype for x in got)
    _assert_all_close(got, expected, dtype)


@pytest.mark.skipif(NATIVE_OFF, reason="native kernels turned off with PYRO_BQN_NATIVE=0")
@settings(max_examples=30, deadline=None)
@given(
    shape=SHAPES,
    low=st.floats(-3.0, 1.0),
    gap=st.floats(0.01, 4.0),
    threshold=st.floats(-2.0, 2.0),
    mean_scale=st.floats(0.0, 50.0),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_two_valued_kernel_matches_for_any_levels(
    shape, low, gap, threshold, mean_scale, double, seed
):
    dtype = torch.float64 if double else torch.float32
    mean, var = _moment_inputs(shape, dtype, seed, mean_scale)
    values = torch.tensor([low, low + gap], dtype=dtype)
    thresholds = torch.tensor([threshold], dtype=dtype)
    got = _outputs_and_gradients(quantized_activation_moments, mean, var, values, thresholds)
    expected = _outputs_and_gradients(_reference, mean, var, values, thresholds)
    _assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("learnable", ["none", "values", "thresholds", "both"])
def test_two_valued_gradients_match_finite_differences(implementation, learnable):
    gen = torch.Generator().manual_seed(3)
    # Variances well above the floor and standard scores inside the clip: finite
    # differences of step 1e-6 must not cross either guard.
    mean = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    var = (0.2 + torch.rand(3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    values = torch.tensor([-0.6, 1.3], dtype=torch.float64,
                          requires_grad=learnable in ("values", "both"))
    thresholds = torch.tensor([0.2], dtype=torch.float64,
                              requires_grad=learnable in ("thresholds", "both"))
    assert torch.autograd.gradcheck(quantized_activation_moments, (mean, var, values, thresholds))


@pytest.mark.parametrize("output", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_through_one_output_only(native_only, output, dtype):
    mean, var = _moment_inputs((6, 50), dtype, seed=11)
    values, thresholds = _values(dtype, asymmetric=True)
    values.requires_grad_()
    thresholds.requires_grad_()
    rules = (quantized_activation_moments, _reference)
    got, expected = (
        _outputs_and_gradients(rule, mean, var, values, thresholds, outputs=(output,))
        for rule in rules
    )
    _assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_of_summed_outputs_read_the_broadcast_value(native_only, dtype):
    # The gradient of out.sum() arrives as one value with stride 0.
    mean, var = _moment_inputs((3, 40), dtype, seed=12)
    values, thresholds = _values(dtype, asymmetric=True)
    results = []
    for rule in (quantized_activation_moments, _reference):
        x, v = mean.clone().requires_grad_(), var.clone().requires_grad_()
        out_mean, out_var = rule(x, v, values, thresholds)
        results.append(torch.autograd.grad(out_mean.sum() + 2 * out_var.sum(), (x, v)))
    _assert_all_close(*results, dtype)


@pytest.mark.parametrize("symmetric", [False, True])
def test_learnable_two_level_activation_matches_the_torch_path(monkeypatch, symmetric):
    if NATIVE_OFF:
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    mean, var = _moment_inputs((5, 30), torch.float64, seed=13)
    grads = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setenv("PYRO_BQN_NATIVE", "0")
        torch.manual_seed(0)
        act = QuantizedActivation(levels=learnable([-1.0, 1.0] if symmetric else [-0.5, 2.0]))
        act = act.double()
        x = Moments(mean.clone().requires_grad_(), var.clone().requires_grad_())
        out = act(x)
        # Learnable values carry no constant second moment, even when symmetric.
        assert out.constant_second_moment is None
        loss = (out.mean * torch.linspace(-1, 1, 30)).sum() + out.var.square().sum()
        params = (act.levels.first, act.levels.raw_gaps, x.mean, x.var)
        grads.append(torch.autograd.grad(loss, params))
    assert all((g != 0).any() for g in grads[0][:2])
    _assert_all_close(*grads, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "bad_mean, bad_var",
    [(float("nan"), 1.0), (float("inf"), 1.0), (-float("inf"), 0.0), (0.5, float("inf"))],
)
def test_non_finite_inputs_give_the_torch_answer(implementation, dtype, bad_mean, bad_var):
    # The kernel assumes finite values (-ffast-math); it reports such inputs and the torch
    # formulas give the answer, NaN or not.
    mean, var = _moment_inputs((40,), dtype, seed=14)
    mean[17], var[17] = bad_mean, bad_var
    values, thresholds = _values(dtype, asymmetric=True)
    got = _outputs_and_gradients(quantized_activation_moments, mean, var, values, thresholds)
    expected = _outputs_and_gradients(_reference, mean, var, values, thresholds)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_levels_give_the_torch_answer(native_only, dtype):
    mean, var = _moment_inputs((10,), dtype, seed=15)
    values = torch.tensor([-float("inf"), 1.0], dtype=dtype)
    thresholds = torch.tensor([0.0], dtype=dtype)
    got = quantized_activation_moments(mean, var, values, thresholds)
    expected = _reference(mean, var, values, thresholds)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite_and_match(implementation, dtype):
    tiny = torch.finfo(dtype).tiny
    big = 1e30 if dtype == torch.float32 else 1e200
    # Zero and tiny variances (the floor), scores far beyond the clip, huge variances, and
    # scores between the kernel's erfc/exp cuts and the clip.
    mean = [0.0, 1e-3, -1e-3, 50.0, -50.0, big, -big, 5.0, 5.0, 13.5, 38.0]
    var = [0.0, 0.0, 0.0, 0.0, 1e-30, 1.0, tiny, 1e-38, big, 1.0, 1.0]
    mean, var = torch.tensor(mean, dtype=dtype), torch.tensor(var, dtype=dtype)
    for asymmetric in (False, True):
        values, thresholds = _values(dtype, asymmetric)
        got = _outputs_and_gradients(quantized_activation_moments, mean, var, values, thresholds)
        assert all(torch.isfinite(x).all() for x in got)
        assert (got[1] >= 0).all()
        expected = _outputs_and_gradients(_reference, mean, var, values, thresholds)
        _assert_all_close(got, expected, dtype)


def test_chunked_native_run_matches_one_thread(native_only, monkeypatch):
    mean, var = _moment_inputs((1000,), torch.float64, seed=16)
    values, thresholds = _values(torch.float64, asymmetric=True)
    values.requires_grad_()
    args = (quantized_activation_moments, mean, var, values, thresholds)
    single = _outputs_and_gradients(*args)
    monkeypatch.setattr(native, "MIN_RANGE", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert len(native.ranges(1000)) == 3
    chunked = _outputs_and_gradients(*args)
    for a, b in zip(single, chunked, strict=True):
        # Elementwise kernels: the same numbers whichever thread computes them; the sums
        # for the levels run in torch and may round differently.
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-14)


def test_two_valued_second_derivatives_are_refused(native_only):
    mean = torch.randn(6, dtype=torch.float64, requires_grad=True)
    var = torch.ones(6, dtype=torch.float64)
    values, thresholds = _values(torch.float64, asymmetric=False)
    out_mean, _ = quantized_activation_moments(mean, var, values, thresholds)
    (grad,) = torch.autograd.grad(out_mean.sum(), mean, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad.square().sum(), mean)


def test_non_contiguous_inputs_use_the_torch_formulas(native_only):
    mean, var = _moment_inputs((8, 6), torch.float64, seed=17)
    values, thresholds = _values(torch.float64, asymmetric=True)
    got = quantized_activation_moments(mean.t(), var.t(), values, thresholds)
    expected = _reference(mean.t(), var.t(), values, thresholds)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- The constant second moment of symmetric two-valued activations -----------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_symmetric_pair_has_a_constant_second_moment(implementation, dtype, scale):
    act = (Sign() if scale == 1.0 else QuantizedActivation(values=[-scale, scale])).to(dtype)
    mean, var = _moment_inputs((4, 9), dtype, seed=18)
    out = act(Moments(mean, var))
    constant = out.constant_second_moment
    assert constant is not None and constant.dim() == 0 and constant.dtype == dtype
    assert constant.item() == scale**2
    # E[a^2] = Var[a] + E[a]^2 entry by entry.
    expected = (out.var + out.mean.square()).to(torch.float64)
    torch.testing.assert_close(out.second_moment.to(torch.float64), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize(
    "act",
    [
        QuantizedActivation(values=[-1.0, 2.0]),
        QuantizedActivation(values=[-1.0, 1.0001]),
        QuantizedActivation(levels=ternary()),
        QuantizedActivation(levels=learnable([-1.0, 1.0])),
    ],
    ids=["asymmetric", "nearly-symmetric", "three-values", "learnable"],
)
def test_other_activations_have_no_constant_second_moment(act):
    mean, var = _moment_inputs((3, 5), torch.float32, seed=19)
    assert act(Moments(mean, var)).constant_second_moment is None


def test_the_symmetry_check_follows_the_current_values():
    # The check runs on every call: values changed after construction (a loaded state, or
    # learnable values that drift, which are near-symmetric at best) are seen.
    act = QuantizedActivation(values=[-1.0, 1.0])
    mean, var = _moment_inputs((3, 5), torch.float32, seed=20)
    assert act(Moments(mean, var)).constant_second_moment.item() == 1.0
    act.load_state_dict({"levels._values": torch.tensor([-1.0, 1.5])})
    assert act(Moments(mean, var)).constant_second_moment is None
    act.load_state_dict({"levels._values": torch.tensor([-1.5, 1.5])})
    assert act(Moments(mean, var)).constant_second_moment.item() == 2.25
    learned = QuantizedActivation(levels=learnable([-1.0, 1.0]))
    with torch.no_grad():  # values that do not require grad, as in evaluation
        assert learned(Moments(mean, var)).constant_second_moment is None


# --- learned thresholds (partitions) -------------------------------------------------------

Z_MC = 5.0  # tolerance in standard errors


def _activation_inputs(num_values, seed):
    gen = torch.Generator().manual_seed(seed)
    values = _sorted_distinct(gen, num_values, -1.0, 2.0)
    thresholds = _sorted_distinct(gen, num_values - 1, -1.5, 1.5)
    mean = 1.5 * torch.randn(4, generator=gen, dtype=torch.float64)
    var = 0.05 + torch.rand(4, generator=gen, dtype=torch.float64)
    return values, thresholds, mean, var


def _first_and_second_moments(mean, var, values, thresholds):
    out_mean, out_var = quantized_activation_moments(mean, var, values, thresholds)
    return out_mean, out_var + out_mean.square()


@settings(max_examples=15, deadline=None)
@given(num_values=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_threshold_gradients_match_finite_differences(num_values, seed):
    values, thresholds, mean, var = _activation_inputs(num_values, seed)
    thresholds.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: quantized_activation_moments(mean, var, values, t), (thresholds,)
    )


@settings(max_examples=8, deadline=None)
@given(num_values=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_threshold_gradients_match_monte_carlo(num_values, seed):
    """``d E[a]/d t_j`` and ``d E[a^2]/d t_j`` against Monte Carlo central differences on
    common samples ``h``: only samples within ``delta`` of ``t_j`` change, so the estimate
    is a band count. The tolerance is ``Z`` standard errors of its mean, plus the exact
    central-difference bias of the moment rule itself, plus the rare-event slack: a band of
    probability below 10 / S may hold no sample, which moves the estimate by at most
    ``jump * 10 / (S * 2 delta)``."""
    values, thresholds, mean, var = _activation_inputs(num_values, seed)
    num_samples, delta = 100_000, 0.02
    gen = torch.Generator().manual_seed(seed + 1)
    h = mean + var.sqrt() * torch.randn(num_samples, 4, generator=gen, dtype=torch.float64)
    t = thresholds.clone().requires_grad_()
    analytic = _first_and_second_moments(mean, var, values, t)
    for j in range(num_values - 1):
        step = torch.zeros_like(thresholds)
        step[j] = delta

        def outputs(shift, samples=h):
            index = torch.bucketize(samples, thresholds + shift, right=True)
            return values[index], values[index].square()

        upper, lower = outputs(step), outputs(-step)
        exact_upper = _first_and_second_moments(mean, var, values, thresholds + step)
        exact_lower = _first_and_second_moments(mean, var, values, thresholds - step)
        for k in range(2):
            (gradient,) = torch.autograd.grad(analytic[k].sum(), t, retain_graph=True)
            derivative = torch.stack([
                torch.autograd.grad(analytic[k][i], t, retain_graph=True)[0][j]
                for i in range(4)
            ])
            assert torch.allclose(derivative.sum(), gradient[j])
            estimate = (upper[k] - lower[k]) / (2 * delta)
            bias = ((exact_upper[k] - exact_lower[k]) / (2 * delta) - derivative).abs()
            jump = (values[j + 1] ** (k + 1) - values[j] ** (k + 1)).abs()
            slack = jump * 10 / (num_samples * 2 * delta)
            tol = Z_MC * estimate.std(0) / num_samples**0.5 + bias + slack
            assert ((estimate.mean(0) - derivative).abs() <= tol).all(), (j, k)


def test_learned_thresholds_start_at_the_given_or_midpoint_values():
    level_set = uniform(2)
    act = QuantizedActivation(level_set, learn_thresholds=True)
    torch.testing.assert_close(act.thresholds.detach(), level_set.thresholds)
    given_thresholds = QuantizedActivation(level_set, thresholds=[-0.5, 0.1, 0.2],
                                           learn_thresholds=True)
    torch.testing.assert_close(given_thresholds.thresholds.detach(),
                               torch.tensor([-0.5, 0.1, 0.2]))
    names = {name for name, _ in given_thresholds.named_parameters()}
    assert names == {"learned_thresholds.first", "learned_thresholds.raw_gaps"}
    assert QuantizedActivation(level_set).learned_thresholds is None


def test_learned_thresholds_are_model_parameters_that_learn():
    import pyro
    from pyro.infer import SVI
    from pyro.nn import PyroModule

    from pyro_bqn.distributions import MomentNormal
    from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO

    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.act = QuantizedActivation(learnable([-1.0, 0.0, 1.0, 2.0]),
                                           learn_thresholds=True)

        def forward(self, x, y=None):
            # x are the moments of an input; the target is a step at other thresholds.
            out = self.act(Moments(x, torch.full_like(x, 0.01)))
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", MomentNormal(out, 0.1), obs=y)

    x = torch.linspace(-3.0, 3.0, 200)
    y = torch.tensor([-1.0, 0.0, 1.0, 2.0])[torch.bucketize(x, torch.tensor([-1.2, 0.9, 1.4]),
                                                            right=True)]
    model = Model()
    before = model.act.thresholds.detach().clone()
    svi = SVI(model, AutoQuantizedGuide(model), pyro.optim.Adam({"lr": 0.05}),
              DeterministicELBO())
    for _ in range(100):
        svi.step(x, y)
    assert "act.learned_thresholds.first" in pyro.get_param_store()
    learned = model.act.thresholds.detach()
    torch.testing.assert_close(learned, torch.tensor([-1.2, 0.9, 1.4]), atol=0.1, rtol=0.0)
    assert not torch.allclose(learned, before, atol=0.1)


def test_tensor_mode_uses_learned_thresholds_without_a_gradient_for_them():
    act = QuantizedActivation(values=[-1.0, 0.0, 1.0], thresholds=[-0.2, 0.7],
                              learn_thresholds=True)
    x = torch.tensor([-0.3, -0.2, 0.6, 0.7], requires_grad=True)
    out = act(x)
    assert torch.equal(out.detach(), torch.tensor([-1.0, 0.0, 0.0, 1.0]))
    out.sum().backward()
    assert act.learned_thresholds.first.grad is None


# --- dtypes, the operator's argument checks, the variance floor ------------------------------


def test_values_and_thresholds_are_checked_and_stored_in_the_default_dtype():
    # Like the parameters of a torch module: .double() / .to() choose the precision.
    act = QuantizedActivation(values=torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64),
                              thresholds=torch.tensor([-0.5, 1.0], dtype=torch.float64))
    default = torch.get_default_dtype()
    assert act.values.dtype == act.thresholds.dtype == default
    assert all(t.dtype == default for t in act.state_dict().values())
    # Distinct in float64, equal in float32: refused, naming the argument.
    close = torch.tensor([-1.0, 1.0, 1.0 + 1e-9], dtype=torch.float64)
    with pytest.raises(ValueError, match="values must not contain duplicate values"):
        QuantizedActivation(values=close)
    with pytest.raises(ValueError, match="thresholds must be sorted in strictly increasing"):
        QuantizedActivation(values=[-1.0, 0.0, 1.0, 2.0], thresholds=close)


@pytest.mark.parametrize("levels", [[-1.0, 1.0], [-1.0, 0.0, 2.0]], ids=["two", "three"])
@pytest.mark.parametrize("module_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64])
def test_outputs_have_the_input_dtype(levels, module_dtype, input_dtype):
    act = QuantizedActivation(values=levels).to(module_dtype)
    mean, var = _moment_inputs((3, 5), input_dtype, seed=21)
    out = act(Moments(mean, var))
    assert out.mean.dtype == out.var.dtype == input_dtype
    assert act(mean).dtype == input_dtype


def test_levels_of_another_dtype_are_converted_to_the_inputs():
    mean, var = _moment_inputs((4, 6), torch.float64, seed=22)
    values, thresholds = _values(torch.float32, asymmetric=True)
    got = quantized_activation_moments(mean, var, values, thresholds)
    expected = _reference(mean, var, values.double(), thresholds.double())
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "position, dtype",
    [(1, torch.float32), (2, torch.float32), (3, torch.float32), (0, torch.int64)],
    ids=["var", "values", "thresholds", "integer-mean"],
)
def test_operator_refuses_tensors_of_mixed_or_integer_dtypes(position, dtype):
    mean, var = _moment_inputs((5,), torch.float64, seed=23)
    arguments = [mean, var, *_values(torch.float64, asymmetric=True)]
    arguments[position] = arguments[position].to(dtype)
    if dtype == torch.int64:  # all integer: one dtype, but not floating point
        arguments = [t.to(dtype) for t in arguments]
    with pytest.raises(ValueError, match="floating-point tensors of one dtype"):
        torch.ops.pyro_bqn.two_valued_moments(*arguments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_at_the_variance_floor_are_autograds(implementation, dtype):
    # A variance exactly at the floor is not cut: the gradient of var is autograd's for the
    # torch formulas (clamp_min passes the gradient where var >= floor).
    floor = variance_floor(dtype)
    mean = torch.tensor([-1.5, -0.3, 0.2, 1.0], dtype=dtype) * floor**0.5
    var = torch.full((4,), floor, dtype=dtype)
    values, thresholds = _values(dtype, asymmetric=False)
    got = _outputs_and_gradients(quantized_activation_moments, mean, var, values, thresholds)
    expected = _outputs_and_gradients(_reference, mean, var, values, thresholds)
    assert (got[3] != 0).all()
    _assert_all_close(got, expected, dtype)


def test_each_implementation_computes_where_it_says(implementation):
    # The operator's third output flags a kernel computation; the torch case must not run it.
    mean, var = _moment_inputs((3, 4), torch.float64, seed=24)
    levels = _values(torch.float64, asymmetric=True)
    _, _, by_kernel = torch.ops.pyro_bqn.two_valued_moments(mean, var, *levels)
    assert by_kernel.item() == (implementation == "native")
