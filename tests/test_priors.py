import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_bqn import levels
from pyro_bqn.distributions import MultipleSpikeAndSlab, QuantizedCategorical
from pyro_bqn.priors import (
    CategoricalPrior,
    DistributionPrior,
    SpikeAndSlabPrior,
    as_prior_factory,
    parse_prior,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("categorical", CategoricalPrior()),
        ("Categorical:zero_mass=0.5", CategoricalPrior(zero_mass=0.5)),
        ("spike-and-slab", SpikeAndSlabPrior()),
        (
            "spike-and-slab:slab_prob=0.1, slab_scale=2,spike_scale=0.02",
            SpikeAndSlabPrior(slab_prob=0.1, slab_scale=2.0, spike_scale=0.02),
        ),
        ("spike-and-slab:spike_scale=0.05", SpikeAndSlabPrior(spike_scale=0.05)),
    ],
)
def test_parse_prior_and_to_spec_round_trip(text, expected):
    prior = parse_prior(text)
    assert prior == expected
    assert parse_prior(prior.to_spec()) == prior


@pytest.mark.parametrize(
    "text, message",
    [
        ("gaussian", r"one of \['categorical', 'spike-and-slab'\]"),
        ("categorical:slab_prob=0.1", r"fields are \['zero_mass'\]"),
        ("spike-and-slab:slab_prob", "as field=value"),
        ("spike-and-slab:slab_prob=lots", "slab_prob must be a number"),
        ("spike-and-slab:slab_prob=1", r"slab_prob must lie in \[0, 1\)"),
        ("spike-and-slab:slab_scale=0", "slab_scale must be finite and positive"),
        ("spike-and-slab:spike_scale=-0.1", "spike_scale must be finite and non-negative"),
        ("spike-and-slab:slab_scale=inf", "slab_scale must be finite and positive"),
        ("categorical:zero_mass=-0.5", r"zero_mass must lie in \[0, 1\)"),
    ],
)
def test_parse_prior_refuses_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prior(text)


def test_categorical_prior_puts_zero_mass_on_the_level_nearest_zero():
    level_set = levels.from_values([-1.0, -0.1, 0.4, 1.2])
    prior = CategoricalPrior(zero_mass=0.7)(level_set)
    assert isinstance(prior, QuantizedCategorical) and prior.level_set is level_set
    torch.testing.assert_close(prior.probs, torch.tensor([0.1, 0.7, 0.1, 0.1]))
    uniform = CategoricalPrior()(level_set)
    torch.testing.assert_close(uniform.probs, torch.full((4,), 0.25))


def test_spike_and_slab_prior_builds_the_distribution_on_the_given_levels():
    level_set = levels.learnable([-1.0, 0.0, 1.0])
    prior = SpikeAndSlabPrior(slab_prob=0.1, slab_scale=2.0, spike_scale=0.05)(level_set)
    assert isinstance(prior, MultipleSpikeAndSlab) and prior.level_set is level_set
    torch.testing.assert_close(prior.spike_probs, torch.full((3,), 0.3))
    assert prior.slab_scale.item() == 2.0
    assert prior.spike_scale.item() == pytest.approx(0.05)


@pytest.mark.parametrize("kind", ["categorical", "spike-and-slab"])
def test_distribution_prior_rebuilds_the_weights_on_other_levels_dtype_and_device(kind):
    ternary = levels.ternary()
    if kind == "categorical":
        given = QuantizedCategorical(ternary, probs=torch.tensor([0.2, 0.5, 0.3]))
    else:
        given = MultipleSpikeAndSlab(ternary, torch.tensor([0.2, 0.4, 0.3]), 0.1, 2.0, 0.05,
                                     slab_loc=0.3)
    factory = DistributionPrior(given.expand((1,)).to_event(1))
    assert factory.levels is ternary
    moved = levels.from_values([-1.5, 0.0, 2.0]).double()
    rebuilt = factory(moved)
    assert type(rebuilt) is type(given) and rebuilt.level_set is moved
    assert rebuilt.batch_shape == ()
    names = ["probs"] if kind == "categorical" else [
        "spike_probs", "slab_prob", "slab_scale", "spike_scale", "slab_loc"]
    for name in names:
        assert getattr(rebuilt, name).dtype == torch.float64
        torch.testing.assert_close(getattr(rebuilt, name), getattr(given, name).double())
    assert type(given).__name__ in repr(factory)


def test_as_prior_factory():
    assert as_prior_factory(None) == CategoricalPrior()
    spec = SpikeAndSlabPrior()
    assert as_prior_factory(spec) is spec
    assert isinstance(
        as_prior_factory(QuantizedCategorical(levels.binary(), logits=torch.zeros(2))),
        DistributionPrior,
    )
    with pytest.raises(ValueError, match="a distribution over levels or a callable"):
        as_prior_factory(0.5)
    with pytest.raises(ValueError, match="distribution over levels"):
        as_prior_factory(dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="scalar batch shape"):
        as_prior_factory(QuantizedCategorical(levels.binary(), logits=torch.zeros(3, 2)))


def test_a_zero_mass_prior_gives_an_infinite_kl_to_mass_at_zero():
    prior = CategoricalPrior(zero_mass=0.0)(levels.ternary())
    q = QuantizedCategorical(levels.ternary(), probs=torch.tensor([0.3, 0.4, 0.3]))
    assert kl_divergence(q, prior) == math.inf
