import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.nn import PyroModule

from pyro_bqn.distributions.moment_likelihoods import MomentCategorical, MomentNormal
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, predict, predictive_distribution
from pyro_bqn.moments import MomentRuleError
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from tests.infer.models import Classifier, linear_classes


def _setup(sizes=(5, 4, 3), n=32):
    x, y = linear_classes(n, sizes[0], sizes[-1], seed=1)
    model = Classifier(sizes)
    guide = AutoQuantizedGuide(model)
    guide(x, y)
    return model, guide, x, y


def test_loss_is_identical_under_different_seeds_and_draws_no_random_numbers():
    model, guide, x, y = _setup()
    elbo = DeterministicELBO()
    torch.manual_seed(1)
    first = elbo.loss(model, guide, x, y)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = elbo.loss(model, guide, x, y)
    assert first == second
    assert torch.equal(state, torch.get_rng_state())


def test_terms_are_exposed_and_consistent():
    model, guide, x, y = _setup()
    elbo = DeterministicELBO(kl_weight=0.5)
    loss = elbo.loss(model, guide, x, y)
    terms = elbo.last_terms
    assert set(terms) == {"expected_log_likelihood", "kl", "elbo"}
    assert terms["kl"] > 0
    assert math.isclose(
        terms["elbo"], terms["expected_log_likelihood"] - 0.5 * terms["kl"], rel_tol=1e-6
    )
    assert math.isclose(loss, -terms["elbo"], rel_tol=1e-6)
    module_loss = DeterministicELBO(kl_weight=0.5)(model, guide)(x, y)
    assert math.isclose(module_loss.item(), loss, rel_tol=1e-6)


def test_gradients_agree_with_finite_differences():
    torch.set_default_dtype(torch.float64)
    try:
        model, guide, x, y = _setup(sizes=(3, 2, 2), n=6)
        model.eval()  # batch statistics would couple the perturbations through the batch
        elbo = DeterministicELBO()
        with poutine.trace(param_only=True) as capture:
            elbo.differentiable_loss(model, guide, x, y)
        params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        loss = elbo.differentiable_loss(model, guide, x, y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        eps = 1e-6
        for (name, param), grad in zip(params.items(), grads, strict=True):
            grad = torch.zeros_like(param) if grad is None else grad
            flat, flat_grad = param.data.view(-1), grad.view(-1)
            for i in range(min(flat.numel(), 4)):
                original = flat[i].item()
                flat[i] = original + eps
                up = elbo.loss(model, guide, x, y)
                flat[i] = original - eps
                down = elbo.loss(model, guide, x, y)
                flat[i] = original
                numeric = (up - down) / (2 * eps)
                assert abs(numeric - flat_grad[i].item()) <= 1e-5 * (1 + abs(numeric)), name
    finally:
        torch.set_default_dtype(torch.float32)


def _one_layer_terms_by_hand(model, guide, x, y):
    """The KL and the moments of the logits of a one-layer :class:`Classifier`, computed
    with plain torch from the guide's parameters (nothing of the ELBO's own code)."""
    with torch.no_grad():
        q = guide.site_logits("body.0.weight").softmax(-1)  # (out, in, 3)
        levels = torch.tensor([-1.0, 0.0, 1.0])
        w_mean = (q * levels).sum(-1)
        w_var = (q * levels.square()).sum(-1) - w_mean.square()
        b_mean = pyro.param("AutoQuantizedGuide.locs.body.0.bias")
        b_sd = pyro.param("AutoQuantizedGuide.scales.body.0.bias")
        # The uniform prior over three levels, and the bias prior Normal(0, 1).
        kl_weight = (q * (3 * q).log()).sum()
        kl_bias = (-b_sd.log() + (b_sd.square() + b_mean.square()) / 2 - 0.5).sum()
        multiplier = model.temperature(torch.ones(()))
        logit_mean = multiplier * (x @ w_mean.T + b_mean)
        logit_var = multiplier**2 * (x.square() @ w_var.T + b_sd.square())
    return (kl_weight + kl_bias).item(), logit_mean, logit_var


def test_deterministic_elbo_is_its_closed_form_and_within_a_bounded_gap_of_monte_carlo():
    # One quantized layer and a temperature. The ELBO's terms are recomputed by hand, and the
    # Monte Carlo ELBO over discrete weight draws (one vectorised pass) uses that KL too.
    model, guide, x, y = _setup(sizes=(4, 3), n=16)
    elbo = DeterministicELBO()
    deterministic = -elbo.loss(model, guide, x, y)
    kl, logit_mean, logit_var = _one_layer_terms_by_hand(model, guide, x, y)
    assert math.isclose(elbo.last_terms["kl"], kl, rel_tol=1e-5)
    # Closed form: sum_n mu_{n,y} - log sum_k exp(mu_nk + sigma_nk^2 / 2).
    normaliser = (logit_mean + logit_var / 2).logsumexp(-1)
    closed_form = (logit_mean.gather(-1, y[:, None])[:, 0] - normaliser).sum().item()
    assert math.isclose(elbo.last_terms["expected_log_likelihood"], closed_form, rel_tol=1e-5)

    num_samples = 20_000
    with torch.no_grad():
        weight = guide.exact_posterior("body.0.weight").sample((num_samples,))
        bias = guide.exact_posterior("body.0.bias").sample((num_samples,))
        logits = (torch.einsum("ni,soi->sno", x, weight) + bias[:, None]) / model.temperature(
            torch.ones(())
        ).reciprocal()
        log_liks = logits.log_softmax(-1).gather(-1, y.expand(num_samples, -1)[..., None])
        log_liks = log_liks.squeeze(-1).sum(-1)
    monte_carlo = log_liks.mean().item() - kl
    tolerance = 5 * log_liks.std().item() / math.sqrt(num_samples)
    assert deterministic <= monte_carlo + tolerance
    # Two-sided: E[log sum_k exp z_k] >= log sum_k exp mu_k (Jensen, for any distribution of
    # z), so the bound is below the Monte Carlo ELBO by at most sum_n lse(mu + s2/2) - lse(mu).
    max_gap = (normaliser - logit_mean.logsumexp(-1)).sum().item()
    assert deterministic >= monte_carlo - max_gap - tolerance


def test_subsample_scale_is_applied():
    x, y = linear_classes(40, 3, 2, seed=0)
    idx = torch.arange(0, 40, 4)

    class Subsampled(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = QuantizedLinear(3, 2)

        def forward(self, x, y):
            logits = self.fc(x[idx])
            with pyro.plate("data", 40, subsample=idx):
                pyro.sample("obs", MomentCategorical(logits=logits), obs=y[idx])

    model = Subsampled()
    guide = AutoQuantizedGuide(model)
    elbo = DeterministicELBO()
    elbo.loss(model, guide, x, y)
    fn = predictive_distribution(model, guide, x, y, site="obs")
    plain_sum = fn.expected_log_prob(y[idx]).sum().item()
    # N / b = 40 / 10: the subsampled likelihood stands for the whole data set.
    assert math.isclose(elbo.last_terms["expected_log_likelihood"], 4 * plain_sum, rel_tol=1e-5)


class MaskedClassifier(Classifier):
    """:class:`Classifier` whose likelihood is masked per data point, inside the plate."""

    def forward(self, x, y=None, mask=True):
        logits = self.temperature(self.body(x))
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=mask):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def test_mask_is_applied():
    x, y = linear_classes(32, 5, 3, seed=1)
    model = MaskedClassifier((5, 3))  # one layer, no batch norm: train and eval agree
    guide = AutoQuantizedGuide(model)
    mask = torch.arange(32) % 3 == 0
    elbo = DeterministicELBO()
    elbo.loss(model, guide, x, y, mask)
    per_point = predictive_distribution(model, guide, x, y).expected_log_prob(y)
    masked = elbo.last_terms["expected_log_likelihood"]
    assert math.isclose(masked, per_point[mask].sum().item(), rel_tol=1e-5)
    elbo.loss(model, guide, x, y, torch.zeros(32, dtype=torch.bool))
    assert masked < 0 and elbo.last_terms["expected_log_likelihood"] == 0


def test_per_point_mask_over_the_whole_model_is_refused_at_a_global_site():
    # The (32,) mask also reaches the global weights, whose KL it would broadcast to (32,):
    # an all-True mask used to count the KL 32 times without a word.
    model, guide, x, y = _setup(sizes=(5, 3))
    masked_model = poutine.mask(model, mask=torch.ones(x.shape[0], dtype=torch.bool))
    expected = r"KL divergence of site 'body.0.weight' has shape \(32,\)"
    with pytest.raises(ValueError, match=expected):
        DeterministicELBO().loss(masked_model, guide, x, y)


def test_model_guide_mismatch_names_the_site():
    model, guide, x, y = _setup()

    def guide_missing_a_site(x, y):
        pyro.sample("other", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="model sample site '.*' has no matching site"):
        DeterministicELBO().loss(model, guide_missing_a_site, x, y)

    def guide_with_extra_site(x, y):
        guide(x, y)
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="guide sample site 'extra' does not appear"):
        DeterministicELBO().loss(model, guide_with_extra_site, x, y)


def test_shape_mismatch_names_the_site():
    model, guide, x, y = _setup(sizes=(5, 3))
    other = Classifier((5, 4))
    with pytest.raises(ValueError, match="shapes disagree at site 'body.0.weight'"):
        DeterministicELBO().loss(other, guide, x, y)


def test_plain_categorical_in_the_model_fails_with_a_pointer():
    class Plain(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = QuantizedLinear(5, 3)

        def forward(self, x, y=None):
            logits = self.fc(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    x, y = linear_classes(8, 5, 3, seed=0)
    model = Plain()
    guide = AutoQuantizedGuide(model)
    with pytest.raises(MomentRuleError, match="MomentCategorical"):
        DeterministicELBO().loss(model, guide, x, y)


def test_layer_called_inside_the_data_plate_is_explained():
    class InsidePlate(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = QuantizedLinear(5, 3)

        def forward(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", MomentCategorical(logits=self.fc(x)), obs=y)

    x, y = linear_classes(8, 5, 3, seed=0)
    model = InsidePlate()
    with pytest.raises(ValueError, match="call the layer outside pyro.plate"):
        DeterministicELBO().loss(model, AutoQuantizedGuide(model), x, y)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1"])
def test_kl_weight_is_validated(bad):
    with pytest.raises(ValueError, match="kl_weight"):
        DeterministicELBO(kl_weight=bad)


def test_kl_weight_zero_leaves_the_expected_log_likelihood():
    model, guide, x, y = _setup()
    elbo = DeterministicELBO(kl_weight=0)
    assert elbo.last_terms == {}  # nothing evaluated yet
    loss = elbo.loss(model, guide, x, y)
    assert elbo.last_terms["kl"] > 0
    assert loss == -elbo.last_terms["expected_log_likelihood"] == -elbo.last_terms["elbo"]
    assert elbo.num_particles == 1  # it draws nothing: one deterministic "particle"


def _normal_latent_model(*, loc):
    pyro.sample("w", dist.Normal(0.0, 1.0))


def _normal_latent_guide(*, loc):
    pyro.sample("w", dist.Normal(loc, 1.0))


def test_keyword_arguments_reach_the_model_and_the_guide():
    # KL(N(loc, 1) || N(0, 1)) = loc^2 / 2, the whole loss of a model with no observation.
    loss = DeterministicELBO().loss(_normal_latent_model, _normal_latent_guide, loc=0.6)
    assert math.isclose(loss, 0.18, rel_tol=1e-6)


def test_an_auxiliary_guide_site_adds_no_kl():
    def guide(*, loc):
        pyro.sample("aux", dist.Normal(2.0, 1.0), infer={"is_auxiliary": True})
        _normal_latent_guide(loc=loc)

    loss = DeterministicELBO().loss(_normal_latent_model, guide, loc=0.6)
    assert math.isclose(loss, 0.18, rel_tol=1e-6)


def test_max_plate_nesting_is_honoured():
    def model():
        with pyro.plate("rows", 2, dim=-2), pyro.plate("columns", 3, dim=-1):
            pyro.sample("obs", MomentNormal(torch.zeros(2, 3), 1.0), obs=torch.zeros(2, 3))

    # Six observations at their mean: 6 * log N(0; 0, 1).
    loss = DeterministicELBO(max_plate_nesting=2).loss(model, lambda: None)
    assert math.isclose(loss, 3 * math.log(2 * math.pi), rel_tol=1e-6)
    with pytest.raises(ValueError, match="site 'obs'.*plate stack overflow"):
        DeterministicELBO(max_plate_nesting=1).loss(model, lambda: None)


def test_retain_graph_is_honoured():
    # A guide parameter computed outside the ELBO: its graph is freed by the ELBO's backward
    # unless Pyro's retain_graph attribute asks to keep it.
    raw = torch.tensor(0.3, requires_grad=True)
    loc = raw.exp()
    elbo = DeterministicELBO()
    elbo.retain_graph = True
    elbo.loss_and_grads(_normal_latent_model, _normal_latent_guide, loc=loc)
    loc.backward()  # a second backward through the retained graph
    # d/draw of (the ELBO's loc^2 / 2, then loc) = loc^2 + loc.
    torch.testing.assert_close(raw.grad, loc.detach().square() + loc.detach())
    elbo.retain_graph = None
    loc = raw.exp()
    elbo.loss_and_grads(_normal_latent_model, _normal_latent_guide, loc=loc)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loc.backward()


def test_svi_learns_a_synthetic_classification_problem():
    x, y = linear_classes(400, 10, 3, seed=3)
    model = Classifier((10, 32, 3))
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), DeterministicELBO())
    for _ in range(200):
        svi.step(x, y)
    accuracy = (predict(model, guide, x).argmax(-1) == y).float().mean()
    assert accuracy > 0.8
