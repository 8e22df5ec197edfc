"""DeterministicELBO refuses observed values and site terms whose shapes disagree with the
likelihood and its plates, instead of summing a broadcast (and silently wrong) loss."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.nn import PyroModule

from pyro_bqn import levels
from pyro_bqn.distributions.moment_likelihoods import MomentNormal
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from tests.infer.models import linear_classes

N = 16


def _mlp():
    x, y = linear_classes(N, 5, 3, seed=0)
    model = QuantizedMLP((5, 4, 3))
    return model, AutoQuantizedGuide(model), x, y


class ColumnRegressor(PyroModule):
    """A regressor whose output keeps its trailing unit dimension: ``loc`` is ``(N, 1)``, so
    the data plate (dim -1, size N) expands the likelihood to batch shape ``(N, N)``."""

    def __init__(self):
        super().__init__()
        self.fc = QuantizedLinear(3, 1)

    def forward(self, x, y=None):
        loc = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentNormal(loc, 1.0), obs=y)


@pytest.mark.parametrize("validation", [True, False], ids=["validation", "no-validation"])
def test_labels_of_shape_n_by_1_are_refused_before_the_loss(validation):
    model, guide, x, y = _mlp()
    with pyro.validation_enabled(validation):
        elbo = DeterministicELBO()
        assert math.isfinite(elbo.loss(model, guide, x, y))
        terms = dict(elbo.last_terms)
        # (16, 1) labels against a (16,) batch broadcast to a (16, 16) log-likelihood.
        with pytest.raises(ValueError, match=r"site 'obs'.*\(16, 1\).*\(16,\)"):
            elbo.loss(model, guide, x, y[:, None])
    assert elbo.last_terms == terms  # refused before any loss was computed


def test_minibatch_labels_of_the_right_shape_are_scaled_by_the_plate():
    model, guide, x, y = _mlp()
    elbo = DeterministicELBO()
    elbo.loss(model, guide, x, y)
    full = elbo.last_terms["expected_log_likelihood"]
    elbo.loss(model, guide, x, y, num_data=4 * N)
    # The plate of size 4N over a batch of N stands for the whole data set: scale 4.
    assert math.isclose(elbo.last_terms["expected_log_likelihood"], 4 * full, rel_tol=1e-6)


@pytest.mark.parametrize("validation", [True, False], ids=["validation", "no-validation"])
def test_likelihood_broadcast_by_its_plate_is_refused(validation):
    x = torch.randn(N, 3)
    y = torch.randn(N)
    model = ColumnRegressor()
    guide = AutoQuantizedGuide(model)
    refusal = r"expected log-likelihood of site 'obs' has shape \(16, 16\)"
    with pyro.validation_enabled(validation), pytest.raises(ValueError, match=refusal):
        DeterministicELBO().loss(model, guide, x, y)


def test_mask_that_broadcasts_the_likelihood_is_refused():
    model, guide, x, y = _mlp()
    column_mask = torch.ones(N, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="'obs'.*16, 16"):
        DeterministicELBO().loss(poutine.mask(model, mask=column_mask), guide, x, y)


def test_value_that_broadcasts_without_changing_the_shape_is_accepted():
    x = torch.randn(N, 3)
    model = ColumnRegressor()
    guide = AutoQuantizedGuide(model)
    elbo = DeterministicELBO()
    # With a (N, 1) value the plate's (N, N) expansion stays, so the same refusal holds ...
    with pytest.raises(ValueError, match="'obs'"):
        elbo.loss(model, guide, x, torch.zeros(N, 1))

    class Regressor(ColumnRegressor):
        def forward(self, x, y=None):
            loc = self.fc(x)[..., 0]
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", MomentNormal(loc, 1.0), obs=y)

    model = Regressor()
    guide = AutoQuantizedGuide(model)
    # ... while a scalar observation broadcasts to the (N,) batch without changing it.
    expanded = elbo.loss(model, guide, x, torch.full((N,), 0.5))
    assert elbo.loss(model, guide, x, torch.tensor(0.5)) == expanded


def test_observed_value_that_is_not_a_tensor_is_refused():
    model, guide, x, y = _mlp()
    with pytest.raises(TypeError, match="site 'obs'.*list"):
        DeterministicELBO().loss(model, guide, x, y.tolist())


def _one_weight_model():
    # The prior gives level +1 no mass, so any guide that does has an infinite KL.
    prior = QuantizedCategorical(levels.ternary(), probs=torch.tensor([0.5, 0.5, 0.0]))
    w = pyro.sample("w", prior)
    pyro.sample("obs", MomentNormal(w, 1.0), obs=torch.tensor(0.3))


def test_infinite_loss_is_refused_before_the_parameters_turn_nan():
    def guide():
        logits = pyro.param("logits", torch.zeros(3))
        pyro.sample("w", QuantizedCategorical(levels.ternary(), logits=logits))

    svi = SVI(_one_weight_model, guide, pyro.optim.Adam({"lr": 0.1}), DeterministicELBO())
    with pytest.raises(ValueError, match=r"not finite.*'kl': inf"):
        svi.step()
    assert torch.equal(pyro.param("logits").detach(), torch.zeros(3))  # no step was taken


def test_nan_loss_is_refused():
    def guide():
        logits = torch.full((3,), float("nan"))
        pyro.sample("w", QuantizedCategorical(levels.ternary(), logits=logits, validate_args=False))

    with pytest.raises(ValueError, match=r"not finite.*'elbo': nan"):
        DeterministicELBO().loss(_one_weight_model, guide)


def test_model_latent_marked_auxiliary_in_the_guide_is_refused():
    def guide():
        prior = QuantizedCategorical(levels.ternary(), logits=torch.zeros(3))
        pyro.sample("w", prior, infer={"is_auxiliary": True})

    with pytest.raises(ValueError, match="site 'w'.*is_auxiliary"):
        DeterministicELBO().loss(_one_weight_model, guide)


@pytest.mark.parametrize(
    ("labels", "says"),
    [(torch.zeros(N, 1, dtype=torch.long), r"the value broadcasts to \(16, 16\)"),
     (torch.zeros(3, dtype=torch.long), "the value does not broadcast")],
)  # fmt: skip
def test_the_refusal_says_whether_the_value_broadcasts_and_to_what(labels, says):
    model, guide, x, _ = _mlp()
    with pytest.raises(ValueError, match=says):
        DeterministicELBO().loss(model, guide, x, labels)
