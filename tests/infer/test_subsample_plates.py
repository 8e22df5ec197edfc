"""Guides that open a subsampled ``pyro.plate`` under DeterministicELBO."""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI

from pyro_bqn.distributions.moment_likelihoods import MomentNormal
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, MomentMessenger
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.moments import SiteMoments
from tests.infer.models import linear_classes

N, B = 20, 5
TAU = 0.7


def test_subsample_site_of_a_guide_is_left_alone_by_the_moment_messenger():
    def guide():
        with pyro.plate("data", N, subsample_size=B):
            pyro.sample("u", dist.Normal(torch.zeros(B), torch.ones(B)))

    trace = poutine.trace(MomentMessenger()(guide)).get_trace()
    indices = trace.nodes["data"]["value"]
    assert type(indices) is torch.Tensor and indices.shape == (B,)
    assert "moments" not in trace.nodes["data"]["infer"]
    assert isinstance(trace.nodes["u"]["value"], SiteMoments)


def test_guide_that_opens_the_data_plate_trains_with_the_same_loss():
    x, y = linear_classes(B, 5, 3, seed=0)  # a minibatch of B out of N
    model = QuantizedMLP((5, 4, 3))
    auto = AutoQuantizedGuide(model)
    auto(x, y, num_data=N)

    def guide(x, y, num_data):
        # The guide draws the minibatch's subsample site; the model's plate of the same name
        # replays it, and only its size (B of N) enters the loss.
        with pyro.plate("data", num_data, subsample_size=x.shape[0]):
            pass
        return auto(x, y, num_data)

    elbo = DeterministicELBO()
    assert elbo.loss(model, guide, x, y, N) == elbo.loss(model, auto, x, y, N)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    losses = [svi.step(x, y, N) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_local_latents_in_a_shared_subsampled_plate_are_scaled_by_n_over_b():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(N, generator=gen)
    model_indices, guide_indices = [], []

    def model(y):
        with pyro.plate("data", N, subsample_size=B) as idx:
            model_indices.append(idx)
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("obs", MomentNormal(u, TAU), obs=y[idx])

    def guide(y):
        loc = pyro.param("loc", torch.linspace(-1.0, 1.0, N))
        scale = pyro.param("scale", torch.linspace(0.2, 1.5, N), constraints.positive)
        with pyro.plate("data", N, subsample_size=B) as idx:
            guide_indices.append(idx)
            pyro.sample("u", dist.Normal(loc[idx], scale[idx]))

    loss = DeterministicELBO().loss(model, guide, y)
    idx = guide_indices[-1]
    assert torch.equal(model_indices[-1], idx)  # the model replays the guide's subsample
    m, s, obs = torch.linspace(-1.0, 1.0, N)[idx], torch.linspace(0.2, 1.5, N)[idx], y[idx]
    # E_q log N(y | u, tau^2) = -((y - m)^2 + s^2) / (2 tau^2) - log(2 pi tau^2) / 2
    ell = -((obs - m) ** 2 + s**2) / (2 * TAU**2) - 0.5 * math.log(2 * math.pi * TAU**2)
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s
    kl = (m**2 + s**2 - 1) / 2 - s.log()
    expected = -(N / B) * (ell - kl).sum().item()
    assert math.isclose(loss, expected, rel_tol=1e-5)
