import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO

from pyro_bqn import levels
from pyro_bqn.distributions import (
    MultipleSpikeAndSlab,
    QuantizedCategorical,
    RelaxedQuantizedCategorical,
    RelaxedQuantizedCategoricalStraightThrough,
)

RELAXED = [RelaxedQuantizedCategorical, RelaxedQuantizedCategoricalStraightThrough]
ASYMMETRIC = levels.from_values([-0.7, 0.1, 0.4, 1.3])
LOGITS = torch.tensor([0.3, -0.5, 0.8, 0.1])
NUM_SAMPLES = 4_000
Z = 5.0  # tolerance in standard errors


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(torch.Tensor).detach().clone()


def _assert_frequencies_match(index: torch.Tensor, probs: torch.Tensor) -> None:
    freq = F.one_hot(index, probs.shape[-1]).to(probs.dtype).mean(0)
    tol = Z * (probs * (1 - probs) / index.shape[0]).sqrt()
    assert ((freq - probs).abs() <= tol).all()


def test_relaxed_samples_converge_to_the_categorical_as_temperature_drops():
    probs = LOGITS.softmax(-1)
    distances = []
    for temperature in [1.0, 0.3, 0.1, 0.01]:
        d = RelaxedQuantizedCategorical(ASYMMETRIC, temperature, logits=LOGITS)
        x = d.sample((NUM_SAMPLES,))
        # How far the relaxed one-hot is from the nearest vertex of the simplex.
        distances.append((1 - x.soft_onehot.max(-1).values).mean().item())
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < 0.01
    nearest = (x.unsqueeze(-1) - ASYMMETRIC.values).abs().argmin(-1)
    _assert_frequencies_match(nearest, probs)
    # The relaxed log-probability approaches that of the nearest level.
    exact = QuantizedCategorical(ASYMMETRIC, logits=LOGITS).log_prob(ASYMMETRIC.values[nearest])
    assert (d.log_prob(x) - exact).abs().mean() < 0.05


@pytest.mark.parametrize("cls", RELAXED)
def test_the_carried_one_hot_picks_an_exact_categorical_sample_at_any_temperature(cls):
    with torch.no_grad():
        x = cls(ASYMMETRIC, 2.0, logits=LOGITS).rsample((NUM_SAMPLES,))
    _assert_frequencies_match(x.soft_onehot.argmax(-1), LOGITS.softmax(-1))


def test_relaxed_log_prob_pairs_with_the_prior():
    d = RelaxedQuantizedCategorical(levels.ternary(), 0.5, logits=torch.randn(5, 3))
    prior = QuantizedCategorical(levels.ternary(), logits=torch.randn(3))
    x = d.rsample((2,))
    y = x.soft_onehot
    assert torch.allclose(d.log_prob(x), (y * d.logits).sum(-1))
    assert torch.allclose(prior.log_prob(x), (y * prior.logits).sum(-1))
    # A plain level value gets the categorical's log-probability.
    assert torch.allclose(d.log_prob(torch.tensor(1.0)), d.logits[..., 2])


def test_relaxed_plain_value_between_levels_interpolates_log_q_of_its_neighbours():
    d = RelaxedQuantizedCategorical(ASYMMETRIC, 0.5, logits=LOGITS, validate_args=True)
    log_q = d.logits
    # 0.25 is halfway between the levels 0.1 and 0.4, 1.0 two thirds of the way to 1.3.
    x = torch.tensor([0.25, 1.0, -0.7])
    expected = torch.stack([0.5 * (log_q[1] + log_q[2]), (log_q[2] + 2 * log_q[3]) / 3, log_q[0]])
    assert torch.allclose(d.log_prob(x), expected)
    with pytest.raises(ValueError, match="within the support"):
        d.log_prob(torch.tensor(1.5))


@pytest.mark.parametrize("cls", RELAXED)
def test_rsample_gradients_reach_logits_and_levels(cls):
    values = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    logits = torch.randn(6, 3, requires_grad=True)
    x = cls(values, 0.5, logits=logits).rsample((4,))
    (x * torch.randn(4, 6)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # d(sum x)/dv_k: the relaxed value is y @ v, the straight-through value is v_k exactly.
    values.grad = None
    x = cls(values, 0.5, logits=logits.detach()).rsample((4,))
    x.sum().backward()
    if cls is RelaxedQuantizedCategorical:
        expected = x.soft_onehot.detach().sum((0, 1))
    else:
        expected = torch.bincount(x.soft_onehot.argmax(-1).flatten(), minlength=3).float()
    assert torch.allclose(values.grad, expected)


def test_straight_through_forward_value_is_exact_and_prior_log_prob_is_exact():
    logits = torch.randn(5, 4, requires_grad=True)
    d = RelaxedQuantizedCategoricalStraightThrough(ASYMMETRIC, 0.5, logits=logits)
    x = d.rsample((3,))
    index = x.soft_onehot.argmax(-1)
    assert torch.equal(_plain(x), ASYMMETRIC.values[index])
    assert torch.equal(x.soft_onehot.detach(), F.one_hot(index, 4).float())
    prior = QuantizedCategorical(ASYMMETRIC, logits=torch.randn(4))
    log_p = prior.log_prob(x)
    assert torch.isfinite(log_p).all()
    assert torch.equal(log_p.detach(), prior.log_prob(_plain(x)))
    assert torch.equal(d.log_prob(x).detach(), d.log_prob(_plain(x)).detach())
    spikes = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, 0.2, 1.0)
    assert torch.allclose(spikes.log_prob(x).detach(), spikes.log_prob(_plain(x)))
    (log_p.sum() + x.square().sum()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", RELAXED)
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), torch.tensor([0.5, 0.0])])
def test_temperature_must_be_positive(cls, temperature):
    with pytest.raises(ValueError, match="temperature must be positive"):
        cls(levels.ternary(), temperature, logits=torch.zeros(2, 3))


@pytest.mark.parametrize("cls", RELAXED)
def test_bad_parameters_are_rejected(cls):
    with pytest.raises(ValueError, match="logits must have last dimension K=3"):
        cls(levels.ternary(), 0.5, logits=torch.zeros(2))
    with pytest.raises(ValueError, match="exactly one of logits or probs"):
        cls(levels.ternary(), 0.5)
    with pytest.raises(ValueError, match="probs must be non-negative and sum to one"):
        cls(levels.ternary(), 0.5, probs=torch.tensor([0.5, 0.5, 0.5]), validate_args=True)


@pytest.mark.parametrize(
    "cls, prior_kind",
    [(RelaxedQuantizedCategorical, "categorical"),
     (RelaxedQuantizedCategoricalStraightThrough, "spike-and-slab")],
)
def test_relaxed_guide_trains_a_tiny_model_with_trace_elbo(cls, prior_kind):
    ternary = levels.ternary()
    w_true = torch.tensor([1.0, 0.0, -1.0, 1.0])
    x = torch.randn(64, 4)
    y = x @ w_true + 0.1 * torch.randn(64)
    prior = (
        QuantizedCategorical(ternary, logits=torch.zeros(3))
        if prior_kind == "categorical"
        else MultipleSpikeAndSlab.with_uniform_spikes(ternary, 0.1, 1.0)
    )

    def model():
        w = pyro.sample("w", prior.expand((4,)).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(x @ w, 0.3), obs=y)

    def guide():
        logits = pyro.param("logits", torch.zeros(4, 3))
        pyro.sample("w", cls(ternary, 0.5, logits=logits).to_event(1))

    elbo = Trace_ELBO()
    loss = elbo.loss_and_grads(model, guide)
    grad = pyro.param("logits").unconstrained().grad
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.2}), elbo)
    losses = torch.tensor([svi.step() for _ in range(60)])
    assert torch.isfinite(losses).all()
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert torch.equal(ternary.values[pyro.param("logits").argmax(-1)], w_true)
