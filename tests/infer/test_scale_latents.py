"""ScaleLatentsMessenger multiplies the scale of latent sample sites only."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceMeanField_ELBO

from pyro_bqn.infer import ScaleLatentsMessenger


def model(y):
    pyro.param("unused", torch.ones(2))
    with pyro.plate("data", 3):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(0.0, 2.0), obs=y)
    return u


def guide(y):
    loc = pyro.param("loc", torch.tensor([0.5, -1.0, 2.0]))
    sd = pyro.param("sd", torch.tensor([0.3, 1.0, 1.7]), constraint=constraints.positive)
    with pyro.plate("data", 3):
        pyro.sample("u", dist.Normal(loc, sd))


Y = torch.tensor([0.1, -0.4, 1.2])


def _scales(fn, *args):
    trace = poutine.trace(fn).get_trace(*args)
    sites = trace.nodes.items()
    return {name: site["scale"] for name, site in sites if site["type"] in ("sample", "param")}


@pytest.mark.parametrize("scale", [0.0, 0.25, 3.0])
def test_only_latent_sample_sites_are_scaled(scale):
    plain = _scales(model, Y)
    scaled = _scales(ScaleLatentsMessenger(scale)(model), Y)
    assert scaled["u"] == scale * plain["u"]
    assert scaled["obs"] == plain["obs"] == 1.0
    assert scaled["unused"] == plain["unused"]  # a param site: not a sample site


def test_it_composes_with_poutine_scale_by_multiplication():
    inner = poutine.scale(ScaleLatentsMessenger(0.5)(model), scale=4.0)
    scales = _scales(inner, Y)
    assert scales["u"] == 2.0 and scales["obs"] == 4.0
    outer = ScaleLatentsMessenger(0.5)(poutine.scale(model, scale=4.0))
    assert _scales(outer, Y) == scales


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_a_negative_or_nan_scale_is_refused(bad):
    with pytest.raises(ValueError, match="scale must be non-negative"):
        ScaleLatentsMessenger(bad)


@pytest.mark.parametrize("scale", [0.0, 0.3, 2.0])
def test_pyros_mean_field_elbo_gets_scale_times_the_kl(scale):
    # The likelihood does not depend on u, so TraceMeanField_ELBO's loss is exactly
    # -log p(y) + scale * KL(q || p), with the KL in closed form.
    loss = TraceMeanField_ELBO().loss(
        ScaleLatentsMessenger(scale)(model), ScaleLatentsMessenger(scale)(guide), Y
    )
    m, s = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 1.0, 1.7])
    kl = ((m**2 + s**2 - 1) / 2 - s.log()).sum().item()
    log_lik = dist.Normal(0.0, 2.0).log_prob(Y).sum().item()
    assert math.isclose(loss, -log_lik + scale * kl, rel_tol=1e-6)
