import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive
from pyro.nn import PyroModule
from scipy import special

from pyro_bqn import levels as qlevels
from pyro_bqn.distributions.moment_likelihoods import (
    MomentBernoulli,
    MomentCategorical,
    MomentNormal,
)
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, predict, predictive_distribution
from pyro_bqn.moments import Moments
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from tests.infer.models import Classifier, Regressor, linear_classes

TERNARY = torch.tensor([-1.0, 0.0, 1.0])


def _classifier(sizes=(5, 4, 3), n=32):
    x, y = linear_classes(n, sizes[0], sizes[-1], seed=1)
    model = Classifier(sizes)
    guide = AutoQuantizedGuide(model)
    guide(x, y)
    return model, guide, x, y


class BinaryClassifier(PyroModule):
    def __init__(self, fan_in):
        super().__init__()
        self.fc = QuantizedLinear(fan_in, 1)

    def forward(self, x, y=None):
        logit = self.fc(x)[..., 0]
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentBernoulli(logits=logit), obs=y)


class TwoHeads(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc = QuantizedLinear(5, 3)

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("first", MomentCategorical(logits=logits), obs=y)
            pyro.sample("second", MomentCategorical(logits=logits), obs=y)


def _regression_data(n, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    f = torch.sin(2 * x[:, 0]) + x[:, 1].square() - 0.5 * x[:, 2]
    y = f + 0.1 * torch.randn(n, generator=gen)
    return x, (y - y.mean()) / y.std()


# --- what predict returns -----------------------------------------------------------------


def test_categorical_predictive_is_a_probability_table():
    model, guide, x, y = _classifier()
    probs = predict(model, guide, x)
    assert probs.shape == (32, 3)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(32))
    fn = predictive_distribution(model, guide, x)
    assert isinstance(fn, MomentCategorical)
    assert fn.logit_var is not None and (fn.logit_var > 0).all()  # moments, not a point
    assert torch.equal(fn.probs, probs)
    # Explicit site, and labels passed along, give the same answer.
    assert torch.equal(predict(model, guide, x, y, site="obs"), probs)


def test_predict_is_deterministic():
    model, guide, x, _ = _classifier()
    torch.manual_seed(1)
    first = predict(model, guide, x)
    torch.manual_seed(2)
    assert torch.equal(predict(model, guide, x), first)


def test_bernoulli_predictive_is_p_of_one():
    x, y = linear_classes(20, 4, 2, seed=0)
    model = BinaryClassifier(4)
    guide = AutoQuantizedGuide(model)
    guide(x, y.float())
    p = predict(model, guide, x)
    assert p.shape == (20,)
    assert ((p > 0) & (p < 1)).all()
    fn = predictive_distribution(model, guide, x)
    assert isinstance(fn, MomentBernoulli)
    # Computed without the implementation's formula, by Gauss-Hermite quadrature over
    # z ~ N(mu, s^2) (40 nodes: exact to float64 rounding for these smooth integrands).
    # 1. The probit rule is exact for the probit link: with lam = sqrt(pi / 8),
    #    sigmoid^-1(p) = Phi^-1(E[Phi(lam z)]) / lam.
    lam = math.sqrt(math.pi / 8)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    mu = fn.logit_mean.double().numpy()[:, None]
    sd = fn.logit_var.double().sqrt().numpy()[:, None]
    z = mu + sd * nodes
    expected_probit = (special.ndtr(lam * z) * weights).sum(-1) / weights.sum()
    expected = torch.sigmoid(torch.from_numpy(special.ndtri(expected_probit) / lam))
    torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=0)
    # 2. It approximates E[sigmoid(z)] within twice the largest gap between the logistic and
    #    the scaled probit curves (once inside the expectation, once outside it).
    grid = np.linspace(-20, 20, 400_001)
    link_gap = np.abs(special.expit(grid) - special.ndtr(lam * grid)).max()
    expected_logistic = (special.expit(z) * weights).sum(-1) / weights.sum()
    assert np.abs(p.double().numpy() - expected_logistic).max() <= 2 * link_gap


def test_normal_predictive_returns_moments_including_the_noise():
    x, y = _regression_data(16)
    model = Regressor(3, 8)
    guide = AutoQuantizedGuide(model)
    guide(x, y)
    out = predict(model, guide, x)
    assert isinstance(out, Moments)
    assert out.mean.shape == (16,) and out.var.shape == (16,)
    fn = predictive_distribution(model, guide, x)
    assert isinstance(fn, MomentNormal)
    noise = model.noise.detach()
    assert torch.allclose(out.var, fn.loc_var + noise.square())
    assert (out.var > noise.square()).all()


# --- side effects ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_predict_restores_the_mode_and_keeps_the_running_statistics(training):
    model, guide, x, y = _classifier()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), DeterministicELBO())
    svi.step(x, y)  # moves the running statistics away from their initial values
    model.train(training)
    before = {name: value.clone() for name, value in model.named_buffers()}
    seen = []
    model.body[1].register_forward_hook(lambda module, *_: seen.append(module.training))
    predict(model, guide, x)
    predictive_distribution(model, guide, x)
    assert seen == [False, False]  # batch norm ran on its running statistics
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name


def test_predict_restores_the_mode_after_an_error():
    model, guide, x, _ = _classifier()
    with pytest.raises(ValueError):
        predict(model, guide, x[:, :4])
    assert model.training


# --- accuracy of the sampling-free predictive -----------------------------------------------


# The sampling-free predictive's own error (moment propagation + mean-field softmax) on the
# network below, measured against S = 20,000 draws (mean standard error 0.0007): a mean
# absolute error of 0.021-0.024 over pyro seeds 0-3.
PREDICTIVE_BUDGET = 0.03


def test_sampling_free_predictive_is_close_to_monte_carlo_over_weights():
    # A small trained network with a hidden sign layer: the analytic predictive (moment
    # propagation + the mean-field softmax rule) against the average softmax of S discrete
    # networks drawn from the same posterior, both on the same batch-norm running statistics.
    x, y = linear_classes(300, 6, 3, seed=2)
    model = Classifier((6, 16, 3))
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    for _ in range(60):
        svi.step(x, y)
    x_test = x[:100]
    analytic = predict(model, guide, x_test)

    num_samples = 400
    draws = []
    model.eval()
    sites = list(guide.median())  # every latent site: the weights and the bias
    with torch.no_grad():
        for _ in range(num_samples):
            weights = {name: guide.exact_posterior(name).sample() for name in sites}
            trace = poutine.trace(poutine.condition(model, weights)).get_trace(x_test)
            draws.append(trace.nodes["obs"]["fn"].probs)
    model.train()
    draws = torch.stack(draws)
    monte_carlo = draws.mean(0)
    standard_error = draws.std(0) / math.sqrt(num_samples)

    # |analytic - MC| = |bias + noise|: the bias is the moment approximation's (budget below),
    # the noise has E|noise| <= sqrt(2/pi) se per entry (Gaussian by the CLT), and its mean
    # over the 300 entries varies by about se / sqrt(300), so mean(se) covers it.
    diff = (analytic - monte_carlo).abs()
    tolerance = PREDICTIVE_BUDGET + standard_error.mean()
    assert diff.mean() <= tolerance, (
        f"mean |analytic - MC| = {diff.mean():.4f} > {tolerance:.4f} (max {diff.max():.3f})"
    )
    agree = (analytic.argmax(-1) == monte_carlo.argmax(-1)).float().mean()
    assert agree > 0.85, f"argmax agreement {agree:.3f}"


# --- the site argument ----------------------------------------------------------------------


def test_site_argument_errors():
    model, guide, x, y = _classifier()
    with pytest.raises(ValueError, match=r"site 'nope' is not in the model; its sites: \[.*'obs'"):
        predict(model, guide, x, site="nope")

    two = TwoHeads()
    guide = AutoQuantizedGuide(two)
    guide(x, y)  # set up with labels, so that the likelihood sites are observed
    with pytest.raises(
        ValueError,
        match=r"could not tell which site is the prediction target; pass site=<name> "
        r"\(moment-aware likelihood sites found: \['first', 'second'\]\)",
    ):
        predict(two, guide, x)
    assert predict(two, guide, x, site="second").shape == (32, 3)


# --- relaxed guides -------------------------------------------------------------------------


@pytest.mark.parametrize("straight_through", [True, False])
def test_predict_uses_the_exact_posterior_of_a_relaxed_guide(straight_through):
    model, guide, x, _ = _classifier()
    exact = predict(model, guide, x)
    guide.temperature = 0.7
    guide.straight_through = straight_through
    assert torch.allclose(predict(model, guide, x), exact)
    assert guide.temperature == 0.7


# --- pyro.infer.Predictive ------------------------------------------------------------------


def test_predictive_with_the_guide_draws_discrete_networks():
    model, guide, x, _ = _classifier()
    model.eval()
    num_samples = 6
    samples = Predictive(model, guide=guide, num_samples=num_samples, parallel=False)(x)
    assert set(samples) == {"body.0.weight", "body.3.weight", "body.3.bias", "obs"}
    # Pyro pads the global sites with one dimension per plate of the model: (S, 1) + shape.
    for name, shape in (("body.0.weight", (4, 5)), ("body.3.weight", (3, 4))):
        weights = samples[name]
        assert weights.shape == (num_samples, 1) + shape
        assert torch.isin(weights, TERNARY).all()
    assert not torch.equal(samples["body.0.weight"][0], samples["body.0.weight"][1])
    assert samples["body.3.bias"].shape == (num_samples, 1, 3)
    obs = samples["obs"]
    assert obs.shape == (num_samples, 32)
    assert ((obs >= 0) & (obs < 3)).all() and obs.dtype == torch.long


def test_parallel_predictive_is_refused_by_the_layer():
    model, guide, x, _ = _classifier()
    predictive = Predictive(model, guide=guide, num_samples=4, parallel=True)
    with pytest.raises(
        ValueError,
        match=r"QuantizedLinear weight has shape \(4, 4, 5\), expected \(4, 5\): call the layer "
        r"outside pyro.plate \(weights are global\), and use Predictive\(\.\.\., "
        r"parallel=False\) to draw networks",
    ):
        predictive(x)


# --- regression -----------------------------------------------------------------------------


def test_deterministic_elbo_learns_a_regression_problem():
    x, y = _regression_data(400)
    x_train, y_train, x_test, y_test = x[:300], y[:300], x[300:], y[300:]
    model = Regressor(3, 24, levels=qlevels.ternary())
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    losses = [svi.step(x_train, y_train) for _ in range(200)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    out = predict(model, guide, x_test)
    rmse = (out.mean - y_test).square().mean().sqrt().item()
    std = y_test.std().item()
    # The target's noise is ~0.06 in standardised units. Measured over pyro seeds 0-4:
    # RMSE 0.10-0.24 against a target std of 0.87.
    assert rmse < 0.5 * std, f"test RMSE {rmse:.3f} vs target std {std:.3f}"
    # The learned noise scale (from 1) tracks the residual: measured ratio 0.7-1.05.
    noise = model.noise.item()
    assert 0.5 < noise / rmse < 2, f"learned noise {noise:.3f} vs test RMSE {rmse:.3f}"
