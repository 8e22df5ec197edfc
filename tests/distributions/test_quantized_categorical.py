import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_bqn import levels
from pyro_bqn.distributions import QuantizedCategorical

OBS_SCALE = 0.7


def _normal_log_prob(y: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    return dist.Normal(loc, OBS_SCALE).log_prob(y)


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.set_rng_seed(0)


@pytest.mark.parametrize("level_set", [levels.ternary(), levels.from_values([-0.7, 0.1, 1.3])],
                         ids=["ternary", "asymmetric"])
def test_trace_enum_elbo_global_latent_is_exact_marginal(level_set):
    probs = torch.tensor([0.2, 0.3, 0.5])
    y = torch.tensor([0.9, -0.2, 1.4, 0.3])

    @config_enumerate
    def model():
        w = pyro.sample("w", QuantizedCategorical(level_set, probs=probs))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(w, OBS_SCALE), obs=y)

    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda: None)
    # -log sum_k p_k prod_i N(y_i; v_k, s^2)
    joint = probs.log() + _normal_log_prob(y, level_set.values.unsqueeze(-1)).sum(-1)
    assert loss == pytest.approx(-joint.logsumexp(0).item(), rel=1e-5)


def test_trace_enum_elbo_local_latents_in_a_plate_are_exact_marginal():
    ternary = levels.ternary()
    logits = torch.randn(5, 3)
    y = torch.randn(5)

    @config_enumerate
    def model():
        with pyro.plate("data", len(y)):
            w = pyro.sample("w", QuantizedCategorical(ternary, logits=logits))
            pyro.sample("obs", dist.Normal(2 * w, OBS_SCALE), obs=y)

    trace = poutine.trace(poutine.enum(model, first_available_dim=-2)).get_trace()
    assert trace.nodes["w"]["value"].shape == (3, 1)  # enumerated in parallel, not expanded
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda: None)
    # -sum_i log sum_k p_ik N(y_i; 2 v_k, s^2)
    joint = logits.log_softmax(-1) + _normal_log_prob(y.unsqueeze(-1), 2 * ternary.values)
    assert loss == pytest.approx(-joint.logsumexp(-1).sum().item(), rel=1e-5)


def test_mean_variance_mode_of_ternary():
    q = QuantizedCategorical(levels.ternary(), probs=torch.tensor([0.2, 0.3, 0.5]))
    assert q.mean.item() == pytest.approx(0.3)  # q+ - q-
    assert q.second_moment.item() == pytest.approx(0.7)  # q+ + q-
    assert q.variance.item() == pytest.approx(0.7 - 0.09)
    assert q.mode.item() == 1.0
    assert q.entropy().item() == pytest.approx(-sum(p * math.log(p) for p in (0.2, 0.3, 0.5)))


def test_index_and_value_round_trip():
    q = QuantizedCategorical(levels.from_values([-0.7, 0.1, 1.3]), logits=torch.zeros(3))
    index = torch.tensor([[2, 0], [1, 1]])
    assert torch.equal(q.index_of(q.value_of(index)), index)


def test_learnable_levels_get_gradients_through_moments():
    level_set = levels.learnable([-1.0, 0.0, 1.0])
    q = QuantizedCategorical(level_set, logits=torch.randn(4, 3))
    (q.mean.sum() + q.variance.sum()).backward()
    assert level_set.first.grad is not None and level_set.raw_gaps.grad is not None


@pytest.mark.parametrize("name", ["logits", "probs"])
def test_last_dimension_must_be_number_of_levels(name):
    with pytest.raises(ValueError, match=rf"{name} must have last dimension K=3"):
        QuantizedCategorical(levels.ternary(), **{name: torch.full((2, 4), 0.25)})


def test_probs_not_summing_to_one_are_rejected_under_validation():
    with pytest.raises(ValueError, match="probs must be non-negative and sum to one"):
        QuantizedCategorical(levels.ternary(), probs=torch.tensor([0.2, 0.2, 0.2]),
                             validate_args=True)
    with pytest.raises(ValueError, match="probs must be non-negative and sum to one"):
        QuantizedCategorical(levels.ternary(), probs=torch.tensor([-0.2, 0.6, 0.6]),
                             validate_args=True)


def test_exactly_one_of_logits_and_probs():
    with pytest.raises(ValueError, match="exactly one of logits or probs"):
        QuantizedCategorical(levels.ternary())
    with pytest.raises(ValueError, match="exactly one of logits or probs"):
        QuantizedCategorical(levels.ternary(), logits=torch.zeros(3), probs=torch.ones(3) / 3)


def test_non_level_value_is_rejected():
    q = QuantizedCategorical(levels.ternary(), logits=torch.zeros(3), validate_args=True)
    with pytest.raises(ValueError, match="within the support"):
        q.log_prob(torch.tensor(0.5))
    q = QuantizedCategorical(levels.ternary(), logits=torch.zeros(3), validate_args=False)
    with pytest.raises(ValueError, match=r"not levels \[-1.0, 0.0, 1.0\]: \[0.5\]"):
        q.log_prob(torch.tensor(0.5))


def test_bad_levels_are_rejected():
    with pytest.raises(ValueError, match="sorted in increasing order"):
        QuantizedCategorical(torch.tensor([1.0, -1.0]), logits=torch.zeros(2))


@pytest.mark.parametrize("validate_args", [False, True])
def test_an_expanded_prior_keeps_one_shared_row(validate_args):
    # A layer's prior is expanded to the weights' shape; its probabilities must stay a
    # view of the (K,) row, not a softmax over every weight (that cost 20 ms per step).
    zeros = torch.zeros(3)
    prior = QuantizedCategorical(levels.ternary(), logits=zeros, validate_args=validate_args)
    expanded = prior.expand((50, 40))
    assert expanded.probs.stride()[:2] == (0, 0)
    assert expanded.logits.stride()[:2] == (0, 0)
    torch.testing.assert_close(expanded.probs, torch.full((50, 40, 3), 1 / 3))
