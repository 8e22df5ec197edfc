import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI
from pyro.nn import PyroModule

from pyro_bqn.distributions import (
    MomentCategorical,
    MomentNormal,
    MultipleSpikeAndSlab,
    QuantizedCategorical,
)
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.levels import binary, learnable, ternary, uniform
from pyro_bqn.moments import Moments, SiteMoments
from pyro_bqn.nn.gaussian import normal_cdf
from pyro_bqn.nn.quantized_conv import QuantizedConv2d
from pyro_bqn.nn.quantized_layer import QuantizedLayer, add_bias, propagate
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from pyro_bqn.priors import SpikeAndSlabPrior, base_distribution
from tests.infer.models import linear_classes
from tests.mc import assert_mean_var_match

LEVEL_SETS = {"binary": binary, "ternary": ternary, "2bit": lambda: uniform(2)}
NUM_SAMPLES = 10_000


def _weight_posterior(levels, shape, generator):
    logits = torch.randn(*shape, levels.num_levels, generator=generator, dtype=torch.float64)
    return QuantizedCategorical(levels.values.double(), logits=logits)


def _check_against_mc(op, x_shape, w_shape, levels, input_random, seed, sampled_op=None):
    """``sampled_op(xs, ws)`` applies ``op`` to a leading sample dimension at once."""
    gen = torch.Generator().manual_seed(seed)
    q = _weight_posterior(levels, w_shape, gen)
    x_mean = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    x_var = torch.rand(x_shape, generator=gen, dtype=torch.float64) if input_random else None
    x = Moments(x_mean, x_var) if input_random else x_mean
    out = propagate(op, x, SiteMoments(q.mean, q.variance))

    torch.manual_seed(seed)
    w = q.sample((NUM_SAMPLES,))
    xs = x_mean.expand((NUM_SAMPLES,) + x_shape)
    if input_random:
        xs = xs + x_var.sqrt() * torch.randn_like(xs)
    if sampled_op is None:
        samples = torch.stack([op(xi, wi) for xi, wi in zip(xs, w, strict=True)])
    else:
        samples = sampled_op(xs, w)
    # The standard error of a sample variance, sqrt((m4 - var^2) / S), vanishes for a
    # two-valued output with equal weights (one binary weight times a fixed input, at a
    # convolution's border), where terms of order var / S (the estimate's bias among them)
    # remain: they are allowed for.
    assert_mean_var_match(samples, out.mean, out.var, atol=5 * out.var.max().item() / NUM_SAMPLES)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    fan_in=st.integers(1, 6),
    fan_out=st.integers(1, 4),
    levels=st.sampled_from(sorted(LEVEL_SETS)),
    input_random=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_moments_match_monte_carlo(batch, fan_in, fan_out, levels, input_random, seed):
    _check_against_mc(
        F.linear,
        (batch, fan_in),
        (fan_out, fan_in),
        LEVEL_SETS[levels](),
        input_random,
        seed,
        sampled_op=lambda xs, ws: torch.einsum("sbi,soi->sbo", xs, ws),
    )


@settings(max_examples=4, deadline=None)
@given(
    channels=st.integers(1, 2),
    kernel=st.integers(1, 2),
    levels=st.sampled_from(sorted(LEVEL_SETS)),
    input_random=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_moments_match_monte_carlo(channels, kernel, levels, input_random, seed):
    _check_against_mc(
        lambda x, w: F.conv2d(x, w, padding=1),
        (1, channels, 3, 3),
        (2, channels, kernel, kernel),
        LEVEL_SETS[levels](),
        input_random,
        seed,
    )


def _pm_one_inputs(shape, generator, dtype=torch.float64):
    """Moments of +-1 activations (as Sign emits): mean m, variance 1 - m^2, E[x^2] = 1."""
    mean = 2 * torch.rand(shape, generator=generator, dtype=dtype) - 1
    return Moments(mean, 1 - mean.square(), second_moment=torch.ones((), dtype=dtype))


@pytest.mark.parametrize(
    "op, x_shape, w_shape",
    [
        (F.linear, (5, 7), (4, 7)),
        (F.linear, (2, 3, 7), (4, 7)),
        (lambda x, w: F.conv2d(x, w, padding=1), (3, 2, 4, 4), (5, 2, 3, 3)),
    ],
)
def test_constant_second_moment_inputs_match_the_general_rule(op, x_shape, w_shape):
    gen = torch.Generator().manual_seed(0)
    x = _pm_one_inputs(x_shape, gen)
    w = _weight_posterior(ternary(), w_shape, gen)
    weight = SiteMoments(w.mean, w.variance)
    feature_dims = len(x_shape) - 1 if len(w_shape) == 4 else 1
    fast = propagate(op, x, weight, feature_dims=feature_dims)
    general = propagate(op, Moments(x.mean, x.var), weight)
    torch.testing.assert_close(fast.mean, general.mean)
    torch.testing.assert_close(fast.var, general.var, rtol=1e-10, atol=1e-12)


def test_constant_second_moment_keeps_the_variance_of_confident_units_in_float32():
    # Sign units with |z| = 6 have means that round to +-1 in float32 and variances ~1e-9
    # that only x.var holds; with near-certain weights the output variance is tiny. Writing
    # m^2 = c - s keeps every term non-negative, so float32 keeps it to rounding.
    gen = torch.Generator().manual_seed(1)
    z = 6 * torch.sign(torch.randn(32, 1024, generator=gen, dtype=torch.float64))
    mean, var = torch.erf(z / 2**0.5), 4 * normal_cdf(z) * normal_cdf(-z)
    logits = torch.full((128, 1024, 3), -18.0, dtype=torch.float64)
    logits.scatter_(-1, torch.randint(0, 3, (128, 1024, 1), generator=gen), 0.0)
    w = QuantizedCategorical(ternary().values.double(), logits=logits)
    general = propagate(F.linear, Moments(mean, var), SiteMoments(w.mean, w.variance))
    single = Moments(mean.float(), var.float(), second_moment=torch.ones(()))
    weight = SiteMoments(w.mean.float(), w.variance.float())
    fast = propagate(F.linear, single, weight, feature_dims=1)
    torch.testing.assert_close(fast.var.double(), general.var, rtol=1e-4, atol=0.0)


def test_constant_second_moment_needs_the_example_layout():
    # Without feature_dims (a caller that predates it) the general rule runs, for any op.
    gen = torch.Generator().manual_seed(2)
    x = _pm_one_inputs((2, 3, 5, 5), gen)
    w = _weight_posterior(ternary(), (4, 3, 3, 3), gen)
    weight = SiteMoments(w.mean, w.variance)
    out = propagate(lambda a, b: F.conv2d(a, b, padding=1), x, weight)
    general = propagate(lambda a, b: F.conv2d(a, b, padding=1), Moments(x.mean, x.var), weight)
    torch.testing.assert_close(out.var, general.var)


def test_fixed_input_and_weights_give_a_plain_tensor():
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    out = propagate(F.linear, x, w)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, F.linear(x, w))


def test_fixed_weights_propagate_input_variance():
    x, w = Moments(torch.randn(4, 3), torch.rand(4, 3)), torch.randn(2, 3)
    out = propagate(F.linear, x, w)
    torch.testing.assert_close(out.mean, F.linear(x.mean, w))
    torch.testing.assert_close(out.var, F.linear(x.var, w.square()))


def test_linear_layer_is_ordinary_under_fixed_weights():
    pyro.set_rng_seed(0)
    layer = QuantizedLinear(3, 2)
    weight, bias = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]), torch.tensor([0.5, -0.5])
    x = torch.randn(5, 3)
    out = pyro.poutine.condition(layer, data={"weight": weight, "bias": bias})(x)
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def test_conv_layer_is_ordinary_under_fixed_weights():
    layer = QuantizedConv2d(2, 3, 3, padding=1, bias=False)
    weight = ternary().values[torch.randint(0, 3, (3, 2, 3, 3))]
    x = torch.randn(1, 2, 5, 5)
    out = pyro.poutine.condition(layer, data={"weight": weight})(x)
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=1))


def test_layer_samples_weights_on_the_levels():
    layer = QuantizedLinear(4, 3, levels=uniform(2))
    trace = pyro.poutine.trace(layer).get_trace(torch.randn(2, 4))
    weight = trace.nodes["weight"]["value"]
    assert weight.shape == (3, 4)
    assert torch.isin(weight, uniform(2).values).all()


def test_prior_levels_must_match_layer_levels():
    prior = QuantizedCategorical(binary(), probs=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="prior levels .* differ from the layer's levels"):
        QuantizedLinear(3, 2, levels=ternary(), prior=prior)


def test_prior_levels_are_used_when_levels_are_omitted():
    prior = QuantizedCategorical(binary(), probs=torch.tensor([0.3, 0.7]))
    layer = QuantizedLinear(3, 2, prior=prior)
    assert torch.equal(layer.levels.values, binary().values)


def test_prior_must_be_over_levels():
    with pytest.raises(ValueError, match="distribution over levels"):
        QuantizedLinear(3, 2, prior=pyro.distributions.Normal(0.0, 1.0))


def test_wrong_input_shapes_are_named():
    with pytest.raises(ValueError, match="in_features=3"):
        QuantizedLinear(3, 2)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="in_channels=2"):
        QuantizedConv2d(2, 3, 3)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="divisible by groups"):
        QuantizedConv2d(3, 4, 3, groups=2)


# --- priors from the current levels; learnable levels as model parameters -------------------


class OneLayer(PyroModule):
    """``QuantizedLinear(4, 2)`` with the given levels and prior, categorical likelihood."""

    def __init__(self, levels=None, prior=None):
        super().__init__()
        self.fc = QuantizedLinear(4, 2, levels=levels, prior=prior)

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def _spike_and_slab_model():
    level_set = learnable([-1.0, -0.2, 0.4, 1.2])
    prior = MultipleSpikeAndSlab.with_uniform_spikes(level_set, 0.1, 1.0)
    return OneLayer(level_set, prior), level_set


def _site_prior(model, x, name="fc.weight"):
    trace = pyro.poutine.trace(model).get_trace(x)
    return base_distribution(trace.nodes[name]["fn"]), trace


@pytest.mark.filterwarnings("ignore::pyro_bqn.distributions.InertPriorWarning")
def test_learnable_levels_with_a_given_prior_are_model_parameters_that_learn():
    # Issue 12: with an explicit prior only the guide read the levels, outside the model's
    # module context, so they never reached the param store and never moved.
    x, y = linear_classes(64, 4, 2, seed=3)
    model, level_set = _spike_and_slab_model()
    init = level_set.values.detach().clone()
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    for _ in range(20):
        svi.step(x, y)
    store = pyro.get_param_store()
    assert {"fc.levels.first", "fc.levels.raw_gaps"} <= set(store.keys())
    assert store["fc.levels.first"] is level_set.first
    learned = level_set.values.detach()
    assert not torch.allclose(learned, init, atol=1e-2), learned


@pytest.mark.filterwarnings("ignore::pyro_bqn.distributions.InertPriorWarning")
def test_the_prior_is_built_from_the_levels_as_they_are_now():
    # Issue 12: the prior kept a copy of the levels made at construction, so the KL refused
    # the first step after they moved ("needs both distributions on the same levels").
    x, y = linear_classes(16, 4, 2, seed=3)
    model, level_set = _spike_and_slab_model()
    guide = AutoQuantizedGuide(model)
    guide(x, y)
    with torch.no_grad():
        level_set.first.sub_(0.5)
        level_set.raw_gaps.add_(0.2)
    loss = DeterministicELBO().loss(model, guide, x, y)
    assert math.isfinite(loss)
    prior, _ = _site_prior(model, x)
    assert prior.level_set is level_set
    assert torch.equal(prior.levels.detach(), level_set.values.detach())
    # The prior's weights are the given distribution's.
    torch.testing.assert_close(prior.spike_probs, torch.full((2, 4, 4), 0.225))


def test_a_subclass_overrides_the_weight_prior():
    # Issue 12: the weight's PyroSample was bound to QuantizedLayer._weight_prior itself.
    class SparseLinear(QuantizedLinear):
        def __init__(self, *args, zero_mass, **kwargs):
            super().__init__(*args, **kwargs)
            self.zero_mass = zero_mass  # set after the base class: checked at the call

        def weight_prior(self, levels):
            probs = torch.full((3,), (1 - self.zero_mass) / 2)
            probs[1] = self.zero_mass
            return QuantizedCategorical(levels, probs=probs)

    layer = SparseLinear(4, 2, zero_mass=0.8)
    prior, _ = _site_prior(layer, torch.randn(3, 4), "weight")
    torch.testing.assert_close(prior.probs, torch.tensor([0.1, 0.8, 0.1]).expand(2, 4, 3))


def test_an_override_may_give_each_output_its_own_prior():
    class RowPriors(QuantizedLinear):
        def weight_prior(self, levels):
            slab = torch.tensor([[0.05], [0.3]])
            return MultipleSpikeAndSlab.with_uniform_spikes(levels, slab, 1.0)

    layer = RowPriors(4, 2, levels=uniform(2))
    prior, trace = _site_prior(layer, torch.randn(3, 4), "weight")
    assert prior.batch_shape == (2, 4)
    torch.testing.assert_close(prior.slab_prob[:, 0], torch.tensor([0.05, 0.3]))
    assert trace.nodes["weight"]["fn"].event_shape == (2, 4)


@pytest.mark.parametrize(
    "override, match",
    [
        (lambda self, levels: pyro.distributions.Normal(0.0, 1.0),
         r"^Custom\.weight_prior must return a distribution over levels"),
        (lambda self, levels: QuantizedCategorical(levels, logits=torch.zeros(3, 3, 3)),
         r"^Custom\.weight_prior .* broadcasts to the weight shape \(2, 4\)"),
        (lambda self, levels: QuantizedCategorical(levels.values, logits=torch.zeros(3)),
         r"^Custom\.weight_prior must build the prior on the layer's level set itself"),
    ],
    ids=["not-levels", "batch-shape", "copy-of-learnable-values"],
)
def test_a_prior_that_does_not_fit_is_refused_at_the_call(override, match):
    layer_type = type("Custom", (QuantizedLinear,), {"weight_prior": override})
    layer = layer_type(4, 2, levels=learnable([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(3, 4))


def test_a_prior_on_equal_fixed_values_is_accepted_and_other_values_refused():
    layer_type = type("Custom", (QuantizedLinear,), {
        "weight_prior": lambda self, levels: QuantizedCategorical(
            torch.tensor([-1.0, 0.0, 1.0]), logits=torch.zeros(3))})
    assert layer_type(4, 2)(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(ValueError, match="differ from the layer's levels"):
        layer_type(4, 2, levels=[-1.0, 0.5, 1.0])(torch.randn(3, 4))


def test_a_prior_factory_is_called_with_the_layers_levels():
    level_set = learnable([-1.0, 0.0, 0.5, 2.0])
    layer = QuantizedLinear(4, 2, levels=level_set,
                            prior=SpikeAndSlabPrior(slab_prob=0.2, slab_scale=3.0,
                                                    spike_scale=0.01))
    assert layer.prior == SpikeAndSlabPrior(0.2, 3.0, 0.01)
    prior, _ = _site_prior(layer, torch.randn(3, 4), "weight")
    assert isinstance(prior, MultipleSpikeAndSlab) and prior.level_set is level_set
    assert prior.slab_scale[0, 0].item() == 3.0
    with pytest.raises(ValueError, match="must be non-negative and sum to one"):
        QuantizedLinear(4, 2, levels=level_set,
                        prior=lambda levels: MultipleSpikeAndSlab.with_uniform_spikes(
                            levels, 1.5, 1.0))


@pytest.mark.parametrize("prior", [None, "distribution", "factory"])
def test_priors_follow_the_layers_dtype(prior):
    # Issue 12: the bias prior was built on the CPU, in the default dtype, at construction;
    # model.to(...) now moves every prior, since they are built from the layer's tensors.
    ternary_levels = ternary()
    given = {
        None: None,
        "distribution": QuantizedCategorical(ternary_levels, probs=torch.tensor([0.2, 0.5, 0.3])),
        "factory": SpikeAndSlabPrior(0.1, 1.0, 0.02),
    }[prior]
    layer = QuantizedConv2d(2, 3, 3, levels=ternary_levels, prior=given).double()
    trace = pyro.poutine.trace(layer).get_trace(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    for name in ("weight", "bias"):
        fn = trace.nodes[name]["fn"]
        assert fn.mean.dtype == torch.float64, name
        assert trace.nodes[name]["value"].dtype == torch.float64, name
    assert trace.nodes["bias"]["fn"].event_shape == (3,)


def test_learned_asymmetric_levels_beat_fixed_uniform_levels():
    # Weights on asymmetric levels: uniform 2-bit levels cannot represent them, learnable
    # levels starting there move towards them and the loss drops below the fixed levels'.
    gen = torch.Generator().manual_seed(0)
    true_levels = torch.tensor([-0.3, 0.1, 0.5, 2.0])
    w = true_levels[torch.arange(12) % 4]
    x = torch.randn(256, 12, generator=gen)
    y = x @ w + 0.05 * torch.randn(256, generator=gen)

    class Regression(PyroModule):
        def __init__(self, levels):
            super().__init__()
            self.fc = QuantizedLinear(12, 1, levels=levels, bias=False)

        def forward(self, x, y=None):
            loc = self.fc(x)[..., 0]
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", MomentNormal(loc, 0.1), obs=y)

    final = {}
    for name, level_set in (("fixed", uniform(2)), ("learnable", learnable(uniform(2).values))):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = Regression(level_set)
        guide = AutoQuantizedGuide(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), DeterministicELBO())
        final[name] = [svi.step(x, y) for _ in range(150)][-1]
    # The fixed levels have settled (their loss changes by ~1% over the last 30 steps).
    assert final["learnable"] < 0.25 * final["fixed"], final
    learned = level_set.values.detach()
    assert learned[-1] > 1.5  # the level that 2.0 needs
    assert (learned.diff() > 0).all()


# --- what a layer computes with, and its arguments ------------------------------------------


def _recording(op, first_shapes):
    """``op``, noting the shape of its first argument at each call."""

    def recorded(x, w):
        first_shapes.append(tuple(x.shape))
        return op(x, w)

    return recorded


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_constant_second_moment_saves_a_product_over_the_batch(kind, monkeypatch):
    # propagate's rule for E[x^2] = c: the mean and op(s, E[W]^2) over the batch, and
    # op(1, Var[W]) on a single example of ones, in place of a third product over the batch.
    gen = torch.Generator().manual_seed(5)
    shapes = []
    if kind == "linear":
        layer = QuantizedLinear(7, 4, levels=ternary(), bias=False)
        x_shape, w_shape = (5, 7), (4, 7)
        monkeypatch.setattr(F, "linear", _recording(F.linear, shapes))
        plain = F.linear
    else:
        layer = QuantizedConv2d(2, 3, 3, padding=1, levels=ternary(), bias=False)
        x_shape, w_shape = (4, 2, 5, 5), (3, 2, 3, 3)
        plain = layer._conv
        layer._conv = _recording(layer._conv, shapes)
    x = _pm_one_inputs(x_shape, gen)
    w = _weight_posterior(ternary(), w_shape, gen)
    weight = SiteMoments(w.mean, w.variance)
    out = pyro.poutine.condition(layer.double(), data={"weight": weight})(x)
    assert shapes == [x_shape, x_shape[1:], x_shape]
    shapes.clear()
    # The general rule, by hand: op(m^2, Var[W]) + op(s, E[W^2]).
    expected = plain(x.mean.square(), w.variance) + plain(x.var, w.variance + w.mean.square())
    torch.testing.assert_close(out.mean, plain(x.mean, w.mean))
    torch.testing.assert_close(out.var, expected, rtol=1e-10, atol=1e-12)


def test_a_constant_second_moment_with_fixed_weights_uses_the_general_rule():
    gen = torch.Generator().manual_seed(6)
    x = _pm_one_inputs((5, 7), gen)
    w = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    out = propagate(F.linear, x, w, feature_dims=1)
    torch.testing.assert_close(out.var, F.linear(x.var, w.square()))


def test_a_sampled_network_propagates_input_moments():
    # Fixed weight and bias (drawn, or the most probable network) on moment inputs.
    layer = QuantizedLinear(3, 2)
    weight, bias = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]), torch.tensor([0.5, -0.5])
    x = Moments(torch.randn(5, 3), torch.rand(5, 3))
    out = pyro.poutine.condition(layer, data={"weight": weight, "bias": bias})(x)
    assert isinstance(out, Moments)
    torch.testing.assert_close(out.mean, F.linear(x.mean, weight, bias))
    torch.testing.assert_close(out.var, F.linear(x.var, weight.square()))


def test_a_moment_bias_adds_its_variance_to_a_fixed_output():
    y = torch.randn(4, 3, 2, 2)
    b_mean, b_var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.2, 0.3])
    out = add_bias(y, SiteMoments(b_mean, b_var), (3, 1, 1))
    torch.testing.assert_close(out.mean, y + b_mean.view(3, 1, 1))
    torch.testing.assert_close(out.var, b_var.view(3, 1, 1).expand(4, 3, 2, 2))


@pytest.mark.parametrize("shape", [(3,), (2, 5, 3)], ids=["one-example", "two-batch-dims"])
def test_linear_layer_takes_any_leading_dimensions(shape):
    layer = QuantizedLinear(3, 2)
    weight, bias = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]), torch.tensor([0.5, -0.5])
    x = torch.randn(shape)
    out = pyro.poutine.condition(layer, data={"weight": weight, "bias": bias})(x)
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def _bias_scale(layer, x):
    trace = pyro.poutine.trace(layer).get_trace(x)
    return trace.nodes["bias"]["fn"].base_dist.scale


def test_bias_prior_scale_reaches_the_bias_prior():
    assert torch.equal(_bias_scale(QuantizedLinear(3, 2), torch.randn(4, 3)), torch.ones(2))
    layer = QuantizedLinear(3, 2, bias_prior_scale=2.5)
    assert torch.equal(_bias_scale(layer, torch.randn(4, 3)), torch.full((2,), 2.5))
    conv = QuantizedConv2d(1, 2, 3, bias_prior_scale=0.5)
    assert torch.equal(_bias_scale(conv, torch.randn(1, 1, 4, 4)), torch.full((2,), 0.5))


def test_the_base_layer_has_a_bias_with_a_unit_prior_by_default():
    layer = QuantizedLayer((2, 3), 2)
    assert layer.bias.shape == (2,)  # a draw from the bias site
    assert layer.bias_prior_scale == 1.0


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bias_prior_scale_must_be_positive(scale):
    with pytest.raises(ValueError, match="bias_prior_scale must be positive"):
        QuantizedLinear(3, 2, bias_prior_scale=scale)
    QuantizedLinear(3, 2, bias=False, bias_prior_scale=scale)  # no bias: not used


class _OnLevels(pyro.distributions.Categorical):
    """A distribution over levels from outside pyro_bqn: ``levels`` but no ``level_set``."""

    def __init__(self, levels, logits):
        super().__init__(logits=logits)
        self.levels = levels


@pytest.mark.parametrize(
    "build",
    [lambda values: QuantizedCategorical(values, logits=torch.zeros(3)),
     lambda values: _OnLevels(values, torch.zeros(3))],
    ids=["quantized-categorical", "foreign"],
)
def test_a_prior_factory_on_copied_values_is_checked_at_construction(build):
    # A prior on a copy of the (fixed) levels' values is accepted if the values are equal,
    # refused when the layer is built otherwise.
    layer = QuantizedLinear(4, 2, prior=lambda levels: build(levels.values.clone()))
    assert layer.weight_shape == (2, 4)
    with pytest.raises(ValueError, match="differ from the layer's levels"):
        QuantizedLinear(4, 2, prior=lambda levels: build(torch.tensor([-1.0, 0.5, 1.0])))
