import math
from operator import attrgetter

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import kl_divergence

from pyro_bqn.baselines import (
    AutoNormalAnalyticKL,
    GaussianBNN,
    gaussian_bnn_predict_proba,
    train_gaussian_bnn,
)
from tests.baselines.conftest import accuracy

SITES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out.weight", "out.bias"]


def _blobs(n: int = 90, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three 4-D Gaussian blobs."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(3, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen) + 3.0 * nn.functional.one_hot(y, 4)
    return x, y


def _untrained() -> tuple[GaussianBNN, AutoNormalAnalyticKL]:
    model = GaussianBNN([4, 6, 5, 3])
    return model, AutoNormalAnalyticKL(model, init_scale=0.3)


def _analytic_kl(model: GaussianBNN, guide: AutoNormalAnalyticKL) -> torch.Tensor:
    """Σ KL(N(μ, σ²) ‖ N(0, s²)) over all weights and biases, written out by hand."""
    total = torch.zeros(())
    for name, _ in guide.prototype_trace.iter_stochastic_nodes():
        layer, kind = name.split(".")
        fan_in = getattr(model, layer).in_features
        s = model.prior_scale / (math.sqrt(fan_in) if kind == "weight" else 1.0)
        mu, sigma = attrgetter(name)(guide.locs), attrgetter(name)(guide.scales)
        total = total + (math.log(s) - sigma.log() + (sigma**2 + mu**2) / (2 * s**2) - 0.5).sum()
    return total


def test_layers_sites_and_priors():
    model = GaussianBNN([4, 6, 5, 3], prior_scale=2.0)
    names = [name for name, _ in model.named_children()]
    assert names == ["flatten", "fc1", "act1", "fc2", "act2", "out"]
    assert list(model.parameters()) == []  # every weight is a latent site
    trace = prune_subsample_sites(poutine.trace(model).get_trace(torch.randn(7, 2, 2)))
    assert trace.stochastic_nodes == [*SITES, "obs"]  # obs is sampled: no labels given
    for name, fan_in in zip(SITES[::2], [4, 6, 5], strict=True):
        prior = trace.nodes[name]["fn"]
        assert prior.event_shape == trace.nodes[name]["value"].shape
        torch.testing.assert_close(
            prior.base_dist.scale, torch.full_like(prior.mean, 2.0 / fan_in**0.5)
        )
    torch.testing.assert_close(trace.nodes["out.bias"]["fn"].base_dist.scale, torch.full((3,), 2.0))
    assert trace.nodes["_RETURN"]["value"].shape == (7, 3)
    assert trace.nodes["obs"]["value"].shape == (7,)


def test_minibatch_likelihood_is_scaled_by_n_over_b():
    model, _ = _untrained()
    x, y = _blobs()
    scaled = poutine.trace(model).get_trace(x[:16], y[:16], num_data=90)
    assert scaled.nodes["obs"]["scale"] == pytest.approx(90 / 16)
    assert all(scaled.nodes[name]["scale"] == 1.0 for name in SITES)  # priors are not scaled
    assert poutine.trace(model).get_trace(x, y).nodes["obs"]["scale"] == 1.0
    with pytest.raises(ValueError, match="num_data"):
        model(x[:16], y[:16], num_data=10)


def test_guide_sites_have_a_closed_form_kl():
    model, guide = _untrained()
    x, y = _blobs()
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    total = 0.0
    for name in SITES:
        kl = kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"])
        assert kl.shape == guide_trace.nodes[name]["fn"].batch_shape == ()
        total = total + kl
    torch.testing.assert_close(total, _analytic_kl(model, guide))

    # Why the subclass: plain AutoNormal puts a Delta at the site, whose KL is −log p(w) at
    # the sampled w, so TraceMeanField_ELBO would estimate the KL by Monte Carlo.
    site = poutine.trace(AutoNormal(model)).get_trace(x, y).nodes["fc1.weight"]
    prior = model_trace.nodes["fc1.weight"]["fn"]
    assert isinstance(site["fn"], dist.Delta)
    torch.testing.assert_close(kl_divergence(site["fn"], prior), -prior.log_prob(site["value"]))


def test_guide_refuses_constrained_sites():
    def model():
        pyro.sample("s", dist.HalfNormal(1.0))

    with pytest.raises(ValueError, match="not real-valued"):
        AutoNormalAnalyticKL(model)()


def test_kl_weight_scales_exactly_the_analytic_kl():
    # With lr = 0 the parameters stay put and the same seed draws the same likelihood samples,
    # so the epoch losses differ by exactly (1 − β) KL / N, the *closed-form* KL (a Monte
    # Carlo KL would differ by (1 − β) times its sample instead).
    x, y = _blobs()
    losses = {}
    for beta in (1.0, 0.25):
        model, guide = train_gaussian_bnn(
            x,
            y,
            [4, 6, 5, 3],
            epochs=1,
            batch_size=32,
            lr=0.0,
            kl_weight=beta,
            progress=False,
            callback=lambda epoch, loss, beta=beta: losses.setdefault(beta, loss),
        )
    kl = _analytic_kl(model, guide).item()
    assert losses[1.0] - losses[0.25] == pytest.approx(0.75 * kl / 90, rel=1e-4)


def test_learns_digits(digits):
    history = []
    model, guide = train_gaussian_bnn(
        digits["x"],
        digits["y"],
        [64, 32, 10],
        epochs=10,
        batch_size=64,
        lr=1e-2,
        progress=False,
        callback=lambda epoch, loss: history.append(loss),
    )
    assert len(history) == 10 and history[-1] < history[0]
    probs = gaussian_bnn_predict_proba(model, guide, digits["x_test"], num_samples=20)
    assert probs.shape == (400, 10)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(400))
    assert accuracy(probs, digits["y_test"]) > 0.85


def test_reproducible_and_leaves_global_state_alone():
    x, y = _blobs()
    store = pyro.get_param_store()
    with store.scope():
        sentinel = pyro.param("sentinel", torch.ones(2))
        rng = torch.get_rng_state()
        model, guide = train_gaussian_bnn(x, y, [4, 6, 3], epochs=2, batch_size=32, seed=3)
        # batch_size=7 here and the default below: one weight sample serves every minibatch.
        probs = gaussian_bnn_predict_proba(model, guide, x, num_samples=5, batch_size=7)
        assert torch.equal(torch.get_rng_state(), rng)
        assert list(store.keys()) == ["sentinel"] and store["sentinel"] is sentinel

        kwargs = {"epochs": 2, "batch_size": 32, "progress": False}
        again = train_gaussian_bnn(x, y, [4, 6, 3], seed=3, **kwargs)
        torch.testing.assert_close(gaussian_bnn_predict_proba(*again, x, num_samples=5), probs)
        other = train_gaussian_bnn(x, y, [4, 6, 3], seed=4, **kwargs)
        assert not torch.allclose(gaussian_bnn_predict_proba(*other, x, num_samples=5), probs)

        # A parameter of the same name in the global store does not leak into the guide.
        pyro.param("AutoNormalAnalyticKL.locs.fc1.weight", torch.zeros(6, 4))
        torch.testing.assert_close(
            gaussian_bnn_predict_proba(model, guide, x, num_samples=5), probs
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kl_weight": -1.0}, "kl_weight"), ({"num_particles": 0}, "num_particles")],
)
def test_rejects_bad_arguments(kwargs, match):
    x, y = _blobs()
    with pytest.raises(ValueError, match=match):
        train_gaussian_bnn(x, y, [4, 3], progress=False, **kwargs)
    with pytest.raises(ValueError, match="prior_scale"):
        GaussianBNN([4, 3], prior_scale=0.0)


def test_a_cnn_shaped_gaussian_bnn_has_latent_kernels_with_fan_in_priors():
    from pyro_bqn.architectures import Architecture

    model = GaussianBNN(Architecture("cnn", (1, 8, 8), 3, (2, 4, 5)), prior_scale=2.0)
    names = [name for name, _ in model.named_children()]
    assert names == [
        "reshape", "conv1", "act_conv1", "pool1", "conv2", "act_conv2", "pool2",
        "flatten", "fc1", "act1", "out",
    ]  # fmt: skip
    trace = poutine.trace(model).get_trace(torch.randn(5, 64))
    kernel = trace.nodes["conv2.weight"]["fn"]
    assert kernel.event_shape == (4, 2, 5, 5)
    # fan-in of conv2: 2 channels x 5 x 5
    assert kernel.base_dist.scale.unique().item() == pytest.approx(2.0 / math.sqrt(50))
    assert trace.nodes["conv1.bias"]["fn"].event_shape == (2,)
    assert trace.nodes["obs"]["fn"].batch_shape == (5,)
