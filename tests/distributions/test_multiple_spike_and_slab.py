import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_bqn import levels
from pyro_bqn.distributions import MultipleSpikeAndSlab, RelaxedLevelValue
from tests.mc import assert_mean_var_match

SPIKE_PROBS = torch.tensor([0.2, 0.3, 0.4])
SLAB_PROB = 0.1
SLAB_SCALE = 1.5
NUM_SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.set_rng_seed(0)


def _prior(spike_scale: float = 0.0) -> MultipleSpikeAndSlab:
    return MultipleSpikeAndSlab(levels.ternary(), SPIKE_PROBS, SLAB_PROB, SLAB_SCALE, spike_scale)


def _slab_log_density(x: torch.Tensor) -> torch.Tensor:
    return math.log(SLAB_PROB) + torch.distributions.Normal(0.0, SLAB_SCALE).log_prob(x)


def test_point_mass_log_prob_is_spike_mass_at_levels_and_slab_density_elsewhere():
    prior = _prior()
    assert prior.point_mass
    assert torch.allclose(prior.log_prob(torch.tensor([-1.0, 0.0, 1.0])), SPIKE_PROBS.log())
    x = torch.tensor([-2.0, -0.5, 0.3, 1.0001])
    assert torch.allclose(prior.log_prob(x), _slab_log_density(x))


def test_point_mass_distribution_is_normalised():
    # Counting measure on the levels plus Lebesgue measure: sum of the spike masses plus the
    # integral of the slab density (on a grid that avoids the levels) is one.
    prior = _prior()
    step = 1e-3
    grid = torch.arange(-12.0, 12.0, step, dtype=torch.float64) + step / 2
    continuous = prior.log_prob(grid.float()).double().exp().sum() * step
    discrete = prior.log_prob(levels.ternary().values).exp().sum()
    assert (continuous + discrete).item() == pytest.approx(1.0, abs=1e-4)


def test_gaussian_spikes_density_is_the_mixture_and_integrates_to_one():
    prior = _prior(spike_scale=0.05)
    assert not prior.point_mass
    x = torch.tensor([-1.0, -0.97, 0.2, 3.0])
    components = torch.distributions.Normal(levels.ternary().values, 0.05).log_prob(x.unsqueeze(-1))
    expected = torch.cat(
        [SPIKE_PROBS.log() + components, _slab_log_density(x).unsqueeze(-1)], -1
    ).logsumexp(-1)
    assert torch.allclose(prior.log_prob(x), expected)
    step = 1e-3
    grid = torch.arange(-12.0, 12.0, step)
    assert (prior.log_prob(grid).double().exp().sum() * step).item() == pytest.approx(1.0, abs=1e-4)


def test_point_mass_samples_hit_each_level_with_its_weight():
    x = _prior().sample((NUM_SAMPLES,))
    at_level = x.unsqueeze(-1) == levels.ternary().values
    freq = torch.cat([at_level.float().mean(0), (~at_level.any(-1)).float().mean(0, keepdim=True)])
    probs = torch.cat([SPIKE_PROBS, torch.tensor([SLAB_PROB])])
    assert ((freq - probs).abs() <= Z * (probs * (1 - probs) / NUM_SAMPLES).sqrt()).all()


def test_mean_and_variance_by_hand():
    prior = _prior(spike_scale=0.1)
    mean = 0.4 - 0.2
    second = 0.2 + 0.4 + (0.2 + 0.3 + 0.4) * 0.1**2 + SLAB_PROB * SLAB_SCALE**2
    assert prior.mean.item() == pytest.approx(mean)
    assert prior.variance.item() == pytest.approx(second - mean**2)


def test_with_uniform_spikes():
    prior = MultipleSpikeAndSlab.with_uniform_spikes(levels.uniform(2), torch.tensor([0.2, 0.6]),
                                                     1.0)
    assert prior.batch_shape == (2,)
    assert torch.allclose(prior.spike_probs, torch.tensor([[0.2] * 4, [0.1] * 4]))
    categorical = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.0, 1.0)
    assert torch.allclose(categorical.log_prob(levels.ternary().values), torch.tensor(-math.log(3)))
    assert categorical.log_prob(torch.tensor(0.5)) == -math.inf


@pytest.mark.parametrize("spike_scale", [0.0, 0.05])
def test_value_carrying_a_one_hot_gets_the_spike_weights(spike_scale):
    prior = MultipleSpikeAndSlab(levels.ternary(), torch.tensor([0.0, 0.5, 0.4]), 0.1, 1.0,
                                 spike_scale)
    soft = torch.tensor([[0.0, 0.7, 0.3], [0.0, 0.0, 1.0]])
    value = RelaxedLevelValue.wrap(soft @ levels.ternary().values, soft)
    expected = torch.tensor([0.7 * math.log(0.5) + 0.3 * math.log(0.4), math.log(0.4)])
    # xlogy: a zero weight where the one-hot is zero contributes nothing (not NaN).
    assert torch.allclose(prior.log_prob(value), expected)
    hard = RelaxedLevelValue.wrap(torch.tensor(-1.0), F.one_hot(torch.tensor(0), 3).float())
    assert prior.log_prob(hard) == -math.inf


def test_broadcast_batch_shape():
    prior = MultipleSpikeAndSlab(levels.ternary(), SPIKE_PROBS, torch.full((4, 1), SLAB_PROB),
                                 torch.full((5,), SLAB_SCALE))
    assert prior.batch_shape == (4, 5)
    assert prior.sample((2,)).shape == (2, 4, 5)


@pytest.mark.parametrize(
    "spike_probs, slab_prob",
    [([0.2, 0.3, 0.4], 0.2), ([0.5, 0.5, 0.2], -0.2), ([0.2, float("nan"), 0.4], 0.1)],
    ids=["sum-not-one", "negative", "nan"],
)
def test_weights_must_be_non_negative_and_sum_to_one(spike_probs, slab_prob):
    with pytest.raises(ValueError, match="must be non-negative and sum to one"):
        MultipleSpikeAndSlab(levels.ternary(), torch.tensor(spike_probs), slab_prob, 1.0)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="spike_probs must have last dimension K=3"):
        MultipleSpikeAndSlab(levels.ternary(), torch.tensor([0.5, 0.4]), 0.1, 1.0)
    with pytest.raises(ValueError, match="slab_scale must be positive"):
        MultipleSpikeAndSlab(levels.ternary(), SPIKE_PROBS, SLAB_PROB, 0.0)
    with pytest.raises(ValueError, match="zero everywhere .* or positive everywhere"):
        MultipleSpikeAndSlab(levels.ternary(), SPIKE_PROBS, SLAB_PROB, 1.0,
                             spike_scale=torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError, match="zero everywhere .* or positive everywhere"):
        MultipleSpikeAndSlab(levels.ternary(), SPIKE_PROBS, SLAB_PROB, 1.0, spike_scale=-0.1)


# --- the spike-and-slab posterior form: a slab of its own location, from logits ------------


def _posterior(spike_scale: float = 0.0, batch_shape=(4,), seed: int = 1) -> MultipleSpikeAndSlab:
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(*batch_shape, 4, generator=gen)
    slab_loc = 3 * torch.randn(batch_shape, generator=gen)
    slab_scale = 0.1 + torch.rand(batch_shape, generator=gen)
    return MultipleSpikeAndSlab.from_logits(
        levels.ternary(), logits, slab_loc, slab_scale, spike_scale
    )


def test_from_logits_weights_are_the_softmax_and_log_weights_keep_precision():
    logits = torch.tensor([[0.0, 1.0, -2.0, 0.5], [-200.0, 0.0, 0.0, 0.0]])
    d = MultipleSpikeAndSlab.from_logits(levels.ternary(), logits, 0.5, 1.0)
    weights = logits.softmax(-1)
    torch.testing.assert_close(d.spike_probs, weights[:, :3])
    torch.testing.assert_close(d.slab_prob, weights[:, 3])
    torch.testing.assert_close(d.log_weights, logits.log_softmax(-1))
    assert d.log_weights[1, 0] == pytest.approx(-200 - math.log(3), rel=1e-6)  # exp underflows


@pytest.mark.parametrize("spike_scale", [0.0, 0.05])
def test_posterior_moments_match_monte_carlo(spike_scale):
    d = _posterior(spike_scale)
    with torch.no_grad():
        x = d.sample((NUM_SAMPLES,))
        moments = d.moments()
    assert_mean_var_match(x, moments.mean, moments.var, z=Z)
    torch.testing.assert_close(moments.second_moment, moments.var + moments.mean.square())
    torch.testing.assert_close(d.variance, moments.var)


def test_point_mass_posterior_samples_are_levels_or_slab_draws_with_their_weights():
    d = _posterior(batch_shape=())
    x = d.sample((NUM_SAMPLES,))
    at_level = x.unsqueeze(-1) == levels.ternary().values
    freq = torch.cat([at_level.float().mean(0), (~at_level.any(-1)).float().mean(0, keepdim=True)])
    probs = d.log_weights.exp()
    assert ((freq - probs).abs() <= Z * (probs * (1 - probs) / NUM_SAMPLES).sqrt()).all()
    slab = x[~at_level.any(-1)]
    # The slab's draws have its location and scale.
    assert_mean_var_match(slab.unsqueeze(-1), d.slab_loc.reshape(1),
                          d.slab_scale.square().reshape(1), z=Z)


def test_log_prob_uses_the_slab_location():
    d = MultipleSpikeAndSlab(levels.ternary(), SPIKE_PROBS, SLAB_PROB, SLAB_SCALE, slab_loc=2.0)
    x = torch.tensor([1.7, 2.0, 5.0])
    expected = math.log(SLAB_PROB) + torch.distributions.Normal(2.0, SLAB_SCALE).log_prob(x)
    torch.testing.assert_close(d.log_prob(x), expected)
    assert d.mean.item() == pytest.approx(0.4 - 0.2 + SLAB_PROB * 2.0)


def test_expand_keeps_the_slab_location_and_log_weights():
    d = _posterior(0.05, batch_shape=(3,))
    e = d.expand((2, 3))
    assert type(e) is MultipleSpikeAndSlab and e.batch_shape == (2, 3)
    torch.testing.assert_close(e.slab_loc, d.slab_loc.expand(2, 3))
    torch.testing.assert_close(e.log_weights, d.log_weights.expand(2, 3, 4))
    torch.testing.assert_close(e.moments().var, d.moments().var.expand(2, 3))
    # An expanded prior keeps one row of log weights (stride 0), not one per weight.
    prior = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.1, 1.0).expand((50, 40))
    assert prior.log_weights.stride()[:2] == (0, 0)


def test_mode_is_the_heaviest_component():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.1, 0.2, 0.3, 0.4]]))
    d = MultipleSpikeAndSlab.from_logits(levels.ternary(), logits, torch.tensor([0.7, -2.5]), 1.0)
    assert torch.equal(d.mode, torch.tensor([0.0, -2.5]))


def test_weights_are_not_checked_without_validation():
    spike_probs = torch.tensor([0.5, 0.5, 0.2])
    d = MultipleSpikeAndSlab(levels.ternary(), spike_probs, 0.1, 1.0, validate_args=False)
    assert torch.equal(d.spike_probs, spike_probs)
