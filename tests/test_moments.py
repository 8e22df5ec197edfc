import math
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pyro_bqn.distributions import QuantizedCategorical
from pyro_bqn.levels import ternary
from pyro_bqn.moments import MomentRuleError, Moments, SiteMoments, as_moments, split_moments
from pyro_bqn.nn import QuantizedActivation
from pyro_bqn.nn.quantized_layer import propagate
from tests.mc import assert_mean_var_match


def test_moments_refuse_torch_operations_with_a_hint():
    m = Moments(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(MomentRuleError, match=r"relu.*pyro_bqn.nn.Sign"):
        torch.relu(m)
    with pytest.raises(MomentRuleError, match="linear"):
        torch.nn.Linear(3, 2)(m)


def test_site_moments_carry_shape_but_refuse_arithmetic():
    mean, var = torch.randn(3, 2, requires_grad=True), torch.rand(3, 2)
    w = SiteMoments(mean, var)
    assert w.shape == (3, 2) and w.dim() == 2 and w.dtype == mean.dtype
    assert w.size(1) == 2 and w.size(dim=0) == 3  # metadata ops keep their keyword arguments
    assert split_moments(w)[0] is mean and split_moments(w)[1] is var
    with pytest.raises(MomentRuleError, match="SiteMoments.*linear"):
        F.linear(torch.randn(4, 2), w)
    with pytest.raises(MomentRuleError):
        w + 1
    with pytest.raises(MomentRuleError, match="cannot be pickled"):
        pickle.dumps(w)


def test_moment_helpers():
    x = torch.randn(4)
    assert split_moments(x) == (x, None)
    m = as_moments(x)
    assert torch.equal(m.var, torch.zeros(4))
    var = torch.rand(4)
    assert as_moments(Moments(x, var)).var is var
    pair = Moments(torch.arange(6.0).reshape(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(pair.second_moment, pair.var + pair.mean.square())
    assert pair.reshape(3, 2).shape == (3, 2)
    assert pair[1].shape == (3,)
    assert Moments(torch.zeros(2, 3), torch.ones(())).var.shape == (2, 3)
    with pytest.raises(TypeError, match="two tensors"):
        Moments(torch.zeros(2), 1.0)


# --- the constant second moment E[x^2] = c, with c != 1 ---------------------------------------


def _half_sign_moments(shape, seed):
    """Moments of the activation with values (-0.5, 0.5) on Gaussian pre-activations, and the
    pre-activations' mean and standard deviation (for sampling)."""
    gen = torch.Generator().manual_seed(seed)
    pre_mean = torch.randn(shape, generator=gen, dtype=torch.float64)
    pre_sd = 0.2 + torch.rand(shape, generator=gen, dtype=torch.float64)
    activation = QuantizedActivation(values=torch.tensor([-0.5, 0.5], dtype=torch.float64))
    return activation(Moments(pre_mean, pre_sd.square())), pre_mean, pre_sd, gen


def test_a_symmetric_two_valued_activation_carries_c_equal_to_its_value_squared():
    out, pre_mean, pre_sd, _ = _half_sign_moments((4, 6), 0)
    assert out.constant_second_moment.item() == 0.25
    torch.testing.assert_close(out.second_moment, out.var + out.mean.square())
    # E[a] = 0.5 (P(h >= 0) - P(h < 0)) = 0.5 erf(mu / (sd sqrt 2)); Var[a] = 0.25 - E[a]^2.
    mean = 0.5 * torch.erf(pre_mean / (pre_sd * math.sqrt(2)))
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.var, 0.25 - mean.square())
    # Reshaping, indexing and expanding keep c; a per-entry second moment expands with them.
    assert out.reshape(24).constant_second_moment.item() == 0.25
    assert out[1:3].constant_second_moment.item() == 0.25
    assert out.expand((4, 6)) is out
    assert out[0].expand((2, 6)).constant_second_moment.item() == 0.25
    per_entry = Moments(torch.zeros(1, 3), torch.ones(1, 3), torch.arange(3.0)[None])
    expanded = per_entry.expand((2, 3))
    assert expanded.constant_second_moment is None
    torch.testing.assert_close(expanded.second_moment, torch.arange(3.0).expand(2, 3))
    # Without a stored second moment, E[x^2] = var + mean^2 of the broadcast pair.
    plain = Moments(torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.25, 1.0, 4.0]]))
    expanded = plain.expand((2, 3))
    assert expanded.constant_second_moment is None
    assert torch.equal(expanded.mean, plain.mean.expand(2, 3))
    torch.testing.assert_close(expanded.second_moment, torch.tensor([[1.25, 5.0, 4.25]] * 2))


@pytest.mark.parametrize(
    ("op", "x_shape", "w_shape", "feature_dims"),
    [
        (F.linear, (5, 7), (4, 7), 1),
        (F.linear, (2, 3, 7), (4, 7), 1),
        (lambda x, w: F.conv2d(x, w, padding=1), (3, 2, 4, 4), (5, 2, 3, 3), 3),
    ],
)
def test_propagate_with_c_a_quarter_is_the_general_rule(op, x_shape, w_shape, feature_dims):
    x, *_ = _half_sign_moments(x_shape, 1)
    gen = torch.Generator().manual_seed(2)
    w_mean = torch.randn(w_shape, generator=gen, dtype=torch.float64)
    weight = SiteMoments(w_mean, torch.rand(w_shape, generator=gen, dtype=torch.float64))
    fast = propagate(op, x, weight, feature_dims=feature_dims)
    general = propagate(op, Moments(x.mean, x.var), weight)
    torch.testing.assert_close(fast.mean, general.mean)
    torch.testing.assert_close(fast.var, general.var, rtol=1e-10, atol=1e-12)
    # The rule must use c: with c taken as 1 the variance would differ by op(0.75, Var[W]).
    ones = torch.ones(x_shape[-feature_dims:], dtype=torch.float64)
    missing = 0.75 * op(ones, weight.moments.var)
    assert (missing > 1e-3).all()


def test_half_sign_then_a_quantized_layer_matches_monte_carlo():
    # The path a model takes: QuantizedActivation((-0.5, 0.5)) -> QuantizedLinear (whose
    # forward passes feature_dims=1), checked against S networks sampled end to end.
    num_samples = 40_000
    x, pre_mean, pre_sd, gen = _half_sign_moments((3, 6), 3)
    logits = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    q = QuantizedCategorical(ternary().values.double(), logits=logits)
    out = propagate(F.linear, x, SiteMoments(q.mean, q.variance), feature_dims=1)

    torch.manual_seed(4)
    pre = pre_mean + pre_sd * torch.randn((num_samples, 3, 6), dtype=torch.float64)
    activations = torch.where(pre >= 0, 0.5, -0.5).double()
    weights = q.sample((num_samples,))
    samples = torch.einsum("sni,soi->sno", activations, weights)
    assert_mean_var_match(samples, out.mean, out.var)


# --- what the errors and the container report ---------------------------------------------------


def _reached(func) -> str:
    with pytest.raises(MomentRuleError) as error:
        Moments.__torch_function__(func, (Moments,))
    return str(error.value).split(". ")[0]


def test_the_error_names_the_operation_by_module_and_qualified_name():
    assert _reached(F.softmax) == "Moments reached torch.nn.functional.softmax"
    assert _reached(Moments.reshape) == "Moments reached pyro_bqn.moments.Moments.reshape"
    # Objects that lack one of the names: __name__ stands in for __qualname__, a missing
    # module leaves the bare name, and an object with neither is shown by its repr.
    assert _reached(SimpleNamespace(__name__="op", __module__="ops")) == "Moments reached ops.op"
    assert _reached(SimpleNamespace(__qualname__="Xform", __module__=None)) == (
        "Moments reached Xform"
    )
    anonymous = SimpleNamespace(kind="anonymous")
    assert _reached(anonymous) == f"Moments reached {anonymous!r}"


def test_size_repr_and_attribute_errors():
    pair = Moments(torch.zeros(2, 3), torch.ones(2, 3))
    assert pair.size() == (2, 3) and pair.size(1) == 3 and pair.size(-2) == 2
    assert repr(pair) == "Moments(shape=(2, 3))"
    with pytest.raises(MomentRuleError, match=r"no tensor method \.exp\(\)"):
        pair.exp()
    with pytest.raises(AttributeError, match="no attribute 'not_a_tensor_method'"):
        _ = pair.not_a_tensor_method
    assert hasattr(torch.Tensor, "_version")  # private tensor names are plain misses
    with pytest.raises(AttributeError, match="no attribute '_version'"):
        _ = pair._version
