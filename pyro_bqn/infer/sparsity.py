"""Sparsity of a quantized network: the share of its weights that are zero.

Roth & Pernkopf report it as a main result of discrete-weight variational inference: a
zero weight costs no multiplication and no storage in a sparse format. For a Bayesian
quantized network it is measured on the *most probable network* (each weight at its most
probable level), over the sites whose level set holds 0; sites without a zero level (e.g.
binary weights) cannot be sparse and are left out. ``None`` means no site can be sparse.

Usage::

    >>> import torch
    >>> zero_share([torch.tensor([0.0, 1.0, -1.0, 0.0]), torch.zeros(2, 2)])
    0.75
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pyro_bqn.infer.auto_quantized_guide import AutoQuantizedGuide

__all__ = ["most_probable_sparsity", "zero_share"]


def zero_share(weights: Iterable[torch.Tensor]) -> float | None:
    """The share of entries equal to 0 over all ``weights`` (``None`` when there are none)."""
    zeros = total = 0
    for weight in weights:
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else None


@torch.no_grad()
def most_probable_sparsity(guide: AutoQuantizedGuide) -> float | None:
    """The share of weights whose most probable level is 0, over the guide's quantized sites
    whose level set holds 0 (see the module docstring).

    :raises ValueError: if the guide has not run yet (it has no parameters).
    """
    if guide.prototype_trace is None:
        raise ValueError("the guide has no parameters yet: run it once (e.g. one SVI step)")
    zeros = total = 0
    for name in guide.quantized_sites:
        posterior = guide.exact_posterior(name)
        if (posterior.levels == 0).any():
            # The mode of every posterior kind the guide has (categorical, partition,
            # spike-and-slab, whose full-precision outliers are not zero).
            mode = posterior.mode
            zeros += int((mode == 0).sum())
            total += mode.numel()
    return zeros / total if total else None
