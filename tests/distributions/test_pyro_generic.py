"""The generic properties Pyro's own distribution suite checks, on all seven pyro_bqn
distributions, each built from its constructor arguments as Pyro builds its own (levels as a
:class:`~pyro_bqn.levels.LevelSet` and as a plain ``(K,)`` tensor, the moment likelihoods on
tensors and on :class:`~pyro_bqn.Moments`): ``infer_shapes``, Pyro's generic ``expand``,
support against ``log_prob``, entropy and moments against samples, ``cdf``/``icdf``,
pickling, masking, ``deep_to`` and the dominating measure of the mixed spike-and-slab."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import pyro
import pytest
import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.testing.gof import density_goodness_of_fit
from pyro.distributions.util import deep_to, scale_and_mask

from pyro_bqn import Moments, levels
from pyro_bqn.distributions import (
    MomentBernoulli,
    MomentCategorical,
    MomentNormal,
    MultipleSpikeAndSlab,
    QuantizedCategorical,
    RelaxedQuantizedCategorical,
    RelaxedQuantizedCategoricalStraightThrough,
)
from tests.mc import assert_mean_var_match

ASYMMETRIC = [-0.7, 0.1, 0.4, 1.3]
NUM_SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _shape_of(arg: object) -> tuple[int, ...]:
    """The shape Pyro's suite passes to ``infer_shapes`` for a constructor argument."""
    if isinstance(arg, Moments):
        return tuple(arg.mean.shape)
    return tuple(arg.shape) if isinstance(arg, torch.Tensor) else ()


@dataclass(frozen=True)
class Case:
    """A distribution class and the keyword arguments that build one.

    :param entropy: ``entropy()`` has a closed form (else it raises ``NotImplementedError``).
    :param moments: ``mean`` and ``variance`` have a closed form (else they raise).
    """

    name: str
    cls: type[TorchDistribution]
    kwargs: dict = field(hash=False)
    entropy: bool = True
    moments: bool = True

    def make(self) -> TorchDistribution:
        return self.cls(**self.kwargs)

    def __str__(self) -> str:
        return self.name


def _spike_probs(*batch_shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return 0.8 * _randn(*batch_shape, 4, seed=seed).to(dtype).softmax(-1)


CASES = [
    Case("qc-level-set", QuantizedCategorical,
         {"levels": levels.ternary(), "logits": _randn(5, 3, seed=0)}),
    Case("qc-tensor-levels", QuantizedCategorical,
         {"levels": torch.tensor(ASYMMETRIC), "probs": _randn(2, 3, 4, seed=1).softmax(-1)}),
    Case("straight-through-tensor-levels", RelaxedQuantizedCategoricalStraightThrough,
         {"levels": torch.tensor(ASYMMETRIC), "temperature": torch.tensor([[0.5], [1.0]]),
          "logits": _randn(3, 4, seed=2)}),
    Case("relaxed-level-set", RelaxedQuantizedCategorical,
         {"levels": levels.ternary(), "temperature": 0.5, "logits": _randn(5, 3, seed=3)},
         entropy=False, moments=False),
    Case("relaxed-tensor-levels", RelaxedQuantizedCategorical,
         {"levels": torch.tensor(ASYMMETRIC), "temperature": torch.tensor([[0.3], [1.0]]),
          "logits": _randn(3, 4, seed=4)},
         entropy=False, moments=False),
    Case("mss-point-mass-tensor-levels", MultipleSpikeAndSlab,
         {"levels": torch.tensor(ASYMMETRIC), "spike_probs": _spike_probs(3, seed=5),
          "slab_prob": torch.tensor(0.2), "slab_scale": torch.tensor([[0.7], [2.0]])}),
    Case("mss-gaussian-spikes", MultipleSpikeAndSlab,
         {"levels": levels.uniform(2), "spike_probs": _spike_probs(2, seed=6),
          "slab_prob": 0.2, "slab_scale": 1.0, "spike_scale": torch.tensor(0.05),
          "slab_loc": torch.tensor([0.3, -0.2])},
         entropy=False),
    Case("moment-categorical-tensor", MomentCategorical, {"logits": _randn(5, 3, seed=7)},
         moments=False),
    Case("moment-categorical-moments", MomentCategorical,
         {"logits": Moments(_randn(2, 5, 3, seed=8), _randn(2, 5, 3, seed=9).square())},
         moments=False),
    Case("moment-bernoulli", MomentBernoulli,
         {"logits": Moments(_randn(4, seed=10), _randn(4, seed=11).square())}),
    Case("moment-normal", MomentNormal,
         {"loc": Moments(_randn(2, 3, seed=12), _randn(2, 3, seed=13).square()),
          "scale": torch.tensor([0.5, 1.0, 2.0])}),
]


@pytest.fixture(params=CASES, ids=str)
def built(request) -> Case:
    """(Not ``case``: that name runs a test over the conformance fixtures of conftest.)"""
    return request.param


@pytest.fixture(autouse=True)
def _validation():
    # Pyro's suite runs with validation on: samples are checked against the support.
    with pyro.validation_enabled(True):
        yield


# Item 1 of issue 20: infer_shapes.


def test_every_constructor_argument_has_a_constraint(built):
    assert set(built.kwargs) <= set(built.cls.arg_constraints)


def test_infer_shapes_gives_the_shapes_of_the_distribution(built):
    arg_shapes = {name: _shape_of(arg) for name, arg in built.kwargs.items()}
    batch_shape, event_shape = built.cls.infer_shapes(**arg_shapes)
    d = built.make()
    assert (batch_shape, event_shape) == (d.batch_shape, d.event_shape)


# Item 2: support and log_prob agree, also on samples of Pyro's generic expand.


@pytest.mark.parametrize("generic", [False, True], ids=["own-expand", "pyro-expand"])
@pytest.mark.parametrize("extra", [(2,), (2, 1)])
def test_expanded_log_prob_is_the_small_distributions(built, generic, extra):
    small = built.make()
    shape = torch.Size(extra) + small.batch_shape
    large = TorchDistribution.expand(small, shape) if generic else small.expand(shape)
    assert large.batch_shape == shape
    x = small.sample()
    assert torch.allclose(large.log_prob(x), small.log_prob(x).expand(shape))
    x = large.sample()
    assert x.shape == shape
    assert large.support.check(x).all()
    log_p = small.log_prob(x)
    assert torch.isfinite(log_p).all()
    assert torch.allclose(large.log_prob(x), log_p)


@pytest.mark.parametrize("operation", [
    torch.clone, torch.Tensor.detach, lambda x: x.reshape(-1).reshape(x.shape), lambda x: x * 1,
], ids=["clone", "detach", "reshape", "times-one"])
def test_support_check_and_log_prob_agree_on_a_sample_after_torch_operations(built, operation):
    d = built.make()
    x = operation(d.sample((3,)))
    assert d.support.check(x).all()
    assert torch.isfinite(d.log_prob(x)).all()


# Item 3: entropy, moments, cdf and icdf.


def test_entropy_is_minus_the_expected_log_prob_or_documented_absent(built):
    d = built.make()
    if not built.entropy:
        with pytest.raises(NotImplementedError, match="no closed-form entropy"):
            d.entropy()
        return
    entropy = d.entropy()
    assert entropy.shape == d.batch_shape
    with torch.no_grad():
        surprise = -d.log_prob(d.sample((NUM_SAMPLES,)))
    tol = Z * surprise.std(0) / NUM_SAMPLES**0.5 + 1e-6
    assert ((surprise.mean(0) - entropy).abs() <= tol).all()


def test_mean_and_variance_match_samples_or_are_documented_absent(built):
    d = built.make()
    if not built.moments:
        with pytest.raises(NotImplementedError):
            _ = d.mean
        return
    with torch.no_grad():
        assert_mean_var_match(d.sample((NUM_SAMPLES,)), d.mean, d.variance)


def test_moment_normal_cdf_inverts_icdf_and_matches_samples():
    d = MomentNormal(Moments(_randn(3, seed=20), _randn(3, seed=21).square()), 0.7)
    u = torch.tensor([0.05, 0.3, 0.5, 0.9]).unsqueeze(-1).expand(4, 3)
    x = d.icdf(u)
    assert torch.allclose(d.cdf(x), u, atol=1e-6)
    below = (d.sample((NUM_SAMPLES,)).unsqueeze(1) <= x).double().mean(0)
    assert ((below - u).abs() <= Z * (u * (1 - u) / NUM_SAMPLES).sqrt()).all()


def test_relaxed_moments_name_the_exact_categorical_they_lack():
    d = RelaxedQuantizedCategorical(levels.ternary(), 0.5, logits=_randn(3, seed=22))
    for moment in ("mean", "variance"):
        with pytest.raises(NotImplementedError, match=rf"no closed-form {moment}.*\.quantized"):
            getattr(d, moment)
    assert isinstance(d.quantized, QuantizedCategorical)
    assert torch.equal(d.quantized.probs, d.probs)


# Pickling and masking.


def test_pickled_distribution_keeps_its_log_prob(built):
    d = built.make()
    buffer = io.BytesIO()
    torch.save(d, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(d)
    x = d.sample()
    assert torch.equal(loaded.log_prob(x), d.log_prob(x))


def test_mask_zeroes_the_masked_log_prob(built):
    d = built.make().expand_by((2,))
    mask = torch.tensor([True, False]).reshape((2,) + (1,) * (len(d.batch_shape) - 1))
    x = d.sample()
    assert torch.equal(d.mask(mask).log_prob(x), scale_and_mask(d.log_prob(x), mask=mask))


# Item 4: deep_to converts a copy of the level set; membership across dtypes.


def _on_levels(level_set: levels.LevelSet, kind: str) -> TorchDistribution:
    like = level_set.values
    logits = _randn(2, 4, seed=30).to(like)
    spike_probs = _spike_probs(2, seed=31, dtype=like.dtype)
    return {
        "qc": lambda: QuantizedCategorical(level_set, logits=logits),
        "straight-through": lambda: RelaxedQuantizedCategoricalStraightThrough(
            level_set, 0.5, logits=logits),
        "relaxed": lambda: RelaxedQuantizedCategorical(level_set, 0.5, logits=logits),
        "mss-point-mass": lambda: MultipleSpikeAndSlab(level_set, spike_probs, 0.2, 1.0),
        "mss-gaussian-spikes": lambda: MultipleSpikeAndSlab(level_set, spike_probs, 0.2, 1.0,
                                                            0.05),
    }[kind]()


@pytest.mark.parametrize("make_levels", [levels.from_values, levels.learnable],
                         ids=["fixed", "learnable"])
@pytest.mark.parametrize("kind", ["qc", "straight-through", "relaxed", "mss-point-mass",
                                  "mss-gaussian-spikes"])
def test_deep_to_converts_a_copy_of_the_level_set_not_the_callers(make_levels, kind):
    level_set = make_levels(ASYMMETRIC).double()
    state = {name: t.clone() for name, t in level_set.state_dict().items()}
    d = _on_levels(level_set, kind)
    d32 = deep_to(d, torch.float32)
    assert d.level_set is level_set
    assert all(t.dtype == torch.float64 and torch.equal(t, state[name])
               for name, t in level_set.state_dict().items())
    assert d32.level_set is not level_set
    assert d32.levels.dtype == d32.level_set.values.dtype == torch.float32
    assert torch.equal(d32.levels, d32.level_set.values)
    if isinstance(d32, RelaxedQuantizedCategorical):
        assert d32.quantized.level_set is d32.level_set
    # Each reads the other's level values as levels.
    values = d.levels.unsqueeze(-1)
    assert torch.allclose(d32.log_prob(values).double(), d.log_prob(values), atol=1e-5)
    assert torch.isfinite(d.log_prob(d32.sample((4,)))).all()


def test_deep_copy_holds_its_own_level_set():
    level_set = levels.learnable(ASYMMETRIC)
    d = RelaxedQuantizedCategorical(level_set, 0.5, logits=_randn(4, seed=32))
    e = copy.deepcopy(d)
    assert e.level_set is not level_set and e.quantized.level_set is e.level_set
    assert torch.equal(e.levels, level_set.values)
    assert e.level_set.first is not level_set.first


def test_deep_copy_keeps_float64_levels_exactly():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        level_set = levels.from_values(ASYMMETRIC)  # not representable in float32
        d = MultipleSpikeAndSlab.with_uniform_spikes(level_set, 0.2, 1.0)
    finally:
        torch.set_default_dtype(previous)
    e = copy.deepcopy(d)
    assert torch.equal(e.levels, d.levels) and torch.equal(e.level_set.values, d.levels)


@pytest.mark.parametrize("point_mass", [True, False])
def test_levels_are_recognised_across_dtypes(point_mass):
    # The scenario of the issue: float64 levels, level values that went through float32.
    values64 = torch.tensor(ASYMMETRIC, dtype=torch.float64)
    spike_probs = _spike_probs(seed=33, dtype=torch.float64)
    qc = QuantizedCategorical(values64, logits=spike_probs.log())
    assert torch.equal(qc.log_prob(values64.float()), qc.logits)
    assert qc.support.check(values64.float()).all()
    mss = MultipleSpikeAndSlab(values64, spike_probs, 0.2, 1.0, 0.0 if point_mass else 0.05)
    assert torch.allclose(mss.log_prob(values64.float()), mss.log_prob(values64))
    # And the other way round: float64 values on float32 levels.
    mss32 = deep_to(mss, torch.float32)
    assert torch.allclose(mss32.log_prob(values64).double(), mss.log_prob(values64))


@pytest.mark.parametrize("prior_kind", ["categorical", "spike-and-slab"])
def test_kl_accepts_the_same_levels_in_another_dtype(prior_kind):
    values64 = torch.tensor(ASYMMETRIC, dtype=torch.float64)
    q = QuantizedCategorical(values64, logits=_randn(3, 4, seed=34).double())
    p = (QuantizedCategorical(values64, logits=torch.zeros(4, dtype=torch.float64))
         if prior_kind == "categorical" else MultipleSpikeAndSlab.with_uniform_spikes(
             values64, 0.2, 1.0))
    kl = torch.distributions.kl_divergence(q, p)
    kl32 = torch.distributions.kl_divergence(deep_to(q, torch.float32), p)
    assert torch.allclose(kl32.double(), kl, atol=1e-5)
    with pytest.raises(ValueError, match="same levels"):
        torch.distributions.kl_divergence(QuantizedCategorical(values64 + 1e-4, logits=q.logits),
                                          p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_level_is_matched_to_k_roundings_of_the_coarser_dtype(dtype):
    qc = QuantizedCategorical(torch.tensor(ASYMMETRIC, dtype=torch.float64), logits=torch.zeros(4))
    tolerance = 4 * torch.finfo(dtype).eps * 1.3  # K eps max|v_k|
    x = torch.tensor([0.1 + 0.9 * tolerance, 0.1 + 1.1 * tolerance, float("nan")], dtype=dtype)
    assert qc.support.check(x).tolist() == [True, False, False]


# Item 5: the point-mass spike-and-slab's dominating measure.


def _point_mass(**kwargs) -> MultipleSpikeAndSlab:
    return MultipleSpikeAndSlab(levels.ternary(), torch.tensor([0.2, 0.3, 0.1]), 0.4, **kwargs)


def test_point_mass_samples_follow_the_measure_log_prob_is_a_density_of():
    """log_prob is the density w.r.t. counting measure on the levels plus Lebesgue measure:
    level hits are the spike weights, and the other samples fit the slab density."""
    d = _point_mass(slab_scale=torch.tensor(0.8), slab_loc=torch.tensor(0.3))
    x = d.sample((NUM_SAMPLES,))
    log_p = d.log_prob(x)
    index, on_level = (x.unsqueeze(-1) == d.levels).long().argmax(-1), (x.unsqueeze(-1)
                                                                        == d.levels).any(-1)
    hits = torch.stack([(on_level & (index == k)).double().mean() for k in range(3)])
    tol = Z * (d.spike_probs * (1 - d.spike_probs) / NUM_SAMPLES).sqrt()
    assert ((hits - d.spike_probs).abs() <= tol).all()
    assert torch.equal(log_p[on_level], d.spike_probs.log()[index[on_level]])
    slab_density = (log_p[~on_level] - d.slab_prob.log()).exp()
    assert density_goodness_of_fit(x[~on_level], slab_density) > 1e-3


def test_slab_draws_that_round_onto_a_level_are_redrawn():
    # A slab this narrow at a level puts ~10% of its float32 draws on the level itself, which
    # log_prob would read as spike draws.
    d = _point_mass(slab_scale=1e-6, slab_loc=1.0)
    x = d.sample((NUM_SAMPLES,))
    hits = (x == 1.0).double().mean()
    assert (hits - 0.1).abs() <= Z * (0.1 * 0.9 / NUM_SAMPLES) ** 0.5
    slab = ~(x.unsqueeze(-1) == d.levels).any(-1)
    slab_log_density = torch.distributions.Normal(1.0, 1e-6).log_prob(x[slab])
    assert torch.allclose(d.log_prob(x[slab]), d.slab_prob.log() + slab_log_density, rtol=1e-4)


def test_a_slab_too_narrow_to_leave_a_level_is_refused():
    with pytest.raises(ValueError, match="slab_scale .* too small to tell the slab"):
        _point_mass(slab_scale=1e-12, slab_loc=1.0).sample((10,))
