"""Seeing through Pyro's distribution wrappers: one answer to "what is under this site's
``fn``" and to "is this a moment-aware likelihood"."""

from __future__ import annotations

import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistributionMixin

__all__ = ["base_distribution", "is_moment_likelihood"]


def base_distribution(fn: TorchDistributionMixin) -> TorchDistributionMixin:
    """``fn`` without the ``Independent``, ``ExpandedDistribution`` and
    ``MaskedDistribution`` wrappers that ``.to_event``, ``.expand``, plates and ``.mask``
    put around it.

    None of these wrappers changes what a value *is* (its levels, its moments per entry);
    they change shapes and how ``log_prob`` is summed or masked, which callers handle.
    """
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        fn = fn.base_dist
    return fn


def is_moment_likelihood(fn: TorchDistributionMixin) -> bool:
    """Whether ``fn`` is a moment-aware likelihood (it has ``expected_log_prob``, e.g.
    :class:`~pyro_bqn.distributions.MomentCategorical`), seen through the wrappers of
    :func:`base_distribution`.

    Such a site is scored by :class:`~pyro_bqn.infer.DeterministicELBO` with the expected
    log-likelihood under the propagated moments, and may stay unobserved when predicting.
    """
    return hasattr(base_distribution(fn), "expected_log_prob")
