"""Tests for pyro_bqn.distributions.wrappers: seeing through Pyro's distribution wrappers."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_bqn.distributions import (
    MomentCategorical,
    QuantizedCategorical,
    base_distribution,
    is_moment_likelihood,
)
from pyro_bqn.levels import ternary
from pyro_bqn.moments import Moments


def _wrapped(fn):
    """``fn`` under each wrapper Pyro puts around a site's distribution, and all three.

    Built explicitly: a distribution's own ``.expand`` may return its own class instead.
    """
    expanded = dist.ExpandedDistribution(fn, (2, *fn.batch_shape))
    return {
        "plain": fn,
        "to_event": dist.Independent(fn, 1),
        "expand": expanded,
        "mask": dist.MaskedDistribution(fn, torch.tensor(True)),
        "all": dist.Independent(dist.MaskedDistribution(expanded, torch.tensor(True)), 2),
    }


@pytest.mark.parametrize("wrapper", ["plain", "to_event", "expand", "mask", "all"])
def test_base_distribution_peels_every_wrapper(wrapper: str) -> None:
    base = QuantizedCategorical(ternary(), logits=torch.zeros(3, 3))
    assert base_distribution(_wrapped(base)[wrapper]) is base


def test_base_distribution_stops_at_other_distributions() -> None:
    normal = dist.Normal(torch.zeros(3), 1.0)
    transformed = dist.TransformedDistribution(normal, [dist.transforms.ExpTransform()])
    assert base_distribution(transformed) is transformed


@pytest.mark.parametrize("wrapper", ["plain", "to_event", "expand", "mask", "all"])
def test_moment_likelihoods_are_recognised_through_wrappers(wrapper: str) -> None:
    likelihood = MomentCategorical(Moments(torch.zeros(3, 4), torch.ones(3, 4)))
    assert is_moment_likelihood(_wrapped(likelihood)[wrapper])
    assert not is_moment_likelihood(_wrapped(dist.Categorical(logits=torch.zeros(3, 4)))[wrapper])
