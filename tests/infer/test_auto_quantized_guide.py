import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer import SVI
from pyro.nn import PyroModule, PyroSample

from pyro_bqn import levels as qlevels
from pyro_bqn.checkpoint import load_checkpoint, save_checkpoint
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical
from pyro_bqn.distributions.relaxed_quantized_categorical import (
    RelaxedQuantizedCategorical,
    RelaxedQuantizedCategoricalStraightThrough,
)
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, predict
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from pyro_bqn.priors import SpikeAndSlabPrior
from tests.infer.models import Classifier, linear_classes

TERNARY = torch.tensor([-1.0, 0.0, 1.0])
SIZES = (5, 4, 3)
W0, W1, B1 = "body.0.weight", "body.3.weight", "body.3.bias"


def _setup(n=32, **guide_kwargs):
    x, y = linear_classes(n, SIZES[0], SIZES[-1], seed=1)
    model = Classifier(SIZES)
    guide = AutoQuantizedGuide(model, **guide_kwargs)
    guide(x, y)
    return model, guide, x, y


class OneLayer(PyroModule):
    """``QuantizedLinear(4, 2)`` with the given levels, and a categorical likelihood."""

    def __init__(self, levels=None):
        super().__init__()
        self.fc = QuantizedLinear(4, 2, levels=levels)

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


# --- posterior structure ------------------------------------------------------------------


def test_categorical_posterior_per_quantized_site_with_level_major_logits():
    model, guide, x, y = _setup()
    assert guide.quantized_sites == [W0, W1]
    store = pyro.get_param_store()
    for name, shape in ((W0, (4, 5)), (W1, (3, 4))):
        param = store[f"AutoQuantizedGuide.logits.{name}"]
        assert param.shape == (3,) + shape  # level-major: (K,) + weight shape
        view = guide.site_logits(name)
        assert view.shape == shape + (3,)
        assert torch.equal(view, param.movedim(0, -1))
        assert view.data_ptr() == param.data_ptr()  # a view, not a copy

        posterior = guide.exact_posterior(name)
        assert isinstance(posterior, QuantizedCategorical)
        assert posterior.batch_shape == shape and posterior.event_shape == ()
        assert torch.equal(posterior.levels, TERNARY)
        assert torch.allclose(posterior.probs, view.softmax(-1))
        full = guide.get_posterior(name)
        assert full.batch_shape == () and full.event_shape == shape


def test_site_logits_view_tracks_the_parameter():
    _, guide, _, _ = _setup()
    param = pyro.get_param_store()[f"AutoQuantizedGuide.logits.{W0}"]
    with torch.no_grad():
        param[2, 1, 3] = 123.0  # level index 2 (value +1) of weight [1, 3]
    assert guide.site_logits(W0)[1, 3, 2].item() == 123.0
    assert guide.median()[W0][1, 3].item() == 1.0


def test_normal_posterior_for_a_continuous_site_with_analytic_kl():
    model, guide, x, y = _setup(init_loc_scale=0.3)
    assert B1 not in guide.quantized_sites
    posterior = guide.exact_posterior(B1)
    assert isinstance(posterior, dist.Normal)
    assert posterior.batch_shape == (3,)
    assert torch.allclose(posterior.scale, torch.full((3,), 0.3))
    assert torch.equal(posterior.loc, torch.zeros(3))

    with torch.no_grad():
        pyro.get_param_store()[f"AutoQuantizedGuide.locs.{B1}"].copy_(torch.tensor([0.5, -1, 2]))
    prior = guide.prototype_trace.nodes[B1]["fn"]  # Normal(0, 1).to_event(1)
    kl = kl_divergence(guide.get_posterior(B1), prior)
    assert kl.shape == ()
    loc, scale = torch.tensor([0.5, -1.0, 2.0]), torch.tensor(0.3)
    expected = (scale.square() + loc.square() - 1 - 2 * scale.log()).sum() / 2
    assert torch.allclose(kl, expected, rtol=1e-5)


def test_relaxed_posteriors_with_a_temperature():
    _, guide, _, _ = _setup(temperature=0.5)
    assert isinstance(guide.get_posterior(W0).base_dist, RelaxedQuantizedCategoricalStraightThrough)
    guide.straight_through = False
    relaxed = guide.get_posterior(W0).base_dist
    assert isinstance(relaxed, RelaxedQuantizedCategorical)
    assert torch.allclose(relaxed.temperature, torch.tensor(0.5))
    # The exact posterior and continuous sites are never relaxed.
    assert type(guide.exact_posterior(W0)) is QuantizedCategorical
    assert isinstance(guide.get_posterior(B1).base_dist, dist.Normal)
    guide.temperature = None
    assert type(guide.get_posterior(W0).base_dist) is QuantizedCategorical


# --- initialisation -----------------------------------------------------------------------


def test_init_weights_put_the_most_probable_level_nearest_the_float_weight():
    gen = torch.Generator().manual_seed(0)
    w0 = 1.6 * torch.rand(4, 5, generator=gen) - 0.8  # away from the levels' midpoints
    w0[0, :3] = torch.tensor([-0.9, 0.1, 0.45])
    bias = torch.tensor([0.1, -0.2, 0.3])
    model, guide, x, y = _setup(init_weights={W0: w0, B1: bias}, init_scale=0.3)
    logits = guide.site_logits(W0)
    nearest = qlevels.ternary().nearest(w0)
    assert torch.equal(TERNARY[logits.argmax(-1)], nearest)
    assert torch.equal(guide.median()[W0], nearest)
    # theta_k = -(w0 - v_k)^2 / (2 init_scale^2)
    expected = -(w0[..., None] - TERNARY).square() / (2 * 0.3**2)
    assert torch.allclose(logits, expected)
    assert torch.equal(guide.exact_posterior(B1).loc, bias)
    # Sites without an initial weight start from a uniform draw on [v_1, v_K].
    assert guide.site_logits(W1).shape == (3, 4, 3)


def test_init_scale_sets_the_sharpness_of_the_initial_posterior():
    w0 = torch.full((4, 5), 0.9)
    sharp = _setup(init_weights={W0: w0}, init_scale=0.1)[1].exact_posterior(W0).probs
    pyro.clear_param_store()
    broad = _setup(init_weights={W0: w0}, init_scale=2.0)[1].exact_posterior(W0).probs
    assert (sharp[..., 2] > 0.99).all()
    assert (broad[..., 2] < 0.5).all()


@pytest.mark.parametrize(
    "init_weights, match",
    [
        (
            {"body.9.weight": torch.zeros(4, 5)},
            r"init_weights names sites the model does not "
            r"have: \['body.9.weight'\]",
        ),
        (
            {W0: torch.zeros(5, 4)},
            r"init_weights\['body.0.weight'\] must have shape \(4, 5\), "
            r"got \(5, 4\)",
        ),
        ({W0: torch.full((4, 5), math.nan)}, r"init_weights\['body.0.weight'\] must be finite"),
        ({B1: torch.zeros(4)}, r"init_weights\['body.3.bias'\] must have shape \(3,\), got \(4,\)"),
        ({B1: torch.tensor([0.0, math.inf, 0.0])}, r"init_weights\['body.3.bias'\] must be finite"),
    ],
    ids=["unknown-name", "wrong-shape", "nan", "bias-wrong-shape", "bias-inf"],
)
def test_bad_init_weights_are_refused(init_weights, match):
    x, y = linear_classes(8, SIZES[0], SIZES[-1], seed=1)
    guide = AutoQuantizedGuide(Classifier(SIZES), init_weights=init_weights)
    with pytest.raises(ValueError, match=match):
        guide(x, y)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
@pytest.mark.parametrize("name", ["init_scale", "init_loc_scale"])
def test_init_scales_must_be_positive(name, bad):
    with pytest.raises(ValueError, match=f"{name} must be positive, got {bad}"):
        AutoQuantizedGuide(Classifier(SIZES), **{name: bad})


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan])
def test_temperature_must_be_positive_or_none(bad):
    match = f"temperature must be positive or None, got {bad}"
    with pytest.raises(ValueError, match=match):
        AutoQuantizedGuide(Classifier(SIZES), temperature=bad)
    guide = AutoQuantizedGuide(Classifier(SIZES), temperature=1.0)
    with pytest.raises(ValueError, match=match):
        guide.temperature = bad
    assert guide.temperature == 1.0
    guide.temperature = None
    assert guide.temperature is None


def test_prototype_run_keeps_the_models_buffers():
    x, y = linear_classes(16, SIZES[0], SIZES[-1], seed=1)
    model = Classifier(SIZES)
    with torch.no_grad():  # non-default statistics, so a reset would show too
        model.body[1].running_mean.fill_(0.25)
        model.body[1].running_var.fill_(2.0)
    before = {name: value.clone() for name, value in model.named_buffers()}
    assert any("running_mean" in name for name in before)
    guide = AutoQuantizedGuide(model)
    guide(x, y)
    after = dict(model.named_buffers())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model.training


def test_unsupported_site_is_refused():
    class WithGammaSite(OneLayer):
        def __init__(self):
            super().__init__()
            self.noise = PyroSample(dist.Gamma(2.0, 2.0))

        def forward(self, x, y=None):
            _ = self.noise  # draws the Gamma site
            return super().forward(x, y)

    x, y = linear_classes(8, 4, 2, seed=0)
    match = (
        r"AutoQuantizedGuide cannot handle site 'noise': its prior Gamma is neither over a "
        r"level set nor real-valued \(support GreaterThanEq"
    )
    with pytest.raises(ValueError, match=match):
        AutoQuantizedGuide(WithGammaSite())(x, y)


# --- median and draws ---------------------------------------------------------------------


def test_median_is_the_most_probable_level_and_the_normal_mean():
    model, guide, x, y = _setup()
    with torch.no_grad():
        pyro.get_param_store()[f"AutoQuantizedGuide.locs.{B1}"].copy_(torch.tensor([1.0, 2, 3]))
    median = guide.median()
    assert median.keys() == {W0, W1, B1}
    for name in (W0, W1):
        assert torch.equal(median[name], TERNARY[guide.site_logits(name).argmax(-1)])
        assert not median[name].requires_grad
    assert torch.equal(median[B1], torch.tensor([1.0, 2.0, 3.0]))
    # The most probable network runs as a plain model.
    logits = pyro.poutine.condition(model, median)(x)
    assert logits.shape == (x.shape[0],)


def test_calling_the_guide_draws_discrete_level_values():
    model, guide, x, y = _setup(init_scale=5.0)  # broad: draws differ from the median
    draws = [guide(x, y) for _ in range(3)]
    for draw in draws:
        assert draw.keys() == {W0, W1, B1}
        for name, shape in ((W0, (4, 5)), (W1, (3, 4))):
            assert draw[name].shape == shape
            assert torch.isin(draw[name], TERNARY).all()
        assert draw[B1].shape == (3,)
    assert not torch.equal(draws[0][W0], draws[1][W0])
    # The empirical frequencies follow the posterior.
    samples = torch.stack([guide(x, y)[W0] for _ in range(400)])
    freq = (samples[..., None] == TERNARY).float().mean(0)
    probs = guide.exact_posterior(W0).probs
    tol = 5 * (probs * (1 - probs) / 400).sqrt() + 1e-3
    assert ((freq - probs).abs() <= tol).all()


# --- learnable levels ---------------------------------------------------------------------


def test_learnable_levels_are_read_by_the_guide_and_learned_by_svi():
    init = [-1.0, 0.2, 1.5]
    x, y = linear_classes(64, 4, 2, seed=3)
    model = OneLayer(levels=qlevels.learnable(init))
    guide = AutoQuantizedGuide(model)
    guide(x, y)
    level_set = model.fc.levels
    assert torch.allclose(guide.exact_posterior("fc.weight").levels, torch.tensor(init))

    # The guide reads the current values, not a copy taken at setup.
    with torch.no_grad():
        level_set.first.fill_(-2.0)
    assert guide.exact_posterior("fc.weight").levels[0].item() == pytest.approx(-2.0)
    with torch.no_grad():
        level_set.first.fill_(-1.0)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    losses = [svi.step(x, y) for _ in range(40)]
    assert all(math.isfinite(loss) for loss in losses)
    assert "fc.levels.first" in pyro.get_param_store()
    learned = level_set.values.detach()
    assert not torch.allclose(learned, torch.tensor(init), atol=1e-2), learned
    assert (learned[1:] > learned[:-1]).all(), learned
    posterior = guide.exact_posterior("fc.weight")
    assert torch.equal(posterior.levels.detach(), learned)
    assert torch.isin(guide.median()["fc.weight"], learned).all()
    assert torch.isin(guide(x, y)["fc.weight"], learned).all()


def test_guide_first_built_without_labels_covers_only_the_weights():
    model = QuantizedMLP((6, 4, 3))
    guide = AutoQuantizedGuide(model)
    probs = predict(model, guide, torch.randn(5, 6))
    assert probs.shape == (5, 3)
    assert "obs" not in guide.median()


# --- partition and spike-and-slab posteriors ------------------------------------------------


class PriorLayer(PyroModule):
    """``QuantizedLinear(4, 3)`` with the given levels and prior, categorical likelihood."""

    def __init__(self, levels, prior=None):
        super().__init__()
        self.fc = QuantizedLinear(4, 3, levels=levels, prior=prior)

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


ASYMMETRIC = [-1.0, -0.2, 0.4, 1.2]


def _trained(posterior, prior=None, steps=30, level_set=None, seed=0, **guide_kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, y = linear_classes(64, 4, 3, seed=3)
    model = PriorLayer(level_set or qlevels.learnable(ASYMMETRIC), prior)
    guide = AutoQuantizedGuide(model, posterior=posterior, **guide_kwargs)
    elbo = DeterministicELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    losses = [svi.step(x, y) for _ in range(steps)]
    return model, guide, losses, x, y


def test_partition_posterior_is_a_latent_gaussian_quantized_by_learned_partitions():
    w0 = torch.tensor([[-0.9, -0.3, 0.5, 1.0]] * 3)
    model, guide, _, x, y = _trained("partition", steps=0, init_weights={"fc.weight": w0},
                                     init_scale=0.2)
    guide(x, y)
    store = pyro.get_param_store()
    assert store["AutoQuantizedGuide.latent_locs.fc.weight"].shape == (3, 4)
    assert "AutoQuantizedGuide.partitions.fc.weight.first" in store
    midpoints = torch.tensor([-0.6, 0.1, 0.8])
    torch.testing.assert_close(guide.partitions_of("fc.weight").detach(), midpoints)
    posterior = guide.exact_posterior("fc.weight")
    assert type(posterior) is QuantizedCategorical and posterior.batch_shape == (3, 4)
    # q_k = Phi((t_k - m)/s) - Phi((t_{k-1} - m)/s) with m = w0, s = init_scale.
    normal = torch.distributions.Normal(w0, 0.2)
    edges = [-math.inf, *midpoints.tolist(), math.inf]
    expected = torch.stack([normal.cdf(torch.tensor(edges[k + 1])) -
                            normal.cdf(torch.tensor(edges[k])) for k in range(4)], -1)
    torch.testing.assert_close(posterior.probs, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(guide.median()["fc.weight"][0], model.fc.levels.values.detach())
    with pytest.raises(ValueError, match="without partitions"):
        _trained("categorical", steps=0)[1].partitions_of("fc.weight")


def test_partition_posterior_learns_its_partitions_and_the_levels():
    model, guide, losses, x, y = _trained("partition", steps=40)
    assert losses[-1] < losses[0]
    partitions = guide.partitions_of("fc.weight").detach()
    assert not torch.allclose(partitions, torch.tensor([-0.6, 0.1, 0.8]), atol=1e-3)
    assert (partitions.diff() > 0).all()
    assert not torch.allclose(model.fc.levels.values.detach(), torch.tensor(ASYMMETRIC),
                              atol=1e-3)
    # It is a categorical posterior: draws are levels; a temperature relaxes it.
    assert torch.isin(guide(x, y)["fc.weight"], model.fc.levels.values.detach()).all()
    guide.temperature = 0.5
    assert isinstance(guide.get_posterior("fc.weight").base_dist,
                      RelaxedQuantizedCategoricalStraightThrough)


def test_spike_and_slab_posterior_parameters_and_distribution():
    prior = SpikeAndSlabPrior(slab_prob=0.1, slab_scale=1.0, spike_scale=0.02)
    model, guide, _, x, y = _trained("spike-and-slab", prior, steps=0)
    guide(x, y)
    store = pyro.get_param_store()
    assert store["AutoQuantizedGuide.logits.fc.weight"].shape == (5, 3, 4)  # K + 1 first
    assert store["AutoQuantizedGuide.slab_locs.fc.weight"].shape == (3, 4)
    assert store["AutoQuantizedGuide.slab_scales.fc.weight"].shape == (3, 4)
    assert store["AutoQuantizedGuide.spike_scales.fc.weight"].item() == pytest.approx(0.02)
    posterior = guide.exact_posterior("fc.weight")
    assert isinstance(posterior, MultipleSpikeAndSlab) and posterior.batch_shape == (3, 4)
    assert posterior.level_set is model.fc.levels
    torch.testing.assert_close(posterior.slab_prob, torch.full((3, 4), 0.1))
    assert guide.site_logits("fc.weight").shape == (3, 4, 5)
    # Point-mass prior spikes: point-mass posterior spikes, without a width parameter.
    _, point, _, _, _ = _trained("spike-and-slab", SpikeAndSlabPrior(0.1, 1.0), steps=1)
    assert point.exact_posterior("fc.weight").point_mass
    assert "AutoQuantizedGuide.spike_scales.fc.weight" not in pyro.get_param_store()


@pytest.mark.parametrize("spike_scale", [0.0, 0.02])
def test_the_slab_and_spike_width_change_the_objective(spike_scale):
    # Issue 12: slab_scale and spike_scale never changed training (identical logits to 7
    # digits). With the spike-and-slab posterior each changes the loss and the training.
    base = {"slab_prob": 0.1, "slab_scale": 1.0, "spike_scale": spike_scale}
    other = {"slab_scale": 4.0} if spike_scale == 0 else {"spike_scale": 0.08}
    runs = [_trained("spike-and-slab", SpikeAndSlabPrior(**{**base, **change}), steps=10)
            for change in ({}, other)]
    assert abs(runs[0][2][-1] - runs[1][2][-1]) > 1e-2
    logits = [guide.site_logits("fc.weight").detach() for _, guide, *_ in runs]
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


def test_spike_and_slab_median_keeps_outliers_at_full_precision():
    prior = SpikeAndSlabPrior(slab_prob=0.1)
    model, guide, _, x, y = _trained("spike-and-slab", prior, steps=2)
    store = pyro.get_param_store()
    with torch.no_grad():
        store["AutoQuantizedGuide.logits.fc.weight"][4, 1, 2] = 50.0  # slab of weight [1, 2]
        store["AutoQuantizedGuide.slab_locs.fc.weight"][1, 2] = 2.345
    median = guide.median()["fc.weight"]
    levels = model.fc.levels.values.detach()
    on_level = (median.unsqueeze(-1) == levels).any(-1)
    assert median[1, 2].item() == pytest.approx(2.345) and not on_level[1, 2]
    assert on_level.sum() == 11
    draws = torch.stack([guide(x, y)["fc.weight"] for _ in range(50)])
    assert not (draws[:, 1, 2].unsqueeze(-1) == levels).any()


def test_posterior_kinds_are_checked():
    with pytest.raises(ValueError, match="posterior must be one of"):
        AutoQuantizedGuide(PriorLayer(qlevels.ternary()), posterior="gaussian")
    with pytest.raises(ValueError, match="no relaxed form"):
        AutoQuantizedGuide(PriorLayer(qlevels.ternary(), SpikeAndSlabPrior()),
                           posterior="spike-and-slab", temperature=0.5)
    x, y = linear_classes(8, 4, 3, seed=0)
    no_slab = (SpikeAndSlabPrior(slab_prob=0.0), "MultipleSpikeAndSlab with slab_prob 0.0")
    for prior, found in ((None, "QuantizedCategorical"), no_slab):
        guide = AutoQuantizedGuide(PriorLayer(qlevels.ternary(), prior),
                                   posterior="spike-and-slab")
        with pytest.raises(ValueError, match=f"slab_prob > 0 at site 'fc.weight', got {found}"):
            guide(x, y)


@pytest.mark.filterwarnings("ignore::pyro_bqn.distributions.InertPriorWarning")
@pytest.mark.parametrize("posterior", ["partition", "spike-and-slab"])
def test_checkpoints_resume_the_new_posteriors_and_learned_levels_exactly(posterior, tmp_path):
    prior = SpikeAndSlabPrior(slab_prob=0.1, spike_scale=0.02)
    model, guide, _, x, y = _trained(posterior, prior, steps=3)
    optimizer = pyro.optim.Adam({"lr": 0.05})
    svi = SVI(model, guide, optimizer, DeterministicELBO())
    svi.step(x, y)
    save_checkpoint(tmp_path / "run.pt", model, guide, optimizer)
    expected = [svi.step(x, y) for _ in range(2)]

    pyro.clear_param_store()
    fresh = PriorLayer(qlevels.learnable([-2.0, -1.0, 0.0, 2.0]), prior)
    fresh_guide = AutoQuantizedGuide(fresh, posterior=posterior)
    fresh_optimizer = pyro.optim.Adam({"lr": 0.05})
    load_checkpoint(tmp_path / "run.pt", fresh, fresh_guide, x, y, optimizer=fresh_optimizer)
    resumed = SVI(fresh, fresh_guide, fresh_optimizer, DeterministicELBO())
    assert [resumed.step(x, y) for _ in range(2)] == expected
