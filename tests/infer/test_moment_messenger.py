"""Tests for pyro_bqn.infer.MomentMessenger: moments, not samples, at latent sites."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_bqn.distributions import QuantizedCategorical
from pyro_bqn.infer import MomentMessenger
from pyro_bqn.levels import ternary


def _posterior() -> QuantizedCategorical:
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    return QuantizedCategorical(ternary(), logits=logits)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda fn: fn,
        lambda fn: dist.Independent(fn, 1),
        lambda fn: dist.ExpandedDistribution(fn, (4, 2)),
        lambda fn: dist.MaskedDistribution(dist.ExpandedDistribution(fn, (4, 2)), True).to_event(2),
    ],
    ids=["plain", "to_event", "expand", "expand-mask-to_event"],
)
def test_a_wrapped_posterior_gives_its_entries_moments_in_the_site_shape(wrap) -> None:
    posterior = _posterior()
    fn = wrap(posterior)
    with poutine.trace() as tracer, MomentMessenger():
        pyro.sample("w", fn)
    moments = tracer.trace.nodes["w"]["value"].moments
    shape = fn.batch_shape + fn.event_shape
    # Independent of the library's statistics: E[w] and E[w^2] summed over the levels.
    probs, levels = posterior.probs, torch.tensor([-1.0, 0.0, 1.0])
    mean, second = (probs * levels).sum(-1), (probs * levels.square()).sum(-1)
    torch.testing.assert_close(moments.mean, mean.expand(shape))
    torch.testing.assert_close(moments.var, (second - mean.square()).expand(shape))
    torch.testing.assert_close(moments.second_moment, second.expand(shape))
